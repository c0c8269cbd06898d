"""Assemble, verify and apply stages: build a version aside, check it, then swap it in atomically.

The file at a synced path is always a complete old or a complete new version: the new content is
built in the state dir (resumable after a crash), every chunk and the whole file are checked
against their BLAKE3 hashes, the result is fsynced, and ``os.replace`` swaps it in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

import blake3

from schemas.manifest import ChunkRef, placements
from schemas.names import disk_name

log = logging.getLogger("atrius.apply")

TEMP_MARK = ".atrius-"
TEMP_SUFFIX = ".tmp"


class ApplyError(RuntimeError):
    """A version could not be assembled or applied; the target is untouched."""


class ContentMismatch(ApplyError):
    """Every chunk verified, yet the whole file does not hash to the head's hash: a bad head."""


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
    """A version under construction, resumable: a :class:`schemas.exchange.BlobSink` for fetched chunks.

    The content is built in ``<state_dir>/partial/<key>.<hash>.part``; every chunk written is
    recorded in a ``.done`` journal beside it.  If the agent is killed, the next attempt at the same
    version re-verifies the journalled chunks and fetches only the rest.  When complete and verified
    the part file is renamed over the target (same file system) or copied to a temp file beside the
    target and renamed (across file systems), so the target is replaced atomically either way.
    """

    def __init__(self, partial_dir: Path, target: Path, file_id: str, file_hash: str, size: int,
                 entries: Iterable[ChunkRef]) -> None:
        self.target = target
        self.size = size
        self.where: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}
        for p in placements(entries):
            self.where.setdefault(p.hash, []).append(p.offset)
            self.lengths[p.hash] = p.length
        key = disk_name(file_id)
        stem = f"{key}.{file_hash[:24]}"
        self.part = partial_dir / f"{stem}.part"
        self.journal = partial_dir / f"{stem}.done"
        self._fd = self._journal_fd = -1
        ours = re.compile(re.escape(key) + r"\.[0-9a-f]{24}\.(part|done)")
        try:
            partial_dir.mkdir(parents=True, exist_ok=True)
            for old in partial_dir.iterdir():
                if ours.fullmatch(old.name) and old not in (self.part, self.journal):
                    old.unlink(missing_ok=True)  # a superseded version's partial of this file
            self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
            self.done = self._resume()
            self._journal_fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            self._close()
            raise ApplyError(f"creating partial file in {partial_dir}: {exc.strerror or exc}") from exc
        self.resumed = len(self.done)

    def _resume(self) -> set[str]:
        """Chunks a previous attempt journalled whose bytes in the part file still verify."""
        done: set[str] = set()
        try:
            raw = self.journal.read_bytes()
        except FileNotFoundError:
            return done
        for i in range(0, len(raw) - len(raw) % 32, 32):
            digest = raw[i : i + 32].hex()
            if digest in done or digest not in self.where:
                continue
            data = os.pread(self._fd, self.lengths[digest], self.where[digest][0])
            if blake3.blake3(data).hexdigest() == digest:
                done.add(digest)
        return done

    def put(self, digest: str, data: memoryview) -> None:
        if len(data) != self.lengths.get(digest, -1):
            raise ApplyError(f"chunk {digest[:12]} has the wrong length for {self.target}")
        for off in self.where[digest]:
            os.pwrite(self._fd, data, off)
        os.write(self._journal_fd, bytes.fromhex(digest))
        self.done.add(digest)

    def copy_local(self, source: Path, index: dict[str, tuple[int, int]]) -> set[str]:
        """Copy the chunks the local file already has; return the hashes still to fetch."""
        needed = set(self.where) - self.done
        if not index or not needed:
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
        """fsync and verify the whole file; on mismatch the partial is discarded and ApplyError raised."""
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
            raise ApplyError(f"writing {self.part}: {exc.strerror or exc}") from exc
        if h.hexdigest() != expected_hash:
            self.discard()
            raise ContentMismatch(f"assembled {self.target} does not match its head hash; discarded")

    def _close(self) -> None:
        for name in ("_fd", "_journal_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def abort(self) -> None:
        """Stop for now; the partial stays for the next attempt at this version."""
        self._close()

    def discard(self) -> None:
        self._close()
        self.part.unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)

    def swap_in(self, mode: int | None) -> None:
        """Replace the target with the verified content, keeping the old file mode."""
        self._close()
        try:
            os.chmod(self.part, mode if mode is not None else 0o666 & ~_UMASK)
            if os.stat(self.part).st_dev == os.stat(self.target.parent).st_dev:
                os.replace(self.part, self.target)
            else:
                temp = temp_path_for(self.target)
                try:
                    shutil.copy2(self.part, temp)
                    with open(temp, "rb+") as fh:
                        os.fsync(fh.fileno())
                    os.replace(temp, self.target)
                finally:
                    temp.unlink(missing_ok=True)
                self.part.unlink(missing_ok=True)
            fd = os.open(self.target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ApplyError(f"replacing {self.target}: {exc.strerror or exc}") from exc
        self.journal.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
