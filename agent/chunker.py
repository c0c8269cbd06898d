"""Scan stage: cuts a file into content-defined chunks (FastCDC) hashed with BLAKE3, streaming."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import blake3
from pyfastcdc import FastCDC

from schemas.frames import AVG_CHUNK, MAX_CHUNK, MIN_CHUNK
from schemas.manifest import ChunkRef

_CDC = FastCDC(avg_size=AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK, normalized_chunking=1)
READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class Scan:
    hash: str
    size: int
    chunks: tuple[ChunkRef, ...]
    stat: FileStat


class FileChanged(Exception):
    """The file changed while it was being read; scan it again after it settles."""


TRUST_STAT_AFTER_NS = 2_000_000_000
"""A file's (size, mtime_ns, inode) stands for its content only once it is older than this: a write
within the file system's timestamp tick after we hashed it would leave the stat unchanged."""


def stat_is_settled(st: FileStat) -> bool:
    """Whether a stat is old enough to stand for the content it was hashed with."""
    return time.time_ns() - st.mtime_ns > TRUST_STAT_AFTER_NS


def stat_of(path: Path) -> FileStat | None:
    try:
        return FileStat.of(os.stat(path))
    except FileNotFoundError:
        return None


class NotAFile(OSError):
    """The path exists but is not a regular file (a folder, FIFO, device...)."""


def _open_regular(path: Path) -> tuple[int, FileStat]:
    """Open without blocking (a FIFO would hang a plain open) and insist on a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotAFile(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd, FileStat.of(st)


def hash_file(path: Path) -> tuple[str, FileStat]:
    """Whole-content BLAKE3 of ``path``, streaming; raises FileChanged if it changed meanwhile."""
    fd, before = _open_regular(path)
    with open(fd, "rb") as fh:
        h = blake3.blake3()
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    after = stat_of(path)
    if after != before:
        raise FileChanged(str(path))
    return h.hexdigest(), before


def scan_file(path: Path) -> Scan:
    """Chunk and hash ``path`` in one streaming pass; memory stays at one chunk plus the read buffer."""
    whole = blake3.blake3()
    refs: list[ChunkRef] = []
    size = 0
    fd, before = _open_regular(path)
    with open(fd, "rb", buffering=READ_BUFFER) as fh:
        for chunk in _CDC.cut_stream(fh):
            data = chunk.data
            whole.update(data)
            refs.append(ChunkRef(blake3.blake3(data).hexdigest(), chunk.length))
            size += chunk.length
    after = stat_of(path)
    if after != before or size != before.size:
        raise FileChanged(str(path))
    return Scan(whole.hexdigest(), size, tuple(refs), before)
