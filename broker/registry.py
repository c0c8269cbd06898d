"""The coordinator's device registry: every device seen in each space, with when it was last seen.

Kept from the retained presence messages (epochs decide which is current, see
:func:`schemas.rules.presence_is_current`) and saved to ``DATA/devices.json`` when a device comes
or goes, so ``atrius status`` can say when an offline device was last seen even after a restart.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pydantic import ValidationError

from broker.history import write_atomic
from schemas.messages import DeviceRecord, Presence, PresenceState
from schemas.rules import presence_is_current

log = logging.getLogger("atrius.registry")


class DeviceRegistry:
    """Single owner: the coordinator's event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "devices.json"
        self._records: dict[tuple[str, str], DeviceRecord] = {}
        self.presence: dict[tuple[str, str], Presence] = {}
        """The current presence of each device (only what arrived since this coordinator started)."""
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_text())
            for space, devices in raw.items():
                for device, rec in devices.items():
                    r = DeviceRecord.model_validate(rec)
                    # Nobody knows whether it is still online until its retained presence arrives.
                    self._records[(space, device)] = r.model_copy(update={
                        "state": PresenceState.OFFLINE, "sending": [], "receiving": []})
        except (OSError, ValueError, AttributeError, ValidationError) as exc:
            log.error("device registry %s is unreadable (%s); starting empty", self.path, exc)
            self._records.clear()

    def save(self) -> None:
        data: dict[str, dict[str, object]] = {}
        for (space, device), rec in sorted(self._records.items()):
            data.setdefault(space, {})[device] = rec.model_dump(mode="json")
        try:
            write_atomic(self.path, json.dumps(data, indent=1).encode())
        except OSError as exc:
            log.error("saving the device registry failed: %s", exc.strerror or exc)

    def update(self, space: str, p: Presence, now: float | None = None) -> bool:
        """Take a presence message; returns True if it is current (not from an older epoch)."""
        key = (space, p.device)
        if not presence_is_current(p, self.presence.get(key)):
            return False
        old = self._records.get(key)
        self.presence[key] = p
        seen = time.time() if now is None else now
        if p.state is PresenceState.OFFLINE and (old is None or old.state is PresenceState.OFFLINE):
            # A retained "offline" replayed to us: it went offline before we looked, not now.
            seen = old.last_seen if old is not None else p.since
        self._records[key] = DeviceRecord(
            device=p.device, state=p.state, last_seen=seen, since=p.since,
            host=p.host, agent_version=p.agent_version, sending=p.sending, receiving=p.receiving)
        if old is None or old.state is not p.state:
            self.save()
        return True

    def forget(self, space: str, device: str) -> None:
        """An empty retained presence: the device was removed from the space."""
        self.presence.pop((space, device), None)
        if self._records.pop((space, device), None) is not None:
            self.save()

    def online(self, space: str) -> list[str]:
        return sorted(d for (s, d), p in self.presence.items() if s == space and p.state is PresenceState.ONLINE)

    def records(self, space: str, now: float | None = None) -> list[DeviceRecord]:
        """Every device of the space; an online device was last seen now."""
        t = time.time() if now is None else now
        out = []
        for (s, _d), rec in sorted(self._records.items()):
            if s == space:
                out.append(rec.model_copy(update={"last_seen": t}) if rec.state is PresenceState.ONLINE else rec)
        return out
