"""The coordinator's lock book: the current lock of every file and each space's lock history, on disk.

One JSON file per space (``DATA/locks/<space>.json``), rewritten atomically on every change: locks
change at human speed.  The history keeps the last ``MAX_EVENTS`` events per space (taken,
renewed, released, forced with who forced it, expired).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pydantic import ValidationError

from broker.history import write_atomic
from schemas.messages import LockEvent, LockState

log = logging.getLogger("atrius.locks")

MAX_EVENTS = 1000


class LockBook:
    """Single owner: the coordinator's event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "locks"
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, dict[str, LockState]] = {}
        self._events: dict[str, list[LockEvent]] = {}
        for path in sorted(self.root.glob("*.json")):
            self._load(path)

    def _load(self, path: Path) -> None:
        space = path.stem
        try:
            raw = json.loads(path.read_text())
            locks = {fid: LockState.model_validate(v) for fid, v in raw["locks"].items()}
            events = [LockEvent.model_validate(e) for e in raw["events"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
            bad = path.with_suffix(f".corrupt-{int(time.time())}")
            log.error("lock book %s is unreadable (%s); moved to %s, starting with no locks", path, exc, bad.name)
            path.replace(bad)
            return
        self._locks[space] = locks
        self._events[space] = events

    def _save(self, space: str) -> None:
        data = {
            "locks": {fid: lock.model_dump(mode="json") for fid, lock in self._locks.get(space, {}).items()},
            "events": [e.model_dump(mode="json") for e in self._events.get(space, [])],
        }
        write_atomic(self.root / f"{space}.json", json.dumps(data, indent=1).encode())

    def get(self, space: str, file_id: str) -> LockState | None:
        return self._locks.get(space, {}).get(file_id)

    def set(self, space: str, file_id: str, lock: LockState | None, event: LockEvent | None) -> None:
        """Change a lock and record why; raises OSError (nothing changed) if it cannot be saved."""
        locks = dict(self._locks.get(space, {}))
        events = list(self._events.get(space, []))
        if lock is None:
            locks.pop(file_id, None)
        else:
            locks[file_id] = lock
        if event is not None:
            events = [*events, event][-MAX_EVENTS:]
        old = self._locks.get(space), self._events.get(space)
        self._locks[space], self._events[space] = locks, events
        try:
            self._save(space)
        except OSError:
            if old[0] is None:
                self._locks.pop(space, None)
                self._events.pop(space, None)
            else:
                self._locks[space], self._events[space] = old[0], old[1] or []
            raise

    def locks(self, space: str) -> list[LockState]:
        return sorted(self._locks.get(space, {}).values(), key=lambda lock: lock.file_id)

    def events(self, space: str, limit: int) -> list[LockEvent]:
        """The newest ``limit`` events, newest first."""
        return list(reversed(self._events.get(space, [])[-limit:]))

    def spaces(self) -> list[str]:
        return sorted(self._locks)
