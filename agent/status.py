"""``atrius status``: devices, files, locks and lock events of a space, as a table or JSON.

Presence, heads and locks come from the broker's retained messages; last-seen times and the lock
history from the coordinator; the local state of each listed file from this device's disk and
state dir (the agent need not be running).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.chunker import FileChanged, hash_file
from agent.commands import CommandError, _Rpc, _when, connect_rpc, head_pages, human_size
from agent.config import AgentConfig
from agent.events import HeadSeen, LocalState, LockSeen, PresenceSeen, state_event
from agent.state import read_synced
from schemas.locks import describe
from schemas.messages import (
    DeviceRecord,
    EntryKind,
    Head,
    LockState,
    MessageError,
    Presence,
    PresenceState,
    StatusReply,
    StatusRequest,
)
from schemas.mqtt import STATE_QOS
from schemas.rules import presence_is_current, supersedes
from schemas.topics import TopicError, all_heads_filter, all_locks_filter, all_presence_filter

log = logging.getLogger("atrius.cli")

RETAINED_WAIT = 0.8
"""Seconds to collect the retained presence, head and lock messages after subscribing."""


@dataclass
class _Collected:
    space: str
    presence: dict[str, Presence] = field(default_factory=dict)
    heads: dict[str, Head] = field(default_factory=dict)
    locks: dict[str, LockState] = field(default_factory=dict)

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            ev = state_event(self.space, topic, payload)
        except TopicError:
            return
        except MessageError as exc:
            log.warning("ignored %s", exc)
            return
        if isinstance(ev, PresenceSeen):
            p = ev.presence
            if presence_is_current(p, self.presence.get(p.device)):
                self.presence[p.device] = p
        elif isinstance(ev, HeadSeen):
            if supersedes(ev.head, self.heads.get(ev.head.file_id)):
                self.heads[ev.head.file_id] = ev.head
        elif isinstance(ev, LockSeen):
            if ev.lock is None:
                self.locks.pop(ev.file_id, None)
            else:
                self.locks[ev.file_id] = ev.lock


def _status_request(req_id: str, token: str) -> StatusRequest:
    return StatusRequest(req_id=req_id, reply_to=token)


async def _collect(cfg: AgentConfig) -> tuple[_Collected, StatusReply | None]:
    """Presence and locks from the broker; heads, last-seen times and lock history from the
    coordinator (a big space's retained heads arrive in a burst the broker may cut short, and the
    replies with them); the broker's retained heads only when the coordinator does not answer."""
    got = _Collected(cfg.space)
    rpc = _Rpc(cfg, on_other=got.on_message)
    for flt in (all_presence_filter(cfg.space), all_locks_filter(cfg.space)):
        rpc.session.subscribe(flt, qos=STATE_QOS)
    reply: StatusReply | None = None
    async with connect_rpc(cfg, rpc):
        try:
            first = await rpc.call(_status_request)
            reply = first if isinstance(first, StatusReply) else None
            async for heads in head_pages(rpc):
                for h in heads:
                    if supersedes(h, got.heads.get(h.file_id)):
                        got.heads[h.file_id] = h
        except CommandError as exc:
            log.warning("%s; devices are shown without last-seen times and lock history", exc)
            rpc.session.subscribe(all_heads_filter(cfg.space), qos=STATE_QOS)
        await asyncio.sleep(RETAINED_WAIT if reply is None else 0.3)
    return got, reply


def _conflict_copies(path: Path) -> list[Path]:
    try:
        return sorted(path.parent.glob(f"{_glob_escape(path.stem)}.conflict-*{_glob_escape(path.suffix)}"))
    except OSError:
        return []


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def hash_or_none(path: Path) -> str | None:
    """The content hash of a local file, None when it is missing or unreadable."""
    try:
        return hash_file(path)[0]
    except (OSError, FileChanged):
        return None


def local_state(path: Path | None, head: Head | None, synced: Head | None, me: Presence | None,
                file_id: str, hasher: Callable[[Path], str | None] = hash_or_none) -> tuple[LocalState, str | None]:
    """The local state of one file and its local content hash (``hasher`` may answer from a cache)."""
    if path is None:
        return LocalState.NOT_HERE, None
    local = hasher(path)
    if me is not None and me.state is PresenceState.ONLINE:
        if file_id in me.receiving:
            return LocalState.RECEIVING, local
        if file_id in me.sending:
            return LocalState.SENDING, local
    if _conflict_copies(path):
        return LocalState.CONFLICT, local
    if local is None:
        return (LocalState.IN_SYNC if head is not None and head.deleted else LocalState.MISSING), None
    if head is None or local == head.hash:
        return (LocalState.IN_SYNC if head is not None else LocalState.MODIFIED), local
    if synced is not None and synced.hash == local:
        return LocalState.BEHIND, local
    return LocalState.MODIFIED, local


@dataclass(frozen=True)
class DeviceRow:
    device: str
    state: str
    host: str
    agent_version: str
    since: float
    last_seen: float | None
    sending: list[str]
    receiving: list[str]


@dataclass(frozen=True)
class FileRow:
    file_id: str
    path: str | None
    version: int | None
    size: int | None
    author: str | None
    hash: str | None
    deleted: bool
    lock: dict[str, object] | None
    local: str
    local_hash: str | None
    conflict_copies: list[str]


def _device_rows(got: _Collected, registry: dict[str, DeviceRecord], now: float) -> list[DeviceRow]:
    rows = []
    for name in sorted(set(got.presence) | set(registry)):
        p, r = got.presence.get(name), registry.get(name)
        src = p or r
        # The coordinator compares epochs; the broker's retained message may be a stale Last Will.
        state = r.state if r is not None else (p.state if p is not None else PresenceState.OFFLINE)
        online = state is PresenceState.ONLINE
        rows.append(DeviceRow(
            device=name, state=state.value, host=src.host if src else "",
            agent_version=src.agent_version if src else "", since=src.since if src else 0.0,
            last_seen=now if online else (r.last_seen if r else None),
            sending=list(src.sending) if src and online else [],
            receiving=list(src.receiving) if src and online else [],
        ))
    return rows


def _file_rows(cfg: AgentConfig, got: _Collected) -> list[FileRow]:
    synced = read_synced(cfg.state_dir)
    listed = {e.file_id: e.path for e in cfg.files}
    for fid in got.heads:  # files inside the synced folders
        inside = cfg.folder_of(fid)
        if inside is not None and got.heads[fid].kind is EntryKind.FILE:
            listed[fid] = inside[0].path_of(inside[1])
    rows = []
    for fid in sorted(set(listed) | {f for f, h in got.heads.items() if h.kind is EntryKind.FILE}):
        head, path, lock = got.heads.get(fid), listed.get(fid), got.locks.get(fid)
        state, local = local_state(path, head, synced.get(fid), got.presence.get(cfg.device), fid)
        rows.append(FileRow(
            file_id=fid, path=str(path) if path else None, version=head.version if head else None,
            size=head.size if head else None, author=head.author if head else None, hash=head.hash if head else None,
            deleted=head.deleted if head else False, lock=lock.model_dump(mode="json") if lock else None,
            local=state.value, local_hash=local,
            conflict_copies=[c.name for c in _conflict_copies(path)] if path else [],
        ))
    return rows


def cmd_status(cfg: AgentConfig, *, as_json: bool) -> int:
    """Exit 0; 1 (after printing what the broker holds) when the coordinator did not answer."""
    got, reply = asyncio.run(_collect(cfg))
    now = time.time()
    devices = _device_rows(got, {d.device: d for d in reply.devices} if reply else {}, now)
    files = _file_rows(cfg, got)
    locks = [lock for _f, lock in sorted(got.locks.items())]
    code = 0 if reply is not None else 1
    if as_json:
        print(json.dumps({
            "space": cfg.space, "device": cfg.device, "broker": str(cfg.broker), "coordinator": reply is not None,
            "time": now, "devices": [asdict(d) for d in devices], "files": [asdict(f) for f in files],
            "locks": [lock.model_dump(mode="json") for lock in locks],
            "lock_events": [e.model_dump(mode="json") for e in reply.lock_events] if reply else [],
        }, indent=1))
        return code
    print(f"space {cfg.space} on {cfg.broker}, seen from {cfg.device}")
    print(f"\nDEVICES ({sum(d.state == 'online' for d in devices)} of {len(devices)} online)")
    for d in devices:
        mark = "●" if d.state == "online" else "○"
        if d.state == "online":
            seen = f"online since {_when(d.since)}"
        else:
            seen = f"last seen {_when(d.last_seen)}" if d.last_seen else "last seen: unknown"
        busy = (f"  sending {', '.join(d.sending)}" if d.sending else "") + (
            f"  receiving {', '.join(d.receiving)}" if d.receiving else "")
        me = "  (this device)" if d.device == cfg.device else ""
        print(f"  {mark} {d.device:<20} {d.state:<8} {d.host[:20]:<20} {seen}{busy}{me}")
    print(f"\nFILES ({len(files)})")
    print(f"  {'file':<32} {'version':>7} {'size':>10}  {'author':<16} {'lock':<24} local")
    for f in files:
        lock_text = f"locked by {got.locks[f.file_id].holder}" if f.lock else "-"
        version = f"v{f.version}" if f.version else "-"
        size = human_size(f.size) if f.size is not None else "-"
        print(f"  {f.file_id:<32} {version:>7} {size:>10}  {f.author or '-':<16} {lock_text:<24} {f.local}")
    print(f"\nLOCKS ({len(locks)})")
    for lock in locks:
        print(f"  {lock.file_id}: {describe(lock)}")
    if reply is not None and reply.lock_events:
        print("\nRECENT LOCK EVENTS")
        for e in reply.lock_events[:10]:
            by = f" by {e.by}" if e.by and e.by != e.holder else ""
            print(f"  {_when(e.time)}  {e.file_id}: {e.kind.value} ({e.holder}){by}")
    return code
