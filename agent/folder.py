"""Synced folders: owns the local view of one folder tree and turns what changed into file work.

Watch events inside the folder are hints: the paths they name are looked at again after the
settle time (all of them together, so a rename's "gone here" and "appeared there" meet), and a
light rescan of the whole tree runs after every (re)connect and every ``rescan_seconds``.  A look
compares what is on disk with what each file's owner (:class:`agent.sync.FileTask`) last
observed; content is hashed only when (size, mtime_ns, inode) differ from the hash cache.  Then:

- a file that appeared with the content of a file that vanished is a rename: the new path is
  published as a move (``moved_from``, no data sent) and the old one as a deletion (``moved_to``);
- any other new or changed file is handed to its owner to scan and publish;
- a file that vanished is published as a deletion (receivers move their copy into snapshots);
- folders are entries too (kind ``dir``): created and removed folders, empty ones included, are
  published, and a folder whose deletion arrives is removed once the files in it are gone.

Paths from the wire are checked before anything is written: inside the folder, no symbolic link
on the way, not ignored, and (on a case-insensitive file system) no clash with a name that
differs only in case.  Symbolic links inside the folder are skipped with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat as statmod
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.chunker import FileChanged, FileStat, hash_file, stat_is_settled
from agent.config import FolderEntry
from agent.ignore import IgnoreRules
from schemas.messages import EMPTY_HASH, EntryKind, Head, encode
from schemas.paths import case_clashes, parents
from schemas.rules import content_of, next_vector, next_version, supersedes
from schemas.topics import head_topic

if TYPE_CHECKING:
    from agent.sync import Engine, FileTask

log = logging.getLogger("atrius.folder")

MAX_SETTLE_WAIT = 2.0
"""A folder under constant change is still looked at every this many seconds."""
HASH_BATCH = 64


class UnsafePath(ValueError):
    """A path from the wire that must not be written (symlink on the way, ignored, clash)."""


def _under(rel: str, root: str) -> bool:
    return root == "" or rel == root or rel.startswith(root + "/")


class FolderTask:
    """Single owner of one synced folder's local view (observed folders, pending looks)."""

    def __init__(self, engine: Engine, entry: FolderEntry, skip: Iterable[Path] = ()) -> None:
        self.engine = engine
        self.entry = entry
        self.root = entry.path
        self.rules = IgnoreRules(entry.ignore)
        self.skip = {Path(p) for p in skip}
        self.files: dict[str, FileTask] = {}
        self.pending: set[str] = set()
        self.observed_dirs: set[str] = set()
        self.pending_rmdir: set[str] = set()
        self.wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._first_pending = 0.0
        self._warned: set[str] = set()
        self.case_insensitive = False

    # -- names -------------------------------------------------------------------------------
    def file_id(self, rel: str) -> str:
        return f"{self.entry.folder_id}/{rel}"

    def rel_of(self, path: Path) -> str | None:
        if path == self.root:
            return ""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return None

    def _warn_once(self, key: str, text: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(text, *args)

    # -- hints (on the loop, never block) ------------------------------------------------------
    def hint(self, path: Path) -> None:
        rel = self.rel_of(path)
        if rel is not None:
            self.hint_rel(rel)

    def hint_rel(self, rel: str) -> None:
        loop = asyncio.get_running_loop()
        if not self.pending:
            self._first_pending = loop.time()
        self.pending.add(rel)
        if self._timer is not None:
            self._timer.cancel()
        settle = self.engine.cfg.settle_ms / 1000
        due = min(loop.time() + settle, self._first_pending + max(settle, MAX_SETTLE_WAIT))
        self._timer = loop.call_at(due, self._settled)

    def _settled(self) -> None:
        self._timer = None
        self.wake.set()

    def rescan_all(self) -> None:
        self.pending.add("")
        self.wake.set()

    # -- the owner's loop ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.case_insensitive = await asyncio.to_thread(self._probe_case)
        except OSError as exc:
            log.error("folder %s: cannot use %s: %s", self.entry.folder_id, self.root, exc.strerror or exc)
        last_error = ""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self._timer is not None or not self.engine.session.connected:
                continue  # still settling, or offline: the look happens after reconnecting
            await self.engine.ready_after_connect()
            rels, self.pending = self.pending, set()
            if not rels:
                continue
            try:
                await self._look(rels)
                last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving; look again later
                if str(exc) != last_error:
                    log.error("folder %s: %s", self.entry.folder_id, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                    last_error = str(exc)
                self.pending |= rels
                asyncio.get_running_loop().call_later(3.0, self.wake.set)

    def _probe_case(self) -> bool:
        probe = self.root / f".case-probe.atrius-{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"")
        try:
            return (self.root / probe.name.upper()).exists()
        finally:
            probe.unlink(missing_ok=True)

    # -- look: disk vs last observation -----------------------------------------------------------
    def _walk(self, rels: set[str]) -> tuple[dict[str, FileStat], set[str], list[str]]:
        """Files (with stat) and folders under the looked-at paths; ignored paths left out."""
        files: dict[str, FileStat] = {}
        dirs: set[str] = set()
        links: list[str] = []
        roots = [""] if "" in rels else sorted(rels)
        stack: list[tuple[str, Path]] = []
        for rel in roots:
            path = self.root / rel if rel else self.root
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if rel and self.rules.ignored_path(rel, is_dir=statmod.S_ISDIR(st.st_mode)):
                continue
            if statmod.S_ISLNK(st.st_mode):
                links.append(rel)
            elif statmod.S_ISREG(st.st_mode):
                if path not in self.skip:
                    files[rel] = FileStat.of(st)
            elif statmod.S_ISDIR(st.st_mode):
                if rel:
                    dirs.add(rel)
                stack.append((rel, path))
        while stack:
            rel, path = stack.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue
            for e in entries:
                child = f"{rel}/{e.name}" if rel else e.name
                try:
                    if e.is_symlink():
                        if not self.rules.ignored(child):
                            links.append(child)
                        continue
                    if e.is_dir(follow_symlinks=False):
                        if not self.rules.ignored(child, is_dir=True) and Path(e.path) not in self.skip:
                            dirs.add(child)
                            stack.append((child, Path(e.path)))
                    elif (e.is_file(follow_symlinks=False) and not self.rules.ignored(child)
                          and Path(e.path) not in self.skip):
                        files[child] = FileStat.of(e.stat(follow_symlinks=False))
                except OSError:
                    continue
        return files, dirs, links

    def _hash_many(self, items: list[tuple[str, Path]]) -> list[tuple[str, str | None, FileStat | None]]:
        out: list[tuple[str, str | None, FileStat | None]] = []
        for rel, path in items:
            try:
                digest, st = hash_file(path)
                out.append((rel, digest, st))
            except (FileChanged, OSError):
                out.append((rel, None, None))  # being written, or gone: looked at again
        return out

    async def _look(self, rels: set[str]) -> None:
        files, dirs, links = await asyncio.to_thread(self._walk, rels)
        roots = [""] if "" in rels else sorted(rels)
        for rel in links:
            self._warn_once(f"link:{rel}", "folder %s: %s is a symbolic link; skipped (links are not followed)",
                            self.entry.folder_id, rel)
        for group in case_clashes(files).values():
            self._warn_once(f"case:{group}", "folder %s: %s differ only in letter case: they are one file on "
                            "Windows and macOS, where they will be reported as a conflict", self.entry.folder_id,
                            " and ".join(group))
        state = self.engine.state
        # What vanished: files whose last synced content is no longer on disk.
        gone: list[FileTask] = []
        for _rel, task in self._candidates(roots, files):
            if task.vanished():
                gone.append(task)
        # What appeared or changed, hashed only when the stat differs from what was observed.
        to_hash: list[tuple[str, Path]] = []
        for rel, st in files.items():
            found = self.engine.task_for(self.file_id(rel), create=True)
            if found is None or found.index_stat == st:
                continue
            cached = state.cached_hash(found.entry.file_id, (st.size, st.mtime_ns, st.inode))
            if cached is not None and stat_is_settled(st):
                found.observe(st, cached)
                if cached != content_of(found.known):
                    found.mark_dirty()
                continue
            to_hash.append((rel, found.entry.path))
        hashed: list[tuple[str, str | None, FileStat | None]] = []
        for i in range(0, len(to_hash), HASH_BATCH):
            hashed += await asyncio.to_thread(self._hash_many, to_hash[i : i + HASH_BATCH])
        by_content: dict[str, list[FileTask]] = {}
        for task in gone:
            if task.known is not None:
                by_content.setdefault(task.known.hash, []).append(task)
        for rel, digest, new_st in hashed:
            dest = self.files.get(rel)
            if dest is None:
                continue
            if digest is None or new_st is None:
                self.hint_rel(rel)  # still being written: look again when it settles
                continue
            fresh = dest.known is None or dest.known.deleted
            dest.observe(new_st, digest)
            sources = by_content.get(digest)
            if fresh and sources:
                src = sources.pop()
                log.info("%s: renamed to %s", src.entry.file_id, dest.entry.file_id)
                dest.request_move(src)
            elif digest != content_of(dest.known):
                dest.mark_dirty()
        for tasks in by_content.values():
            for task in tasks:
                task.request_delete(None)
        await self._look_dirs(dirs, roots)

    def _candidates(self, roots: list[str], present: dict[str, FileStat]) -> list[tuple[str, FileTask]]:
        """Known files under the looked-at paths that are not on disk now."""
        out: dict[str, FileTask] = {}  # (a file may be named by its own hint and by its folder's)
        wide = [r for r in roots if r == "" or r not in self.files]
        if wide:  # a whole folder (or a folder that vanished): every known file below it
            out.update((rel, t) for rel, t in self.files.items()
                       if rel not in present and any(_under(rel, r) for r in wide))
        out.update((r, self.files[r]) for r in roots if r in self.files and r not in present)
        return list(out.items())

    # -- folders as entries -------------------------------------------------------------------------
    async def _look_dirs(self, dirs: set[str], roots: list[str]) -> None:
        state = self.engine.state
        for rel in sorted(dirs):
            known = state.synced.get(self.file_id(rel))
            self.observed_dirs.add(rel)
            if rel in self.pending_rmdir:
                continue
            if known is None or known.deleted:
                await self._publish_dir(rel, deleted=False)
        for rel in sorted(self.observed_dirs, reverse=True):
            if rel in dirs or not any(_under(rel, r) for r in roots):
                continue
            self.observed_dirs.discard(rel)
            known = state.synced.get(self.file_id(rel))
            if known is not None and not known.deleted and known.kind is EntryKind.DIR:
                await self._publish_dir(rel, deleted=True)
        # Folders known as synced that are not on disk (removed while the agent was stopped).
        if "" in roots:
            for fid, head in list(state.synced.items()):
                if head.kind is EntryKind.DIR and not head.deleted and fid.startswith(self.entry.folder_id + "/"):
                    rel = fid[len(self.entry.folder_id) + 1 :]
                    if rel not in dirs and rel not in self.pending_rmdir and not self.rules.ignored_path(rel):
                        await self._publish_dir(rel, deleted=True)

    async def _publish_dir(self, rel: str, *, deleted: bool) -> None:
        eng = self.engine
        if not eng.session.connected:
            self.pending.add(rel)
            return
        fid = self.file_id(rel)
        known = eng.state.synced.get(fid)
        version = next_version(known)
        me = eng.cfg.device
        head = Head(file_id=fid, hash=EMPTY_HASH, size=0, version=version, author=me, time=time.time(),
                    parent=known.hash if known else None, deleted=deleted, vector=next_vector(known, me, version),
                    kind=EntryKind.DIR)
        eng.state.set_synced(head)
        await eng.session.publish_paced(head_topic(eng.cfg.space, fid), encode(head), retain=True)
        log.info("%s: published folder %s (v%d)", fid, "deletion" if deleted else "entry", version)

    def on_dir_head(self, rel: str, head: Head) -> None:
        """A folder entry from another device: create the folder, or remove it once it is empty."""
        state = self.engine.state
        known = state.synced.get(head.file_id)
        if known is not None and not supersedes(head, known):
            return
        if known is not None and known.hash == head.hash and known.deleted == head.deleted:
            state.set_synced(head)
            return
        existed = (self.root / rel).is_dir()
        if self.rules.ignored_path(rel, is_dir=True):
            state.set_synced(head)
            return
        try:
            self._check_dir(rel)
        except UnsafePath as exc:
            self._warn_once(f"dir:{rel}", "%s: folder entry from %s not applied: %s", head.file_id, head.author, exc)
            return
        if head.deleted:
            state.set_synced(head)
            self.pending_rmdir.add(rel)
            self._try_rmdir(rel)
            return
        try:
            self.make_dirs(rel, include_self=True)
        except (UnsafePath, OSError) as exc:
            self._warn_once(f"dir:{rel}", "%s: folder from %s not created: %s", head.file_id, head.author, exc)
            return
        self.pending_rmdir.discard(rel)
        self.observed_dirs.add(rel)
        for p in parents(rel):
            self.pending_rmdir.discard(p)
        state.set_synced(head)
        if not existed:
            log.info("%s: folder created (from %s)", head.file_id, head.author)

    def _check_dir(self, rel: str) -> None:
        """Raise UnsafePath if a symbolic link (or a file) stands anywhere on the way to folder ``rel``."""
        path = self.root
        for part in rel.split("/"):
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
            if statmod.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{self.rel_of(path)} is a symbolic link here; not followed")
            if not statmod.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{self.rel_of(path)} is a file here, not a folder")

    def _try_rmdir(self, rel: str) -> bool:
        path = self.root / rel
        try:
            self._check_dir(rel)
        except UnsafePath:
            return False
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            return False  # not empty yet (its files' deletions may still be on their way) or in use
        else:
            log.info("%s: folder removed", self.file_id(rel))
        self.pending_rmdir.discard(rel)
        self.observed_dirs.discard(rel)
        return True

    def after_removal(self, rel: str) -> None:
        """A file at ``rel`` was removed or moved away: remove folders above it that were deleted."""
        for p in parents(rel):
            known = self.engine.state.synced.get(self.file_id(p))
            if p not in self.pending_rmdir and not (known is not None and known.deleted):
                break
            if not self._try_rmdir(p):
                break

    # -- safety of paths from the wire ---------------------------------------------------------------
    def check_target(self, rel: str) -> None:
        """Raise UnsafePath unless a file from the wire may be written at ``rel``."""
        if self.rules.ignored_path(rel):
            raise UnsafePath(f"{rel} matches an ignore pattern here")
        path = self.root
        parts = rel.split("/")
        for i, part in enumerate(parts):
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                break
            if statmod.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{'/'.join(parts[: i + 1])} is a symbolic link here; not followed")
            if i < len(parts) - 1 and not statmod.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{'/'.join(parts[: i + 1])} is a file here, not a folder")
            if i == len(parts) - 1 and statmod.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{rel} is a folder here")
        if self.case_insensitive:
            folded = rel.casefold()
            for other in self.files:
                if other != rel and other.casefold() == folded and self.files[other].local_hash is not None:
                    raise UnsafePath(f"{rel} and {other} differ only in letter case: one file on this file system "
                                     "(a conflict; rename one of them)")

    def make_dirs(self, rel: str, *, include_self: bool = False) -> None:
        """Create the folders above ``rel`` (and ``rel`` itself) one by one, never through a link."""
        parts = rel.split("/")
        upto = len(parts) if include_self else len(parts) - 1
        path = self.root
        for part in parts[:upto]:
            path = path / part
            try:
                os.mkdir(path)
            except FileExistsError:
                st = os.lstat(path)
                if not statmod.S_ISDIR(st.st_mode):
                    raise UnsafePath(f"{path} exists and is not a folder") from None
            self.observed_dirs.add(self.rel_of(path) or "")
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
