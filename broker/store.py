"""The coordinator's content-addressed blob store: chunks and manifest pages under ``DATA/chunks``.

Blobs are stored once however many files and versions use them, in fan-out folders by hash
prefix, written atomically (temp + fsync + rename) and verified on write and on read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import blake3

log = logging.getLogger("atrius.store")


class StoreError(RuntimeError):
    """A blob could not be stored (disk full, permissions); nothing already stored is affected."""


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root / "chunks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.corrupt_found = 0

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest[2:4] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, digest: str, data: bytes | memoryview) -> bool:
        """Store a blob; returns False when it was already there.  Raises StoreError on I/O failure."""
        if blake3.blake3(data).hexdigest() != digest:
            raise StoreError(f"refusing blob {digest[:12]}: content does not match its hash")
        dest = self.path(digest)
        if dest.exists():
            with contextlib.suppress(OSError):
                os.utime(dest)  # in use again: a retention sweep running now must not delete it
            return False
        tmp = dest.with_name(f".{digest}.{os.getpid()}.tmp")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"writing blob {digest[:12]} to {dest.parent}: {exc.strerror or exc}") from exc
        return True

    def get(self, digest: str) -> bytes | None:
        """A verified blob, or None.  A corrupt file is reported and moved aside, never served."""
        p = self.path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("reading blob %s: %s", digest[:12], exc)
            return None
        if blake3.blake3(data).hexdigest() != digest:
            log.error("blob %s is corrupt on disk; moved aside and not served", digest[:12])
            self.corrupt_found += 1
            with contextlib.suppress(OSError):
                os.replace(p, p.with_name(p.name + ".corrupt"))
            return None
        return data

    def is_corrupt(self, digest: str) -> bool:
        """A copy of this blob was found corrupt and moved aside (and no good copy replaced it)."""
        p = self.path(digest)
        return not p.exists() and p.with_name(p.name + ".corrupt").exists()

    def sweep(self, keep: set[str], older_than: float) -> int:
        """Delete blobs not in ``keep`` last written before ``older_than`` (a blob written since the
        mark phase began may belong to a version recorded meanwhile)."""
        removed = 0
        for p in self.root.glob("*/*/*"):
            name = p.name
            if name.startswith(".") or name in keep:
                continue
            try:
                if p.stat().st_mtime < older_than:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
