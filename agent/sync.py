"""The sync engine: owns every listed file's sync state and runs the pipeline for it.

scan -> chunk -> announce (head) -> transfer (pull, windowed) -> assemble -> verify -> apply

One :class:`FileTask` per listed file is the single owner of that file's state; the MQTT thread,
the watchdog thread and timers only wake it.  The :class:`Engine` owns the MQTT session, the
presence map and the blob exchange, and routes each validated message to its owner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import __version__
from agent.apply import Assembly, ContentMismatch, remove_stale_temps
from agent.chunker import FileChanged, FileStat, Scan, hash_file, scan_file, stat_is_settled, stat_of
from agent.commands import CommandError, connect_rpc, head_pages, human_size
from agent.config import AgentConfig, FileEntry
from agent.events import (
    Connection,
    Direction,
    EventSink,
    HeadSeen,
    LocalChanged,
    LocalState,
    LockSeen,
    NullSink,
    PresenceSeen,
    TransferProgress,
)
from agent.folder import FolderTask, UnsafePath
from agent.state import AgentState
from agent.watcher import QUICK_MS, Watcher
from schemas.exchange import HUB, BlobExchange, FetchAborted, FetchFailed, device_provider
from schemas.locks import describe
from schemas.manifest import (
    ChunkRef,
    ManifestError,
    blob_hash,
    decode_inline,
    decode_page,
    encode_pages,
    inline_page,
)
from schemas.messages import (
    EMPTY_HASH,
    MAX_ACTIVE_FILES,
    EntryKind,
    Head,
    LockState,
    MessageError,
    Presence,
    PresenceState,
    decode_head,
    decode_lock,
    decode_presence,
    encode,
)
from schemas.mqtt import STATE_QOS, MqttSession, Will
from schemas.rules import (
    RemoteAction,
    Startup,
    at_startup,
    content_of,
    merge_same,
    next_vector,
    next_version,
    on_remote_head,
    presence_is_current,
)
from schemas.topics import (
    TopicError,
    TopicKind,
    all_heads_filter,
    all_locks_filter,
    all_presence_filter,
    conflict_topic,
    device_data_topic,
    device_request_topic,
    head_topic,
    lock_topic,
    parse_topic,
    presence_topic,
)

log = logging.getLogger("atrius.agent")

RETAINED_GRACE = 0.7
"""Seconds after (re)connecting during which retained heads are expected to arrive."""
FETCH_GIVE_UP = 30.0
RETRY_DELAY = 3.0
LOCK_SETTLE = 0.15
"""A lock change takes effect after this quiet time, so a lock message that is not the
coordinator's (which re-asserts its own state at once) never touches the file."""
ACTIVITY_DELAY = 0.2
"""Presence is re-published at most this often when the files being sent or received change."""
SENDING_HOLD = 2.0
"""A file counts as "sending" for this long after its last chunk was served."""
MAX_CONFLICT_SOURCES = 16
MAX_PARALLEL_APPLIES = 16
"""Files fetched at once: enough to fill the pipe with small files, few enough for the brokers'
per-client queues (Mosquitto drops past max_queued_messages)."""
STATE_SAVE_INTERVAL = 2.0
REANNOUNCE_AFTER = 5.0
"""After (re)connecting, a synced head the broker did not send within this long is published again."""

WRITE_BITS = 0o222
PROGRESS_EVERY = 0.1
"""Seconds between transfer progress events for the UI."""


class ScanError(RuntimeError):
    """A listed file that exists but cannot be read; retried until it can."""


def conflict_name(path: Path, device: str, when: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when if when is not None else time.time()))
    candidate = path.with_name(f"{path.stem}.conflict-{device}-{stamp}{path.suffix}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.conflict-{device}-{stamp}-{n}{path.suffix}")
    return candidate


@dataclass
class _PageSink:
    pages: dict[str, bytes]

    def put(self, digest: str, data: memoryview) -> None:
        self.pages[digest] = bytes(data)


class _ProgressSink:
    """Passes chunks on to the assembly and reports the bytes received to the UI (at most every
    PROGRESS_EVERY seconds, and at the end)."""

    def __init__(self, asm: Assembly, events: EventSink, file_id: str, peer: str, done: int, total: int) -> None:
        self.asm, self.events, self.file_id, self.peer = asm, events, file_id, peer
        self.done, self.total = done, total
        self._last = 0.0
        self._report(finished=False)

    def put(self, digest: str, data: memoryview) -> None:
        self.asm.put(digest, data)
        self.done += len(data)
        if time.monotonic() - self._last >= PROGRESS_EVERY:
            self._report(finished=False)

    def _report(self, *, finished: bool) -> None:
        self._last = time.monotonic()
        self.events.emit(TransferProgress(self.file_id, Direction.IN, self.done, self.total, self.peer,
                                          finished=finished, ok=self.done >= self.total))

    def finish(self) -> None:
        self._report(finished=True)


class FileTask:
    """Single owner of one file's sync state."""

    def __init__(self, engine: Engine, entry: FileEntry) -> None:
        self.engine = engine
        self.entry = entry
        self.known: Head | None = engine.state.synced.get(entry.file_id)
        self.remote: Head | None = None
        self.remote_conn = -1
        self.remote_seq = 0
        self._announced_seq = -1
        self.index: dict[str, tuple[int, int]] = {}
        self.index_stat: FileStat | None = None
        self.local_hash: str | None = None
        self.dirty = False
        self.reconcile_due = True
        self.bad_heads: set[str] = set()
        self._applying: Head | None = None
        self.wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._missing_logged = False
        self.lock: LockState | None = None
        self._lock_pending: LockState | None = None
        self._lock_timer: asyncio.TimerHandle | None = None
        self.lock_conn = -1
        self.last_scan: Scan | None = None
        self.folder: FolderTask | None = None
        self.rel = ""
        self._missing_seen = False
        self.expect_gone = False
        """Its content was moved away by an applied rename: its own deletion is on the way."""
        self._move_src: FileTask | None = None
        self._delete_req: tuple[str | None] | None = None
        self._announce_if_missing = False

    # -- hints from other owners (run on the loop, never block) -----------------------------
    def hint_local(self, quick: bool) -> None:
        delay = (QUICK_MS if quick else self.engine.cfg.settle_ms) / 1000
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._timer is not None:
            if quick and self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = loop.call_at(due, self._settled)

    def _settled(self) -> None:
        self._timer = None
        self.dirty = True
        self.wake.set()

    def on_remote(self, head: Head) -> None:
        self.remote_conn = self.engine.session.connect_count
        if head.hash in self.bad_heads:
            return
        # Track the last arrival, not the best: it is what the broker now retains, so a loser
        # arriving after our winner is noticed (and answered with REASSERT).
        if self.remote is None or (head.version, head.hash) != (self.remote.version, self.remote.hash):
            self.remote = head
            self.remote_seq += 1
            self.wake.set()
            applying = self._applying
            if applying is not None and on_remote_head(head, applying, "") is RemoteAction.APPLY:
                # Stop fetching a version nobody will want; its partial stays in case it comes back.
                self.engine.exchange.abort(self.engine.cfg.space, self.entry.file_id, f"superseded by v{head.version}")

    def on_reconnected(self) -> None:
        self.reconcile_due = True
        self.dirty = True
        self.wake.set()

    # -- requests from the folder owner -------------------------------------------------------
    def observe(self, st: FileStat, digest: str) -> None:
        """The folder hashed the file: record what is on disk (index from the manifest if synced)."""
        if self.local_hash != digest or self.index_stat != st:
            self.local_hash = digest
            self.index_stat = st
            self.index = self._index_of(self.known) if digest == content_of(self.known) else {}
            self.engine.state.set_stat(self.entry.file_id, (st.size, st.mtime_ns, st.inode), digest)
            self.engine.register_chunks(self)

    def vanished(self) -> bool:
        """The synced content is gone from disk (and not because we moved it for a rename)."""
        return (self.known is not None and not self.known.deleted and not self.expect_gone
                and self._move_src is None and self._delete_req is None and stat_of(self.entry.path) is None)

    def mark_dirty(self) -> None:
        self.dirty = True
        self.wake.set()

    def request_move(self, src: FileTask) -> None:
        self._move_src = src
        src.expect_gone = True
        self.wake.set()

    def request_delete(self, moved_to: str | None) -> None:
        self._delete_req = (moved_to,)
        self.wake.set()

    # -- locks -------------------------------------------------------------------------------
    def on_lock(self, lock: LockState | None) -> None:
        self.lock_conn = self.engine.session.connect_count
        self._lock_pending = lock
        if self._lock_timer is None:
            self._lock_timer = asyncio.get_running_loop().call_later(LOCK_SETTLE, self._lock_settled)

    def _lock_settled(self) -> None:
        self._lock_timer = None
        self.set_lock(self._lock_pending)

    def set_lock(self, lock: LockState | None) -> None:
        old, self.lock = self.lock, lock
        if old != lock:
            fid = self.entry.file_id
            self.engine.events.emit(LockSeen(fid, lock))
            if lock is None:
                log.info("%s: unlocked", fid)
            elif old is None or old.holder != lock.holder:
                log.info("%s: locked by %s", fid, describe(lock) if lock.holder != self.engine.cfg.device else
                         f"this device ({describe(lock)})")
        self.enforce_mode()
        if old != lock:
            self.dirty = True  # an edit made while it was locked is looked at again
            self.wake.set()

    def locked_by_other(self) -> bool:
        return self.lock is not None and self.lock.holder != self.engine.cfg.device

    def enforce_mode(self) -> None:
        """Read-only while another device holds the lock; the original mode back afterwards."""
        path, fid, state = self.entry.path, self.entry.file_id, self.engine.state
        try:
            mode = os.stat(path).st_mode & 0o7777
            saved = state.locked_modes.get(fid)
            if self.locked_by_other():
                if saved is None:
                    state.set_locked_mode(fid, mode)
                if mode & WRITE_BITS:
                    os.chmod(path, mode & ~WRITE_BITS)
            elif saved is not None:
                if mode != saved:
                    os.chmod(path, saved)
                state.set_locked_mode(fid, None)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s: cannot change the permissions of %s: %s", fid, path, exc.strerror or exc)

    # -- the owner's loop ----------------------------------------------------------------------
    async def run(self) -> None:
        removed = remove_stale_temps(self.entry.path)
        if removed:
            log.info("%s: removed %d temp file(s) left by an interrupted apply", self.entry.file_id, removed)
        last_error = ""
        while True:
            try:
                await self._step()
                last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the other files; say it once, retry quietly
                text = str(exc)
                if text != last_error:
                    log.error("%s: %s", self.entry.file_id, text, exc_info=log.isEnabledFor(logging.DEBUG))
                    last_error = text
                self.dirty = True
                self.engine.wake_later(self, RETRY_DELAY)
            await self.wake.wait()
            self.wake.clear()

    async def _step(self) -> None:
        eng = self.engine
        if not eng.session.connected:
            return
        if self.reconcile_due:
            await eng.ready_after_connect()
            if not eng.session.connected:
                return
            self.reconcile_due = False
            await self._reconcile()
        if self._announce_if_missing and self.folder is not None and eng.catching_up:
            eng.wake_later(self, 1.0)  # the coordinator's list of heads may still bring it
        elif self._announce_if_missing and self.engine.session.connected:
            self._announce_if_missing = False
            if self.remote_conn != eng.session.connect_count and self.known is not None and (
                    content_of(self.known) == self.local_hash):
                log.info("%s: the broker holds no head; re-publishing v%d", self.entry.file_id, self.known.version)
                await self._announce(self.known)
        if self._move_src is not None:
            src, self._move_src = self._move_src, None
            await self._publish_moved(src)
            src.request_delete(self.entry.file_id)
        if self._delete_req is not None:
            (moved_to,), self._delete_req = self._delete_req, None
            await self.publish_deletion(moved_to)
        if self.remote is not None:
            action = on_remote_head(self.remote, self.known, eng.cfg.device)
            if (action is RemoteAction.IGNORE and self.known is not None and self.remote.hash == self.known.hash
                    and self.remote.deleted == self.known.deleted):
                merged = merge_same(self.known, self.remote)
                if merged is not self.known:
                    self._set_known(merged)  # the same content by another way: its history is ours too
            if action in (RemoteAction.APPLY, RemoteAction.APPLY_KEEP_LOCAL):
                await self._apply(self.remote, keep_local=action is RemoteAction.APPLY_KEEP_LOCAL)
            elif action is RemoteAction.REASSERT and self.known is not None and self._announced_seq != self.remote_seq:
                # (not when we announced ours after this head arrived: ours replaced it already)
                log.info("%s: broker holds an older head (v%d); re-publishing v%d",
                         self.entry.file_id, self.remote.version, self.known.version)
                await self._announce(self.known)
        if self.dirty:
            self.dirty = False
            await self._check_local()

    async def _reconcile(self) -> None:
        """At start-up and after each reconnect: compare local, last synced and retained head."""
        await self._observe()
        conn = self.engine.session.connect_count
        if self.lock_conn != conn and self._lock_timer is None:
            self.set_lock(None)  # no retained lock arrived: it was released (or never taken)
        remote = self.remote if self.remote_conn == conn else None
        decision = at_startup(self.local_hash, self.known, remote, self.engine.cfg.device)
        fid = self.entry.file_id
        log.debug("%s: reconcile -> %s", fid, decision.value)
        if decision is Startup.IN_SYNC and remote is not None:
            self._set_known(merge_same(remote, self.known) if self.known is not None and
                            self.known.hash == remote.hash and self.known.deleted == remote.deleted else remote)
        elif decision is Startup.APPLY_REMOTE and remote is not None:
            await self._apply(remote, keep_local=False)
        elif decision is Startup.CONFLICT and remote is not None:
            await self._apply(remote, keep_local=True)
        elif decision is Startup.PUBLISH_LOCAL:
            if self.known is not None and content_of(self.known) == self.local_hash and remote is None:
                # No retained head arrived (yet): the broker may have lost it, or it is still on its
                # way among thousands.  Put ours back only if none has come after a while.
                self._announce_if_missing = True
                self.engine.wake_later(self, REANNOUNCE_AFTER)
            elif self.known is not None and content_of(self.known) == self.local_hash:
                await self._announce(self.known)
            elif self.folder is not None and (self.local_hash is None or content_of(self.known) is None):
                self.folder.hint_rel(self.rel)  # a new or vanished file: the folder pairs renames
            else:
                await self._check_local()

    async def _observe(self) -> None:
        """What is on disk now, cheaply: a file whose (size, mtime_ns, inode) match the hash cache is
        not read again (its chunk index comes from the synced manifest); anything else is scanned."""
        path = self.entry.path
        st = stat_of(path)
        if st is None:
            self.index, self.index_stat, self.local_hash = {}, None, None
            return
        cached = self.engine.state.cached_hash(self.entry.file_id, (st.size, st.mtime_ns, st.inode))
        if cached is not None and cached == content_of(self.known) and stat_is_settled(st):
            index = self._index_of(self.known)
            if index or self.known is None or self.known.size == 0:
                self.index, self.index_stat, self.local_hash = index, st, cached
                self.engine.register_chunks(self)
                return
        await self._rescan()

    def _index_of(self, head: Head | None) -> dict[str, tuple[int, int]]:
        """The chunk index of a head's content from its manifest, without reading the file."""
        if head is None or head.deleted or head.size == 0:
            return {}
        entries: list[ChunkRef] = []
        for d in head.manifest:
            page = decode_inline(head.inline_manifest, d) if head.inline_manifest is not None else (
                self.engine.state.get_blob(d))
            if page is None:
                return {}
            try:
                entries.extend(decode_page(page))
            except ManifestError:
                return {}
        index: dict[str, tuple[int, int]] = {}
        off = 0
        for c in entries:
            index.setdefault(c.hash, (off, c.length))
            off += c.length
        return index

    async def _rescan(self, *, wait: bool = True) -> Scan | None:
        """Scan the local file.  If it changes while being read: with ``wait``, scan again after the
        settle time; without, return None and let the next watch event (its close) bring us back."""
        path = self.entry.path
        while True:
            if stat_of(path) is None:
                self.index, self.index_stat, self.local_hash = {}, None, None
                return None
            try:
                scan = await asyncio.to_thread(scan_file, path)
            except FileChanged:
                if not wait:
                    self.hint_local(quick=False)
                    return None
                await asyncio.sleep(self.engine.cfg.settle_ms / 1000)
                continue
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ScanError(f"cannot read {path}: {exc.strerror or exc}") from exc
            self._index_from(scan.chunks, scan.stat)
            self.local_hash = scan.hash
            self.last_scan = scan
            st = scan.stat
            self.engine.state.set_stat(self.entry.file_id, (st.size, st.mtime_ns, st.inode), scan.hash)
            self.engine.register_chunks(self)
            return scan

    async def _unchanged(self, digest: str) -> bool:
        """Whether the local file still hashes to ``digest`` (a whole-file hash, no chunking)."""
        try:
            now, st = await asyncio.to_thread(hash_file, self.entry.path)
        except (FileChanged, FileNotFoundError):
            return False  # the full scan below decides
        except OSError as exc:
            raise ScanError(f"cannot read {self.entry.path}: {exc.strerror or exc}") from exc
        if now == digest:
            self.index_stat = st
        return now == digest

    def _index_from(self, chunks: tuple[ChunkRef, ...] | list[ChunkRef], st: FileStat | None) -> None:
        index: dict[str, tuple[int, int]] = {}
        off = 0
        for c in chunks:
            index.setdefault(c.hash, (off, c.length))
            off += c.length
        self.index, self.index_stat = index, st

    def _set_known(self, head: Head, local: LocalState = LocalState.IN_SYNC) -> None:
        """The local content is ``head`` now (published, applied, or found in sync)."""
        self.known = head
        self.engine.state.set_synced(head)
        self.engine.events.emit(HeadSeen(head))
        self.engine.events.emit(LocalChanged(head.file_id, local, str(self.entry.path)))

    # -- scan -> chunk -> announce -----------------------------------------------------------
    async def _check_local(self) -> None:
        path = self.entry.path
        if stat_of(path) is None:
            if self.known is None or self.known.deleted or self.expect_gone:
                return
            if self.folder is not None:
                self.folder.hint_rel(self.rel)  # the folder decides: a deletion, or half of a rename
                return
            if not self._missing_seen:  # an editor may be replacing it: look again after the settle time
                self._missing_seen = True
                self.hint_local(quick=False)
                return
            self._missing_seen = False
            await self.publish_deletion(None)
            return
        self._missing_seen = False
        if self.known is not None and self.local_hash == self.known.hash:
            st = stat_of(path)
            if st is not None and st == self.index_stat and stat_is_settled(st):
                return  # nothing touched it since it was hashed (a reconnect, a periodic look)
            if await self._unchanged(self.known.hash):
                return  # e.g. the watch event of our own apply: hashed, not chunked again
        scan = await self._rescan(wait=False)
        if scan is None or (self.known is not None and scan.hash == self.known.hash):
            return
        if not self.engine.session.connected:
            self.dirty = True  # publish after reconnecting
            self.engine.events.emit(LocalChanged(self.entry.file_id, LocalState.MODIFIED, str(path)))
            return
        if self.locked_by_other() and self.lock is not None:
            await self._revert_locked_edit(self.lock)
            return
        pages = encode_pages(scan.chunks)
        digests = [blob_hash(p) for p in pages]
        if inline_page(pages, len(scan.chunks)) is None:  # (an inline page travels in the head itself)
            for d, p in zip(digests, pages, strict=True):
                self.engine.state.put_blob(d, p)
        head = self._head_of(scan, next_version(self.known, self.remote), pages, digests)
        self._set_known(head)
        await self._announce(head)
        log.info("%s: published v%d (%s, %d chunks)", head.file_id, head.version, human_size(head.size), head.chunks)

    async def publish_deletion(self, moved_to: str | None) -> None:
        """The file is gone here: publish a deletion (receivers keep their copy in snapshots)."""
        known = self.known
        if known is None or known.deleted or stat_of(self.entry.path) is not None:
            return
        if self.locked_by_other() and self.lock is not None and moved_to is None:
            log.warning("%s: deleted while %s holds the lock; the deletion is not published and the file "
                        "comes back", self.entry.file_id, self.lock.holder)
            await self._apply(known, keep_local=False, record=False)
            return
        if not self.engine.session.connected:
            self.dirty = True
            return
        me = self.engine.cfg.device
        version = next_version(known, self.remote)
        head = Head(file_id=self.entry.file_id, hash=EMPTY_HASH, size=0, version=version, author=me,
                    time=time.time(), parent=known.hash, deleted=True, vector=next_vector(known, me, version),
                    kind=known.kind, moved_to=moved_to)
        self.index, self.index_stat, self.local_hash = {}, None, None
        self.expect_gone = False
        self.engine.state.set_stat(self.entry.file_id, None, None)
        self._set_known(head)
        await self._announce(head)
        if moved_to is None:
            log.info("%s: published deletion (v%d)", head.file_id, version)

    async def _publish_moved(self, src: FileTask) -> None:
        """This new path holds exactly the content ``src`` had: publish it as a move, no data sent."""
        content = src.known
        if content is None or content.deleted or not self.engine.session.connected:
            self.dirty = True
            return
        me = self.engine.cfg.device
        version = next_version(self.known, self.remote)
        head = content.model_copy(update={
            "file_id": self.entry.file_id, "version": version, "author": me, "time": time.time(),
            "parent": self.known.hash if self.known else None, "vector": next_vector(self.known, me, version),
            "moved_from": src.entry.file_id, "moved_to": None, "restored_from": None, "deleted": False})
        if not self.index:
            self.index = dict(src.index) or self._index_of(content)
        self.engine.register_chunks(self)
        self._set_known(head)
        await self._announce(head)
        log.info("%s: published v%d, moved from %s", head.file_id, version, src.entry.file_id)

    def _head_of(self, scan: Scan, version: int, pages: list[bytes], digests: list[str]) -> Head:
        """A new version made here from the last synced one."""
        me = self.engine.cfg.device
        return Head(
            file_id=self.entry.file_id, hash=scan.hash, size=scan.size, version=version, author=me, time=time.time(),
            parent=self.known.hash if self.known else None, chunks=len(scan.chunks), manifest=digests,
            inline_manifest=inline_page(pages, len(scan.chunks)), vector=next_vector(self.known, me, version),
        )

    async def _revert_locked_edit(self, lock: LockState) -> None:
        """A write while another device holds the lock: keep it as a conflict copy, bring back the head."""
        fid = self.entry.file_id
        if self.known is None:
            log.warning("%s: edited while %s holds the lock; not published", fid, lock.holder)
            return
        log.warning("%s: edited while %s holds the lock; the edit is not published: it is kept as a conflict "
                    "copy and the file returns to v%d", fid, lock.holder, self.known.version)
        await self._apply(self.known, keep_local=True, record=False)

    async def _announce(self, head: Head) -> None:
        self._announced_seq = self.remote_seq
        self._announce_if_missing = False
        if not await self.engine.session.publish_paced(head_topic(self.engine.cfg.space, head.file_id), encode(head),
                                                       retain=True):
            self.reconcile_due = True  # not queued: announce it again
            self.engine.wake_later(self, RETRY_DELAY)

    # -- transfer -> assemble -> verify -> apply --------------------------------------------
    async def _apply(self, head: Head, *, keep_local: bool, record: bool = True) -> None:
        """Fetch, verify and apply ``head``.  ``keep_local``: keep the local content as a conflict
        copy first; ``record``: report local content that was never published to the coordinator."""
        fid = self.entry.file_id
        if self.folder is not None:
            try:
                self.folder.check_target(self.rel)
            except UnsafePath as exc:
                if head.hash not in self.bad_heads:
                    log.warning("%s: v%d from %s not applied: %s", fid, head.version, head.author, exc)
                self.bad_heads.add(head.hash)
                return
        if head.deleted:
            await self._apply_deletion(head)
            return
        if head.moved_from is not None and await self._apply_move(head):
            return
        async with self.engine.apply_slots:
            await self._fetch_and_swap(head, keep_local, record)

    async def _fetch_and_swap(self, head: Head, keep_local: bool, record: bool) -> None:
        fid = self.entry.file_id
        t0 = time.perf_counter()
        self._applying = head
        self.engine.note_receiving(fid, True)
        try:
            try:
                entries = await self._manifest(head)
            except ManifestError as exc:
                log.error("%s: v%d from %s has a bad manifest (%s); ignored", fid, head.version, head.author, exc)
                self.bad_heads.add(head.hash)
                return
            path = self.entry.path
            if self.folder is not None:
                await asyncio.to_thread(self.folder.make_dirs, self.rel)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
            asm = await asyncio.to_thread(Assembly, self.engine.state.partial_dir, path, fid, head.hash,
                                          head.size, entries)
            try:
                needed = await asyncio.to_thread(asm.copy_local, path, self.index)
                for src_path, src_index in self.engine.sources_for(needed, self):
                    needed = await asyncio.to_thread(asm.copy_local, src_path, src_index)
                reused = len(asm.where) - len(needed) - asm.resumed
                if needed:
                    order = [e.hash for e in entries if e.hash in needed]
                    missing = sum(asm.lengths[d] for d in needed)
                    progress = _ProgressSink(asm, self.engine.events, fid, head.author, head.size - missing, head.size)
                    try:
                        await self.engine.exchange.fetch(
                            self.engine.cfg.space, fid, order, self._providers_for(head), progress,
                            give_up_after=FETCH_GIVE_UP,
                        )
                    finally:
                        progress.finish()
                await asyncio.to_thread(asm.finish, head.hash)
                if self.remote is not None and on_remote_head(self.remote, head, "") is RemoteAction.APPLY:
                    return  # a newer head arrived meanwhile; the loop applies that one
                await self._swap(asm, head, keep_local, record)
            finally:
                asm.abort()
        except ContentMismatch as exc:
            log.error("%s: v%d from %s: %s; this version is ignored", fid, head.version, head.author, exc)
            self.bad_heads.add(head.hash)
            return
        except FetchAborted as exc:
            log.info("%s: v%d from %s abandoned: %s", fid, head.version, head.author, exc)
            return
        except FetchFailed as exc:
            log.warning("%s: v%d not complete: %s; will retry", fid, head.version, exc)
            self.engine.wake_later(self, RETRY_DELAY)
            return
        finally:
            self._applying = None
            self.engine.note_receiving(fid, False)
        ms = (time.perf_counter() - t0) * 1000
        log.info("%s: applied v%d from %s (%s; %d chunks fetched, %d reused, %d resumed) in %.0f ms",
                 fid, head.version, head.author, human_size(head.size), len(needed), reused, asm.resumed, ms)

    async def _apply_deletion(self, head: Head) -> None:
        """Another device deleted the file: move the local copy into the snapshots (never a hard
        delete).  An edit made here that was not published yet wins over the deletion."""
        eng = self.engine
        async with eng.moves:  # (a rename's other half may be taking this very file)
            await self._apply_deletion_locked(head)
        if self.folder is not None:
            self.folder.after_removal(self.rel)

    async def _apply_deletion_locked(self, head: Head) -> None:
        fid, path, eng = self.entry.file_id, self.entry.path, self.engine
        st = stat_of(path)
        if st is not None and (self.local_hash is None or st != self.index_stat):
            await self._rescan()
        if st is not None and self.local_hash is not None and self.local_hash != content_of(self.known):
            log.warning("%s: deleted by %s, but edited here since; the edit wins and is published", fid, head.author)
            self._set_known(head)
            self.dirty = True
            return
        if st is not None:
            label = f"v{self.known.version}-deleted-by-{head.author}" if self.known else "deleted"
            snap = await asyncio.to_thread(eng.state.snapshot, fid, path, label, max(eng.cfg.keep_snapshots, 1))
            if snap is not None and self.index:
                eng.add_conflict_source(snap, dict(self.index))  # a rename's other half may want these chunks
            try:
                await asyncio.to_thread(_unlink_durably, path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ScanError(f"removing {path}: {exc.strerror or exc}") from exc
            log.info("%s: deleted by %s (v%d); the local copy is kept in the snapshots", fid, head.author,
                     head.version)
        self.index, self.index_stat, self.local_hash = {}, None, None
        eng.state.set_stat(fid, None, None)
        self.expect_gone = False
        self._set_known(head)

    async def _apply_move(self, head: Head) -> bool:
        """A file renamed on another device: rename the local copy too if it holds that content."""
        async with self.engine.moves:
            return await self._apply_move_locked(head)

    async def _apply_move_locked(self, head: Head) -> bool:
        src = self.engine.tasks.get(head.moved_from or "")
        path = self.entry.path
        if (src is None or src is self or src.local_hash != head.hash or stat_of(path) is not None
                or stat_of(src.entry.path) != src.index_stat or src.locked_by_other()):
            return False
        try:
            if self.folder is not None:
                await asyncio.to_thread(self.folder.make_dirs, self.rel)
            await asyncio.to_thread(_rename_durably, src.entry.path, path)
        except (OSError, UnsafePath) as exc:
            log.warning("%s: renaming from %s failed (%s); fetching the content instead", self.entry.file_id,
                        src.entry.file_id, exc)
            return False
        self.index, self.index_stat, self.local_hash = dict(src.index), stat_of(path), head.hash
        src.index, src.index_stat, src.local_hash = {}, None, None
        src.expect_gone = True
        st = self.index_stat
        if st is not None:
            self.engine.state.set_stat(self.entry.file_id, (st.size, st.mtime_ns, st.inode), head.hash)
        self.engine.state.set_stat(src.entry.file_id, None, None)
        self.engine.register_chunks(self)
        self._set_known(head)
        self.enforce_mode()
        log.info("%s: renamed from %s (v%d by %s), no data transferred", self.entry.file_id, src.entry.file_id,
                 head.version, head.author)
        if src.folder is not None:
            src.folder.after_removal(src.rel)
        return True

    def _providers_for(self, head: Head) -> Callable[[], list[str]]:
        return lambda: self.engine.providers(head.author, hub_first=head.restored_from is not None)

    async def _manifest(self, head: Head) -> list[ChunkRef]:
        if head.size == 0:
            return []
        if head.inline_manifest is not None:
            pages = {head.manifest[0]: decode_inline(head.inline_manifest, head.manifest[0])}
        else:
            pages = {}
            missing = []
            for d in head.manifest:
                blob = self.engine.state.get_blob(d)
                if blob is None:
                    missing.append(d)
                else:
                    pages[d] = blob
            if missing:
                await self.engine.exchange.fetch(
                    self.engine.cfg.space, head.file_id, missing, self._providers_for(head),
                    _PageSink(pages), give_up_after=FETCH_GIVE_UP,
                )
        entries: list[ChunkRef] = []
        for d in head.manifest:
            entries.extend(decode_page(pages[d]))
            if head.inline_manifest is None:
                self.engine.state.put_blob(d, pages[d])
        if len(entries) != head.chunks or sum(e.length for e in entries) != head.size:
            raise ManifestError("chunk count or total size disagrees with the head")
        return entries

    async def _swap(self, asm: Assembly, head: Head, keep_local: bool, record: bool) -> None:
        path = self.entry.path
        eng = self.engine
        st = stat_of(path)
        mode: int | None = None
        kept_copy = False
        if st is not None:
            mode = os.stat(path).st_mode & 0o7777
            if st != self.index_stat:
                await self._rescan()  # the user touched it during the transfer: look again
            published = self.known is not None and self.local_hash == self.known.hash
            unpublished_edit = self.local_hash is not None and not published and self.local_hash != head.hash
            if (keep_local and self.local_hash != head.hash) or unpublished_edit:
                await self._keep_conflict_copy(head, record=record and unpublished_edit)
                kept_copy = True
            label = f"v{self.known.version}-{self.known.hash[:12]}" if (
                self.known and self.known.hash == self.local_hash) else f"local-{(self.local_hash or 'x')[:12]}"
            await asyncio.to_thread(eng.state.snapshot, head.file_id, path, label, eng.cfg.keep_snapshots)
        await asyncio.to_thread(asm.swap_in, mode)
        entries_index = {d: (offs[0], asm.lengths[d]) for d, offs in asm.where.items()}
        self.index, self.index_stat, self.local_hash = entries_index, stat_of(path), head.hash
        self.last_scan = None
        st = self.index_stat
        if st is not None:
            eng.state.set_stat(head.file_id, (st.size, st.mtime_ns, st.inode), head.hash)
        eng.register_chunks(self)
        self._set_known(head, LocalState.CONFLICT if kept_copy else LocalState.IN_SYNC)
        self.enforce_mode()

    async def _keep_conflict_copy(self, head: Head, *, record: bool) -> None:
        """Copy the local content beside the file; serve its chunks; with ``record``, tell the
        coordinator about this content nobody else has seen, so the history lists it."""
        path, eng, fid = self.entry.path, self.engine, self.entry.file_id
        copy = conflict_name(path, eng.cfg.device)
        await asyncio.to_thread(shutil.copy2, path, copy)
        try:
            mode = eng.state.locked_modes.get(fid)
            if mode is not None:
                os.chmod(copy, mode)  # the copy is the user's to edit, whatever the lock says
        except OSError:
            pass
        eng.add_conflict_source(copy, dict(self.index))
        log.warning("%s: local content kept as conflict copy %s before applying v%d from %s",
                    fid, copy.name, head.version, head.author)
        scan = self.last_scan
        if not record or scan is None or scan.hash != self.local_hash:
            return
        pages = encode_pages(scan.chunks)
        digests = [blob_hash(p) for p in pages]
        for d, p in zip(digests, pages, strict=True):
            eng.state.put_blob(d, p)
        base = self.known.version if self.known is not None else 0
        lost = self._head_of(scan, base + 1, pages, digests)
        eng.session.publish(conflict_topic(eng.cfg.space, fid), encode(lost))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_durably(path: Path) -> None:
    path.unlink()
    _fsync_dir(path.parent)


def _rename_durably(src: Path, dest: Path) -> None:
    if dest.exists():
        raise FileExistsError(f"{dest} exists")
    os.rename(src, dest)
    _fsync_dir(dest.parent)
    if src.parent != dest.parent:
        _fsync_dir(src.parent)


class Engine:
    """Owns the session, presence map and exchange; routes messages to file owners."""

    def __init__(self, cfg: AgentConfig, events: EventSink | None = None) -> None:
        self.cfg = cfg
        self.events: EventSink = events or NullSink()
        """Where state events go for a UI (nowhere by default)."""
        self.state = AgentState(cfg.state_dir)
        self._sent_bytes: dict[str, int] = {}
        self.presence: dict[str, Presence] = {}
        self.tasks: dict[str, FileTask] = {}
        self._by_path: dict[Path, FileTask] = {}
        self._epoch_lock = threading.Lock()
        self._epoch = max(self.state.epoch, 0)
        self._connected_at = 0.0
        self.started_at = time.time()
        self.host = socket.gethostname()
        self.conflict_sources: list[tuple[Path, dict[str, tuple[int, int]]]] = []
        self._receiving: set[str] = set()
        self._sent_at: dict[str, float] = {}
        self._activity_shown: tuple[list[str], list[str]] = ([], [])
        self._activity_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.folders: list[FolderTask] = []
        self.chunk_owner: dict[str, FileTask] = {}
        """For each chunk hash, a file whose index had it (checked by hash when read)."""
        self._runners: list[asyncio.Task[None]] = []
        self.apply_slots = asyncio.Semaphore(MAX_PARALLEL_APPLIES)
        self.moves = asyncio.Lock()
        self._catch_up_task: asyncio.Task[None] | None = None
        self.catching_up = False
        """Held while a file is renamed for a remote move or removed for a remote deletion."""
        self.session: MqttSession
        self.exchange: BlobExchange

    # -- presence epoch (the will is set from paho's thread just before each connect) -------
    def _next_epoch(self) -> int:
        with self._epoch_lock:
            self._epoch = max(self._epoch + 1, time.time_ns() // 1_000_000)
            return self._epoch

    def _presence(self, state: PresenceState, epoch: int) -> bytes:
        sending: list[str] = []
        receiving: list[str] = []
        if state is PresenceState.ONLINE:  # (the Last Will is built on paho's thread: no state touched)
            sending, receiving = self._activity()
            self._activity_shown = (sending, receiving)
        return encode(Presence(device=self.cfg.device, state=state, epoch=epoch, since=self.started_at,
                               host=self.host[:255], agent_version=__version__, sending=sending,
                               receiving=receiving))

    # -- activity shown in presence: files being sent and received ---------------------------
    def _activity(self) -> tuple[list[str], list[str]]:
        now = time.monotonic()
        sending = sorted(f for f, t in self._sent_at.items() if now - t < SENDING_HOLD)[:MAX_ACTIVE_FILES]
        return sending, sorted(self._receiving)[:MAX_ACTIVE_FILES]

    def note_receiving(self, file_id: str, active: bool) -> None:
        if active:
            self._receiving.add(file_id)
        else:
            self._receiving.discard(file_id)
        self._activity_changed()

    def _note_sending(self, file_id: str, nbytes: int = 0) -> None:
        first = file_id not in self._sent_at or time.monotonic() - self._sent_at[file_id] >= SENDING_HOLD
        self._sent_at[file_id] = time.monotonic()
        if first:
            self._sent_bytes[file_id] = 0
            self._activity_changed()
        self._sent_bytes[file_id] = self._sent_bytes.get(file_id, 0) + nbytes
        task = self.tasks.get(file_id)
        size = task.known.size if task is not None and task.known is not None else None
        self.events.emit(TransferProgress(file_id, Direction.OUT, self._sent_bytes[file_id], size))

    def _activity_changed(self) -> None:
        if self._activity_timer is None and self._loop is not None:
            self._activity_timer = self._loop.call_later(ACTIVITY_DELAY, self._publish_activity)

    def _publish_activity(self) -> None:
        self._activity_timer = None
        sending, receiving = self._activity()
        if sending:  # look again when the oldest stops counting as sending
            self._activity_changed()
        now = time.monotonic()
        for f in [f for f, t in self._sent_at.items() if now - t >= SENDING_HOLD]:
            del self._sent_at[f]
            sent = self._sent_bytes.pop(f, 0)
            self.events.emit(TransferProgress(f, Direction.OUT, sent, sent, finished=True))
        if (sending, receiving) == self._activity_shown or not self.session.connected:
            return
        with self._epoch_lock:
            epoch = self._epoch
        self.session.publish(presence_topic(self.cfg.space, self.cfg.device),
                             self._presence(PresenceState.ONLINE, epoch), retain=True)

    # -- files: the listed ones and those inside folders (made as they are seen) ---------------
    def task_for(self, file_id: str, *, create: bool = False) -> FileTask | None:
        task = self.tasks.get(file_id)
        if task is not None or not create:
            return task
        inside = self.cfg.folder_of(file_id)
        if inside is None:
            return None
        entry, rel = inside
        folder = next(f for f in self.folders if f.entry is entry)
        task = FileTask(self, FileEntry(file_id, entry.path_of(rel)))
        task.folder, task.rel = folder, rel
        self.tasks[file_id] = task
        folder.files[rel] = task
        if self._loop is not None:
            self._runners.append(self._loop.create_task(task.run(), name=f"file:{file_id}"))
        return task

    def register_chunks(self, task: FileTask) -> None:
        for digest in task.index:
            self.chunk_owner[digest] = task

    def sources_for(self, needed: set[str], asking: FileTask) -> list[tuple[Path, dict[str, tuple[int, int]]]]:
        """Local files (and kept copies) holding some of ``needed``: copied, not fetched."""
        out: list[tuple[Path, dict[str, tuple[int, int]]]] = []
        seen: set[int] = set()
        for digest in needed:
            t = self.chunk_owner.get(digest)
            if t is not None and t is not asking and id(t) not in seen and digest in t.index:
                seen.add(id(t))
                out.append((t.entry.path, t.index))
        for path, index in reversed(self.conflict_sources):
            if any(d in index for d in needed):
                out.append((path, index))
        return out

    def add_conflict_source(self, path: Path, index: dict[str, tuple[int, int]]) -> None:
        """Serve the chunks of a conflict copy (the coordinator stores them for the history)."""
        self.conflict_sources = [*self.conflict_sources, (path, index)][-MAX_CONFLICT_SOURCES:]

    def _will(self) -> Will:
        epoch = self._next_epoch()
        return Will(presence_topic(self.cfg.space, self.cfg.device), self._presence(PresenceState.OFFLINE, epoch))

    def _on_connected(self) -> None:
        with self._epoch_lock:
            epoch = self._epoch
        self.state.epoch = epoch
        self.state.save()
        self._connected_at = asyncio.get_running_loop().time()
        self.session.publish(presence_topic(self.cfg.space, self.cfg.device),
                             self._presence(PresenceState.ONLINE, epoch), retain=True)
        self.events.emit(Connection(True, str(self.cfg.broker)))
        for task in self.tasks.values():
            task.on_reconnected()
        for folder in self.folders:
            folder.rescan_all()
        if self.folders:
            if self._catch_up_task is not None:
                self._catch_up_task.cancel()
            self._catch_up_task = asyncio.get_running_loop().create_task(self._catch_up(), name="catch-up")

    def _in_grace(self) -> bool:
        return self._loop is not None and self._loop.time() - self._connected_at < RETAINED_GRACE

    async def ready_after_connect(self) -> None:
        """Wait out the grace period in which retained messages arrive after (re)connecting."""
        delay = self._connected_at + RETAINED_GRACE - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    def providers(self, author: str, *, hub_first: bool = False) -> list[str]:
        """Who to ask for a version's blobs, in order: the author while online, the coordinator,
        every other online device (one that applied the version holds it), the author again
        (presence may lag).  ``hub_first`` for a restored version: the coordinator holds it, the
        "author" (who asked for the restore) may not."""
        me = self.cfg.device
        online = sorted(d for d, p in self.presence.items() if p.state is PresenceState.ONLINE and d != me)
        others = [device_provider(d) for d in online if d != author]
        if hub_first:
            return [HUB, *others] + ([device_provider(author)] if author != me else [])
        out = [device_provider(author)] if author in online else []
        out += [HUB, *others]
        if author != me and device_provider(author) not in out:
            out.append(device_provider(author))
        return out

    def wake_later(self, task: FileTask, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, task.wake.set)

    # -- BlobSource: serve chunks of our current files and manifest pages -------------------
    def read_blobs(self, space: str, file_id: str, digests: list[str]) -> list[tuple[str, bytes | None]]:
        """Runs in a worker thread: reads chunks from the listed files and the conflict copies."""
        first = self.tasks.get(file_id)
        extra = list(reversed(self.conflict_sources))
        out: list[tuple[str, bytes | None]] = []
        for d in digests:
            data = None
            owner = self.chunk_owner.get(d)
            sources = [(t.entry.path, t.index) for t in (first, owner) if t is not None] + extra
            for path, index in sources:
                loc = index.get(d)
                if loc is None:
                    continue
                try:
                    with open(path, "rb") as fh:
                        fh.seek(loc[0])
                        chunk = fh.read(loc[1])
                except OSError:
                    continue
                if blob_hash(chunk) == d:
                    data = chunk
                    break
            if data is None:
                data = self.state.get_blob(d)
            out.append((d, data))
        if self._loop is not None:
            sent = sum(len(data) for _d, data in out if data is not None)
            self._loop.call_soon_threadsafe(self._note_sending, file_id, sent)
        return out

    # -- incoming messages ----------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(topic)
        except TopicError as exc:
            log.warning("dropped message: %s", exc)
            return
        if parsed.space != self.cfg.space:
            return
        kind = parsed.kind
        if kind is TopicKind.DEVICE_DATA and parsed.device == self.cfg.device:
            self.exchange.on_data(payload)
        elif kind is TopicKind.DEVICE_REQUEST and parsed.device == self.cfg.device:
            self.exchange.on_request(parsed.space, payload)
        elif kind is TopicKind.HEAD and parsed.file_id is not None:
            self._on_head(parsed.file_id, payload)
        elif kind is TopicKind.PRESENCE and parsed.device is not None:
            self._on_presence(parsed.device, payload)
        elif kind is TopicKind.LOCK and parsed.file_id is not None:
            self._on_lock(parsed.file_id, payload)

    # -- catching up on a big space from the coordinator ------------------------------------------
    async def _catch_up(self) -> None:
        """Ask the coordinator for the heads of every synced folder, a page at a time.

        Retained heads arrive in one burst on (re)connecting, and a broker may cut a burst short
        (Mosquitto drops past its per-client queue, whatever the QoS, for a client that reads
        slower than it sends).  The pages come over a connection of their own, which no burst
        fills.  Heads that did arrive are not harmed: the same head twice is ignored."""
        n = 0
        self.catching_up = True
        try:
            async with connect_rpc(self.cfg) as rpc:
                for folder in self.folders:
                    async for heads in head_pages(rpc, folder.entry.folder_id + "/"):
                        for head in heads:
                            if self.cfg.folder_of(head.file_id) is not None:
                                self._route_head(head)
                        n += len(heads)
        except CommandError as exc:
            log.info("catching up from the coordinator: %s; relying on the broker's retained heads", exc)
            return
        finally:
            self.catching_up = False
        log.info("caught up on %d head(s) from the coordinator", n)

    def _on_lock(self, file_id: str, payload: bytes) -> None:
        task = self.task_for(file_id, create=bool(payload))
        if task is None:
            return
        try:
            lock = decode_lock(file_id, payload)
        except MessageError as exc:
            log.warning("dropped %s", exc)
            return
        task.on_lock(lock)

    def _on_head(self, file_id: str, payload: bytes) -> None:
        if not payload or (file_id not in self.tasks and self.cfg.folder_of(file_id) is None):
            return  # not one of ours (a wildcard subscription sees every file of the space)
        try:
            head = decode_head(file_id, payload)
        except MessageError as exc:
            log.warning("dropped %s", exc)
            return
        self._route_head(head)

    def _route_head(self, head: Head) -> None:
        file_id = head.file_id
        if head.kind is EntryKind.DIR:
            inside = self.cfg.folder_of(file_id)
            if inside is not None:
                folder = next(f for f in self.folders if f.entry is inside[0])
                folder.on_dir_head(inside[1], head)
            return
        task = self.task_for(file_id, create=True)
        if task is not None:
            task.on_remote(head)

    def _on_presence(self, device: str, payload: bytes) -> None:
        if not payload:
            self.presence.pop(device, None)
            return
        try:
            p = decode_presence(device, payload)
        except MessageError as exc:
            log.warning("dropped %s", exc)
            return
        current = self.presence.get(device)
        if device == self.cfg.device:
            self._check_own_presence(p)
        if presence_is_current(p, current):
            if current is None or current.state is not p.state:
                log.info("device %s is %s", device, p.state.value)
            self.presence[device] = p
            self.events.emit(PresenceSeen(p, initial=self._in_grace()))

    def _check_own_presence(self, p: Presence) -> None:
        """The broker must hold this session's "online": put it back over anything else there
        (a stale Last Will of an earlier session, or a message from another client)."""
        with self._epoch_lock:
            epoch = self._epoch
        if self._stopping or not self.session.connected:
            return
        if p.epoch == epoch and p.state is PresenceState.OFFLINE:
            # "Offline" for this very session, which is connected: not ours.  At the same epoch
            # offline wins everywhere, so only a new session (new epoch, new will) can undo it.
            log.warning("another client published this device as offline; reconnecting with a new epoch")
            self.session.drop_connection()
        elif p.epoch < epoch:
            # (At every start the previous session's retained "offline" may arrive after our "online".)
            log.debug("the broker held a stale presence for this device (%s, epoch %d); re-publishing",
                      p.state.value, p.epoch)
            self.session.publish(presence_topic(self.cfg.space, self.cfg.device),
                                 self._presence(PresenceState.ONLINE, epoch), retain=True)

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        self._loop = asyncio.get_running_loop()
        self.session = MqttSession(
            cfg.broker, f"atrius-{cfg.space}-{cfg.device}",
            on_message=self._on_message, on_connected=self._on_connected, will=self._will,
            on_disconnected=lambda: self.events.emit(Connection(False, str(cfg.broker))),
            username=cfg.username, password=cfg.password, ca_file=cfg.ca_file,
        )
        self.exchange = BlobExchange(self.session, cfg.device, self)
        for entry in cfg.files:
            task = FileTask(self, entry)
            self.tasks[entry.file_id] = task
            self._by_path[entry.path] = task
        skip = [cfg.source, cfg.state_dir]
        self.folders = [FolderTask(self, f, skip) for f in cfg.folders]
        if cfg.folders:  # a file id is one topic level: folders need every head and lock of the space
            self.session.subscribe(all_heads_filter(cfg.space), qos=STATE_QOS)
            self.session.subscribe(all_locks_filter(cfg.space), qos=STATE_QOS)
        else:
            for entry in cfg.files:
                self.session.subscribe(head_topic(cfg.space, entry.file_id), qos=STATE_QOS)
                self.session.subscribe(lock_topic(cfg.space, entry.file_id), qos=STATE_QOS)
        for fid, head in list(self.state.synced.items()):  # files of folders synced before
            if head.kind is EntryKind.FILE:
                self.task_for(fid, create=True)
        for task in self.tasks.values():  # what the UI shows before the broker answers
            if task.known is not None:
                self.events.emit(HeadSeen(task.known, initial=True))
        self.session.subscribe(all_presence_filter(cfg.space), qos=STATE_QOS)
        self.session.subscribe(device_request_topic(cfg.space, cfg.device))
        self.session.subscribe(device_data_topic(cfg.space, cfg.device))
        watcher = Watcher([e.path for e in cfg.files], self._on_hint, [f.path for f in cfg.folders])
        watcher.start()
        self.exchange.start()
        self.session.start()
        log.info("agent %s in space %s: %d file(s), %d folder(s), broker %s", cfg.device, cfg.space, len(cfg.files),
                 len(cfg.folders), cfg.broker)
        runners = self._runners
        runners += [asyncio.create_task(t.run(), name=f"file:{fid}") for fid, t in self.tasks.items()
                    if t.folder is None]
        runners += [asyncio.create_task(f.run(), name=f"folder:{f.entry.folder_id}") for f in self.folders]
        runners.append(asyncio.create_task(self._periodic_rescan(), name="rescan"))
        runners.append(asyncio.create_task(self._save_state(), name="state"))
        try:
            await stop.wait()
        finally:
            self._stopping = True
            if self._catch_up_task is not None:
                self._catch_up_task.cancel()
            for r in runners:
                r.cancel()
            await asyncio.gather(*runners, return_exceptions=True)
            watcher.stop()
            await self.exchange.close()
            with self._epoch_lock:
                epoch = self._epoch
            await self.session.stop([(presence_topic(cfg.space, cfg.device),
                                      self._presence(PresenceState.OFFLINE, epoch))])
            self.state.save()
            log.info("agent %s stopped", cfg.device)

    def _on_hint(self, path: Path, quick: bool) -> None:
        task = self._by_path.get(path)
        if task is not None:
            task.hint_local(quick)
            return
        for folder in self.folders:
            if folder.rel_of(path) is not None:
                folder.hint(path)
                return

    async def _periodic_rescan(self) -> None:
        """Watch events can be lost: look at files whose stat changed since their last scan, and
        at every synced folder (a light rescan: only changed stats are hashed)."""
        while True:
            await asyncio.sleep(self.cfg.rescan_seconds)
            for task in self.tasks.values():
                if task.folder is None and stat_of(task.entry.path) != task.index_stat:
                    task.hint_local(quick=False)
            for folder in self.folders:
                folder.rescan_all()

    async def _save_state(self) -> None:
        while True:
            await asyncio.sleep(STATE_SAVE_INTERVAL)
            try:
                self.state.save_if_dirty()
            except OSError as exc:
                log.error("saving the state dir failed: %s", exc.strerror or exc)
