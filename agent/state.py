"""The agent's state dir: last synced head per file, the presence epoch, manifest pages, snapshots."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import blake3
from pydantic import ValidationError

from schemas.messages import Head
from schemas.names import disk_name

log = logging.getLogger("atrius.state")


class StateError(RuntimeError):
    """The state dir cannot be read or written."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_synced(root: Path) -> dict[str, Head]:
    """The last synced heads from a state dir, read-only (for ``atrius status``); {} if unreadable."""
    try:
        raw = json.loads((root / "state.json").read_text())
        return {fid: Head.model_validate(h) for fid, h in raw.get("synced", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError, ValidationError):
        return {}


class AgentState:
    """Single owner: the sync engine.  Persists after every change (small JSON, atomic)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.snap_dir = root / "snapshots"
        self.partial_dir = root / "partial"
        try:
            for d in (root, self.blob_dir, self.snap_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"creating state dir {root}: {exc}") from exc
        self._file = root / "state.json"
        self.epoch = 0
        self.synced: dict[str, Head] = {}
        self.stats: dict[str, tuple[int, int, int, str]] = {}
        """Hash cache: (size, mtime_ns, inode, content hash) of each file when it was last hashed."""
        self.dirty = False
        """Changes not yet on disk (see :meth:`save_if_dirty`)."""
        self.locked_modes: dict[str, int] = {}
        """Original permission bits of files made read-only because another device holds their lock."""
        self._load()

    def _load(self) -> None:
        if not self._file.exists():
            return
        try:
            raw = json.loads(self._file.read_text())
            if not isinstance(raw, dict) or not isinstance(raw.get("synced", {}), dict):
                raise ValueError("not a mapping of epoch and synced heads")
            self.epoch = int(raw.get("epoch", 0))
            for fid, head in raw.get("synced", {}).items():
                self.synced[fid] = Head.model_validate(head)
            self.locked_modes = {str(k): int(v) & 0o7777 for k, v in raw.get("locked_modes", {}).items()}
            self.stats = {str(k): (int(v[0]), int(v[1]), int(v[2]), str(v[3]))
                          for k, v in raw.get("stats", {}).items()}
        except (OSError, ValueError, TypeError, ValidationError) as exc:
            bad = self._file.with_suffix(f".corrupt-{int(time.time())}")
            log.error("state file %s is unreadable (%s); moved to %s and starting fresh", self._file, exc, bad)
            os.replace(self._file, bad)
            self.synced.clear()

    def save(self) -> None:
        data = {"epoch": self.epoch, "synced": {k: v.model_dump(mode="json") for k, v in self.synced.items()},
                "locked_modes": self.locked_modes, "stats": self.stats}
        write_atomic(self._file, json.dumps(data, separators=(",", ":")).encode())
        self.dirty = False

    def save_if_dirty(self) -> None:
        """Synced heads and the hash cache are saved in batches (by the engine, every half second
        and at stop): a crash loses at most that much, which the start-up reconcile makes good by
        comparing content hashes."""
        if self.dirty:
            self.save()

    def set_stat(self, file_id: str, st: tuple[int, int, int] | None, digest: str | None) -> None:
        if st is None or digest is None:
            if self.stats.pop(file_id, None) is not None:
                self.dirty = True
            return
        entry = (*st, digest)
        if self.stats.get(file_id) != entry:
            self.stats[file_id] = entry
            self.dirty = True

    def cached_hash(self, file_id: str, st: tuple[int, int, int]) -> str | None:
        entry = self.stats.get(file_id)
        return entry[3] if entry is not None and entry[:3] == st else None

    def next_epoch(self) -> int:
        self.epoch = max(self.epoch + 1, 1)
        self.save()
        return self.epoch

    def set_locked_mode(self, file_id: str, mode: int | None) -> None:
        if mode is None:
            if self.locked_modes.pop(file_id, None) is not None:
                self.save()
        elif self.locked_modes.get(file_id) != mode:
            self.locked_modes[file_id] = mode
            self.save()

    def set_synced(self, head: Head) -> None:
        self.synced[head.file_id] = head
        self.dirty = True

    # -- manifest pages (small blobs this device authored or fetched) ----------------------
    def put_blob(self, digest: str, data: bytes | memoryview) -> None:
        """Store a verified blob; a missing or rotten copy on disk is (re)written."""
        if blake3.blake3(data).hexdigest() != digest:
            raise StateError(f"blob {digest[:12]} does not match its hash; not stored")
        if self.get_blob(digest) is None:
            write_atomic(self.blob_dir / digest, bytes(data))

    def get_blob(self, digest: str) -> bytes | None:
        try:
            data = (self.blob_dir / digest).read_bytes()
        except FileNotFoundError:
            return None
        return data if blake3.blake3(data).hexdigest() == digest else None

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self, file_id: str, source: Path, label: str, keep: int) -> Path | None:
        """Keep the current content of ``source`` (hard link when possible, else copy)."""
        if keep <= 0 or not source.exists():
            return None
        folder = self.snap_dir / disk_name(file_id)
        folder.mkdir(parents=True, exist_ok=True)
        now_ns = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_ns // 1_000_000_000)) + f".{now_ns % 1_000_000_000:09d}"
        dest = folder / f"{stamp}-{label}{source.suffix}"
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)
        self._prune(folder, keep)
        return dest

    @staticmethod
    def _prune(folder: Path, keep: int) -> None:
        snaps = sorted(p for p in folder.iterdir() if p.is_file())
        for old in snaps[: max(0, len(snaps) - keep)]:
            old.unlink(missing_ok=True)
