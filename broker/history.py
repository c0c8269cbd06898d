"""Version history of every file in every space, in TinyDB, in blocks of 1,000 versions per file.

TinyDB rewrites a whole database file on every write and re-reads a whole table on every
insert, so one growing file makes each new version cost more than the last.  Here each file's
history is split into blocks (``DATA/history/<space>/<file key>/<block>.json``, block =
(version - 1) // 1000), each block a TinyDB behind a write cache that is flushed at most every
``flush_interval`` seconds and on close.  Recording version 100,000 touches one block of at most
1,000 records, like version 1,000 did.  Every flush writes the new file beside the old one,
fsyncs it and renames it over, so a crash loses at most the last interval, never the database.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinydb import Query, TinyDB
from tinydb.middlewares import CachingMiddleware
from tinydb.storages import Storage

from schemas.messages import Head, VersionEntry, VersionKind
from schemas.names import disk_name
from schemas.rules import head_key

log = logging.getLogger("atrius.history")

BLOCK = 1000
ID_FILE = "file_id"
MAX_OPEN_BLOCKS = 256


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside, fsync, rename over, fsync the folder; on failure leave no temp file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep the space the retry needs
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicJSONStorage(Storage):
    """TinyDB storage that never leaves a half-written file: temp + fsync + rename."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return json.loads(text) if text else None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        write_atomic(self.path, json.dumps(data, separators=(",", ":")).encode())

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Record:
    """A version as the coordinator keeps it: the public entry plus the head (manifest) to restore it."""

    entry: VersionEntry
    head: Head

    @property
    def version(self) -> int:
        return self.entry.version

    @property
    def hash(self) -> str:
        return self.entry.hash

    def key(self) -> tuple[int, str]:
        return (self.entry.version, self.entry.hash)

    @property
    def conflict(self) -> bool:
        return self.entry.kind is VersionKind.CONFLICT

    def rank(self) -> tuple[bool, tuple[int, bool, str]]:
        """Which record is the head: never a conflict loser, then the rules' winner order."""
        return (not self.conflict, head_key(self.head))

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Record:
        return cls(VersionEntry.model_validate(doc["entry"]), Head.model_validate(doc["head"]))


def _entry(head: Head, kind: VersionKind, restored_from: int | None) -> VersionEntry:
    return VersionEntry(version=head.version, hash=head.hash, size=head.size, author=head.author, time=head.time,
                        parent=head.parent, deleted=head.deleted, kind=kind, restored_from=restored_from)


class _Cache(CachingMiddleware):
    WRITE_CACHE_SIZE = 1 << 30  # flushed by History on a timer, not by count


class History:
    """Single owner: the coordinator's event loop."""

    def __init__(self, data_dir: Path, flush_interval: float = 1.0) -> None:
        self.root = data_dir / "history"
        self.root.mkdir(parents=True, exist_ok=True)
        self.flush_interval = flush_interval
        self._open: OrderedDict[Path, TinyDB] = OrderedDict()
        self._dirty: set[Path] = set()
        self._latest: dict[tuple[str, str], Record | None] = {}
        self._last_flush = time.monotonic()

    # -- blocks ---------------------------------------------------------------------------------
    def _dir(self, space: str, file_id: str) -> Path:
        return self.root / space / disk_name(file_id)

    def _path(self, space: str, file_id: str, n: int) -> Path:
        return self._dir(space, file_id) / f"{n:06d}.json"

    def _block(self, space: str, file_id: str, n: int) -> TinyDB:
        path = self._path(space, file_id, n)
        db = self._open.get(path)
        if db is not None:
            self._open.move_to_end(path)
            return db
        db = TinyDB(str(path), storage=_Cache(AtomicJSONStorage))
        self._open[path] = db
        while len(self._open) > MAX_OPEN_BLOCKS:
            old_path, old = self._open.popitem(last=False)
            old.close()  # CachingMiddleware flushes on close
            self._dirty.discard(old_path)
        return db

    def _blocks(self, space: str, file_id: str) -> list[int]:
        """Block numbers on disk, plus blocks still only in the write cache."""
        d = self._dir(space, file_id)
        found = {int(p.stem) for p in d.glob("[0-9]*.json")} if d.is_dir() else set()
        found |= {int(p.stem) for p in self._open if p.parent == d}
        return sorted(found)

    # -- writes ---------------------------------------------------------------------------------
    def record(self, space: str, head: Head, *, conflict: bool = False) -> bool:
        """Record a head (``conflict``: a concurrent edit that lost, never the latest); returns
        False if this (version, hash) is already in the history."""
        n = (head.version - 1) // BLOCK
        db = self._block(space, head.file_id, n)
        q = Query()
        if db.contains((q.version == head.version) & (q.hash == head.hash)):
            return False
        cur = self.latest(space, head.file_id)  # loads it from disk before this record lands
        kind = VersionKind.RESTORE if head.restored_from is not None else VersionKind.EDIT
        if conflict:
            kind = VersionKind.CONFLICT
        rec = Record(_entry(head, kind, head.restored_from), head)
        self._remember_id(space, head.file_id)
        db.insert({"version": head.version, "hash": head.hash, "recorded_at": time.time(),
                   "entry": rec.entry.model_dump(mode="json"), "head": head.model_dump(mode="json")})
        self._dirty.add(self._path(space, head.file_id, n))
        if not conflict and (cur is None or rec.rank() > cur.rank()):
            self._latest[(space, head.file_id)] = rec
        self.maybe_flush()
        return True

    def mark_conflict(self, space: str, file_id: str, version: int, digest: str, *, conflict: bool = True) -> None:
        """Mark a recorded version as a concurrent edit that lost (it stops being the latest), or
        with ``conflict=False`` as an ordinary edit again."""
        q = Query()
        n = (version - 1) // BLOCK
        db = self._block(space, file_id, n)
        for doc in db.search((q.version == version) & (q.hash == digest)):
            rec = Record.from_doc(doc)
            kind = VersionKind.CONFLICT if conflict else (
                VersionKind.RESTORE if rec.head.restored_from is not None else VersionKind.EDIT)
            db.update({"entry": {**doc["entry"], "kind": kind.value}}, doc_ids=[doc.doc_id])
        self._dirty.add(self._path(space, file_id, n))
        self._latest.pop((space, file_id), None)

    def mark_pruned(self, space: str, file_id: str, versions: set[tuple[int, str]]) -> None:
        q = Query()
        for version, digest in versions:
            n = (version - 1) // BLOCK
            db = self._block(space, file_id, n)
            for doc in db.search((q.version == version) & (q.hash == digest)):
                entry = {**doc["entry"], "pruned": True}
                db.update({"entry": entry}, doc_ids=[doc.doc_id])
            self._dirty.add(self._path(space, file_id, n))

    def _remember_id(self, space: str, file_id: str) -> None:
        """Each file's folder names its file id (folder names may be digests of long ids)."""
        marker = self._dir(space, file_id) / ID_FILE
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, file_id.encode())

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        """Write every changed block; a block that fails stays dirty and is retried next time."""
        for path in list(self._dirty):
            db = self._open.get(path)
            try:
                if db is not None:
                    db.storage.flush()
            except OSError as exc:
                log.error("writing history block %s failed: %s", path, exc.strerror or exc)
                continue
            self._dirty.discard(path)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        for db in self._open.values():
            db.close()
        self._open.clear()

    # -- reads ----------------------------------------------------------------------------------
    def records(self, space: str, file_id: str) -> list[Record]:
        """Every recorded version, newest first."""
        out: list[Record] = []
        for n in self._blocks(space, file_id):
            out.extend(Record.from_doc(d) for d in self._block(space, file_id, n).all())
        out.sort(key=Record.key, reverse=True)
        return out

    def page(self, space: str, file_id: str, offset: int, limit: int) -> tuple[int, list[VersionEntry]]:
        """(total, entries) newest first, reading only the blocks the page needs."""
        blocks = self._blocks(space, file_id)
        counts = [len(self._block(space, file_id, n)) for n in blocks]
        total = sum(counts)
        out: list[Record] = []
        skip = offset
        for n, count in zip(reversed(blocks), reversed(counts), strict=True):
            if skip >= count:
                skip -= count
                continue
            recs = sorted((Record.from_doc(d) for d in self._block(space, file_id, n).all()), key=Record.key,
                          reverse=True)
            out.extend(recs[skip : skip + limit - len(out)])
            skip = 0
            if len(out) >= limit:
                break
        return total, [r.entry for r in out]

    def recent_conflicts(self, space: str, file_id: str, lookback: int) -> list[Record]:
        """Conflict records among the newest ``lookback`` versions (the last block or two)."""
        out: list[Record] = []
        seen = 0
        for n in reversed(self._blocks(space, file_id)):
            docs = self._block(space, file_id, n).all()
            out.extend(r for r in map(Record.from_doc, docs) if r.conflict)
            seen += len(docs)
            if seen >= lookback:
                break
        return out

    def get(self, space: str, file_id: str, version: int) -> Record | None:
        """The winning record of ``version`` (conflict losers last, then the rules' order)."""
        q = Query()
        docs = self._block(space, file_id, (version - 1) // BLOCK).search(q.version == version)
        return max((Record.from_doc(d) for d in docs), key=Record.rank, default=None)

    def latest(self, space: str, file_id: str) -> Record | None:
        key = (space, file_id)
        if key not in self._latest:
            best = None
            for n in reversed(self._blocks(space, file_id)):
                recs = [Record.from_doc(d) for d in self._block(space, file_id, n).all()]
                recs = [r for r in recs if not r.conflict]
                if recs:
                    best = max(recs, key=Record.rank)
                    break
            self._latest[key] = best
        return self._latest[key]

    def spaces(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def files(self, space: str) -> Iterator[str]:
        d = self.root / space
        if d.is_dir():
            for p in sorted(d.iterdir()):
                marker = p / ID_FILE
                file_id = marker.read_text() if marker.is_file() else ""
                if file_id:
                    yield file_id
