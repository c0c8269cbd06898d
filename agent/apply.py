"""Assemble, verify and apply stages: build a version in a temp file beside the target, then swap it in.

The file at a synced path is always a complete old or a complete new version: the new content is
written to ``.<name>.atrius-*.tmp`` in the same folder, every chunk and the whole file are
checked against their BLAKE3 hashes, the temp file is fsynced, and ``os.replace`` swaps it in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import blake3

from schemas.manifest import ChunkRef, placements

log = logging.getLogger("atrius.apply")

TEMP_MARK = ".atrius-"
TEMP_SUFFIX = ".tmp"


class ApplyError(RuntimeError):
    """A version could not be assembled or applied; the target is untouched."""


def temp_path_for(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARK}{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name and name.endswith(TEMP_SUFFIX)


def remove_stale_temps(target: Path) -> int:
    """Delete temp files an interrupted apply left beside ``target``."""
    n = 0
    prefix = f".{target.name}{TEMP_MARK}"
    with contextlib.suppress(FileNotFoundError):
        for p in target.parent.iterdir():
            if p.name.startswith(prefix) and p.name.endswith(TEMP_SUFFIX):
                p.unlink(missing_ok=True)
                n += 1
    return n


class Assembly:
    """A version under construction; a :class:`schemas.exchange.BlobSink` for fetched chunks."""

    def __init__(self, target: Path, size: int, entries: Iterable[ChunkRef]) -> None:
        self.target = target
        self.size = size
        self.where: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}
        for p in placements(entries):
            self.where.setdefault(p.hash, []).append(p.offset)
            self.lengths[p.hash] = p.length
        self.temp = temp_path_for(target)
        try:
            self._fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise ApplyError(f"creating temp file beside {target}: {exc}") from exc
        self.bytes_written = 0

    def put(self, digest: str, data: memoryview) -> None:
        if len(data) != self.lengths.get(digest, -1):
            raise ApplyError(f"chunk {digest[:12]} has the wrong length for {self.target}")
        for off in self.where[digest]:
            os.pwrite(self._fd, data, off)
            self.bytes_written += len(data)

    def copy_local(self, source: Path, index: dict[str, tuple[int, int]]) -> set[str]:
        """Copy the chunks the local file already has; return the hashes still to fetch."""
        needed = set(self.where)
        if not index:
            return needed
        try:
            src = os.open(source, os.O_RDONLY)
        except OSError:
            return needed
        try:
            for digest in list(needed):
                loc = index.get(digest)
                if loc is None or loc[1] != self.lengths[digest]:
                    continue
                data = os.pread(src, loc[1], loc[0])
                if blake3.blake3(data).hexdigest() == digest:
                    self.put(digest, memoryview(data))
                    needed.discard(digest)
        finally:
            os.close(src)
        return needed

    def finish(self, expected_hash: str) -> None:
        """fsync and verify the whole file; raises ApplyError (and removes the temp) on mismatch."""
        try:
            os.fsync(self._fd)
            h = blake3.blake3()
            off = 0
            while off < self.size:
                block = os.pread(self._fd, min(1 << 20, self.size - off), off)
                if not block:
                    break
                h.update(block)
                off += len(block)
        except OSError as exc:
            self.abort()
            raise ApplyError(f"writing {self.temp}: {exc}") from exc
        if h.hexdigest() != expected_hash:
            self.abort()
            raise ApplyError(f"assembled {self.target} does not match its head hash; discarded")
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.temp.unlink(missing_ok=True)

    def swap_in(self, mode: int | None) -> None:
        """Replace the target with the verified temp file, keeping the old file mode."""
        try:
            if mode is not None:
                os.chmod(self.temp, mode)
            else:
                os.chmod(self.temp, 0o666 & ~_UMASK)
            os.replace(self.temp, self.target)
            fd = os.open(self.target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.abort()
            raise ApplyError(f"replacing {self.target}: {exc}") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
