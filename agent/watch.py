"""The watch-only source of ``atrius tui``: turns a space's retained presence, heads and locks, its
conflict notices, the coordinator's registry and lock history, and this device's files on disk
into state events.  It publishes nothing and changes no file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from agent.chunker import FileStat, stat_of
from agent.commands import CommandError, _Rpc, head_pages
from agent.config import AgentConfig
from agent.events import (
    Connection,
    DevicesKnown,
    EventSink,
    HeadSeen,
    LocalChanged,
    LocalState,
    LockHistory,
    PresenceSeen,
    state_event,
)
from agent.state import read_synced
from agent.status import hash_or_none, local_state
from schemas.messages import (
    EntryKind,
    Head,
    MessageError,
    Presence,
    StatusReply,
    StatusRequest,
)
from schemas.mqtt import STATE_QOS
from schemas.rules import presence_is_current, supersedes
from schemas.topics import (
    TopicError,
    all_conflicts_filter,
    all_heads_filter,
    all_locks_filter,
    all_presence_filter,
)

log = logging.getLogger("atrius.tui")

INITIAL_GRACE = 1.0
"""Seconds after (re)connecting in which arriving state is what was there, not news."""
STATUS_EVERY = 5.0
"""Seconds between questions to the coordinator (last-seen times, lock history)."""
LOCAL_EVERY = 0.25
"""Seconds between looks at this device's files on disk (a look costs a stat per file)..."""
LOCAL_EVERY_MANY = 2.0
"""...and with more than MANY_FILES files."""
MANY_FILES = 2_000


class SpaceWatch:
    """Single owner of the watch connection; emits events, keeps only what it needs to tell news."""

    def __init__(self, cfg: AgentConfig, events: EventSink) -> None:
        self.cfg = cfg
        self.events = events
        self.heads: dict[str, Head] = {}
        self.me: Presence | None = None
        self._connected_at = 0.0
        self._catch_up_due = asyncio.Event()
        self._rpc = _Rpc(cfg, on_other=self._on_message, on_connected=self._on_connected,
                         on_disconnected=self._on_disconnected, role="tui")
        self._hashes: dict[Path, tuple[FileStat, str | None]] = {}
        self._local: dict[str, LocalState] = {}
        self._inputs: dict[str, tuple[object, ...]] = {}
        """Per file, what its local state was computed from (unchanged: not computed again)."""
        self._synced: dict[str, Head] = {}
        self._synced_stat: FileStat | None = None
        self._coordinator_ok: bool | None = None

    # -- the broker -------------------------------------------------------------------------------
    def _on_connected(self) -> None:
        self._connected_at = time.monotonic()
        self.events.emit(Connection(True, str(self.cfg.broker)))
        self._catch_up_due.set()

    def _on_disconnected(self) -> None:
        self.events.emit(Connection(False, str(self.cfg.broker)))

    def _initial(self) -> bool:
        return time.monotonic() - self._connected_at < INITIAL_GRACE

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            ev = state_event(self.cfg.space, topic, payload, initial=self._initial())
        except TopicError as exc:
            log.debug("dropped message: %s", exc)
            return
        except MessageError as exc:
            log.warning("dropped %s", exc)
            return
        if isinstance(ev, HeadSeen):
            self._head(ev.head, initial=ev.initial)
            return
        if isinstance(ev, PresenceSeen) and ev.presence.device == self.cfg.device and presence_is_current(
                ev.presence, self.me):
            self.me = ev.presence
        if ev is not None:
            self.events.emit(ev)

    def _head(self, head: Head, *, initial: bool) -> None:
        if supersedes(head, self.heads.get(head.file_id)):
            self.heads[head.file_id] = head
        self.events.emit(HeadSeen(head, initial=initial))

    # -- the coordinator ----------------------------------------------------------------------------
    async def _coordinator(self) -> None:
        """After each connect: every head (a big space's retained burst may be cut short); then the
        registry and lock history every STATUS_EVERY seconds."""
        rpc = self._rpc
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._catch_up_due.wait(), STATUS_EVERY)
            if not rpc.session.connected:
                continue
            try:
                if self._catch_up_due.is_set():
                    self._catch_up_due.clear()
                    async for heads in head_pages(rpc):
                        for h in heads:
                            self._head(h, initial=True)
                reply = await rpc.call(lambda req_id, token: StatusRequest(req_id=req_id, reply_to=token))
            except CommandError as exc:
                if self._coordinator_ok is not False:
                    log.warning("%s; last-seen times and lock history are not shown", exc)
                self._coordinator_ok = False
                continue
            if isinstance(reply, StatusReply):
                if self._coordinator_ok is False:
                    log.info("the coordinator answers again")
                self._coordinator_ok = True
                self.events.emit(DevicesKnown(tuple(reply.devices)))
                self.events.emit(LockHistory(tuple(reply.lock_events)))

    # -- this device's files on disk ------------------------------------------------------------------
    def _hash(self, path: Path) -> str | None:
        st = stat_of(path)
        if st is None:
            self._hashes.pop(path, None)
            return None
        cached = self._hashes.get(path)
        if cached is not None and cached[0] == st:
            return cached[1]
        digest = hash_or_none(path)
        self._hashes[path] = (st, digest)
        return digest

    def _paths(self) -> dict[str, Path | None]:
        out: dict[str, Path | None] = {e.file_id: e.path for e in self.cfg.files}
        for fid, head in list(self.heads.items()):
            if head.kind is not EntryKind.FILE:
                continue
            inside = self.cfg.folder_of(fid)
            if inside is not None:
                out[fid] = inside[0].path_of(inside[1])
            else:
                out.setdefault(fid, None)
        return out

    def _look(self) -> list[tuple[str, LocalState, str | None]]:
        """Runs in a worker thread: the local state of every file that has changed."""
        st = stat_of(self.cfg.state_dir / "state.json")
        if st != self._synced_stat:
            self._synced_stat, self._synced = st, read_synced(self.cfg.state_dir)
        changed = []
        me = self.me
        for fid, path in self._paths().items():
            head, synced = self.heads.get(fid), self._synced.get(fid)
            busy = me is not None and (fid in me.receiving or fid in me.sending)
            inputs = (stat_of(path), _dir_mtime(path), head and (head.version, head.hash), synced and synced.hash,
                      busy) if path is not None else (None,)
            if self._inputs.get(fid) == inputs:
                continue
            self._inputs[fid] = inputs
            state, _ = local_state(path, head, synced, me, fid, self._hash)
            if self._local.get(fid) is not state:
                self._local[fid] = state
                changed.append((fid, state, str(path) if path else None))
        return changed

    async def _local_loop(self) -> None:
        while True:
            for fid, state, path in await asyncio.to_thread(self._look):
                self.events.emit(LocalChanged(fid, state, path))
            await asyncio.sleep(LOCAL_EVERY if len(self._inputs) <= MANY_FILES else LOCAL_EVERY_MANY)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        session = self._rpc.session
        for flt in (all_presence_filter(self.cfg.space), all_heads_filter(self.cfg.space),
                    all_locks_filter(self.cfg.space), all_conflicts_filter(self.cfg.space)):
            session.subscribe(flt, qos=STATE_QOS)
        session.subscribe(self._rpc.reply_topic)
        session.start()
        tasks = [asyncio.create_task(self._coordinator(), name="tui-coordinator"),
                 asyncio.create_task(self._local_loop(), name="tui-local")]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.stop()


def _dir_mtime(path: Path) -> int | None:
    """The folder's change time: a conflict copy appearing beside a file changes it."""
    try:
        return path.parent.stat().st_mtime_ns
    except OSError:
        return None
