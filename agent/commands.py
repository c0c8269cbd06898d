"""One-shot commands that talk to the coordinator: ``versions``, ``restore``, ``lock``, ``unlock``, ``status``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable

from pydantic import ValidationError

from agent.chunker import hash_file
from agent.config import AgentConfig
from schemas.locks import EXIT_LOCKED_OUTCOMES, describe
from schemas.messages import (
    HUB_REPLY,
    MAX_REPLY_MESSAGE,
    MAX_TTL,
    MAX_VERSIONS_PAGE,
    Head,
    HeadsReply,
    HeadsRequest,
    HubReplyModel,
    HubRequestModel,
    LockOutcome,
    LockReply,
    LockRequest,
    RestoreReply,
    RestoreRequest,
    UnlockRequest,
    VersionEntry,
    VersionKind,
    VersionsReply,
    VersionsRequest,
    encode,
    first_error,
)
from schemas.mqtt import MqttSession
from schemas.names import check_file_id
from schemas.topics import hub_rpc_topic, rpc_reply_topic

log = logging.getLogger("atrius.cli")

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 5.0
EXIT_LOCKED = 3


class CommandError(RuntimeError):
    """A command that could not be carried out; the message is shown as one line, exit code 1."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d``, ``1h30m`` -> seconds; ValueError otherwise."""
    t = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(t):
        m = _DURATION_RE.match(t, pos)
        if m is None:
            raise ValueError(f"{text!r} is not a duration (examples: 90s, 30m, 2h, 1d, 1h30m)")
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not t or total <= 0:
        raise ValueError(f"{text!r} is not a positive duration (examples: 90s, 30m, 2h, 1d)")
    if total > MAX_TTL:
        raise ValueError(f"{text!r} is longer than the maximum of {MAX_TTL / 86400:.0f} days")
    return total


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "unknown"


def human_size(n: int) -> str:
    """``12 B``, ``4.5 KiB``, ``1.2 MiB``... for logs and tables."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def resolve_file_id(cfg: AgentConfig, name: str) -> str:
    """FILE_ID argument: a logical id, or a local path the config maps to an id."""
    entry = cfg.resolve(name)
    if entry is not None:
        return entry.file_id
    try:
        return check_file_id(name)
    except ValueError as exc:
        raise CommandError(f"{name!r} is neither a listed file nor a valid file id: {exc}") from exc


class _Rpc:
    """Request/reply with the coordinator over ``hub/rpc`` and a private ``reply/{token}`` topic."""

    def __init__(self, cfg: AgentConfig, on_other: Callable[[str, bytes], None] | None = None, *,
                 on_connected: Callable[[], None] | None = None,
                 on_disconnected: Callable[[], None] | None = None, role: str = "cli") -> None:
        self.cfg = cfg
        self.on_other = on_other
        self.token = secrets.token_hex(8)
        self.reply_topic = rpc_reply_topic(cfg.space, self.token)
        self.pending: dict[str, asyncio.Future[HubReplyModel]] = {}
        self.session = MqttSession(
            cfg.broker, f"atrius-{role}-{cfg.device}-{self.token[:6]}", on_message=self._on_message,
            on_connected=on_connected, on_disconnected=on_disconnected, quiet_connect=True,
            username=cfg.username, password=cfg.password, ca_file=cfg.ca_file,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != self.reply_topic:
            if self.on_other is not None:
                self.on_other(topic, payload)
            return
        if len(payload) > MAX_REPLY_MESSAGE:
            log.warning("dropped oversized reply")
            return
        try:
            reply = HUB_REPLY.validate_json(payload)
        except ValidationError as exc:
            log.warning("dropped malformed reply: %s", first_error(exc))
            return
        fut = self.pending.get(reply.req_id)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    async def call(self, make: Callable[[str, str], HubRequestModel]) -> HubReplyModel:
        req_id = uuid.uuid4().hex
        fut: asyncio.Future[HubReplyModel] = asyncio.get_running_loop().create_future()
        self.pending[req_id] = fut
        try:
            self.session.publish(hub_rpc_topic(self.cfg.space), encode(make(req_id, self.token)))
            return await asyncio.wait_for(fut, REPLY_TIMEOUT)
        except TimeoutError as exc:
            raise CommandError(
                f"no answer from the coordinator within {REPLY_TIMEOUT:.0f} s "
                f"(is `atrius hub` or `atrius coordinator` running for {self.cfg.broker}?)") from exc
        finally:
            self.pending.pop(req_id, None)


@contextlib.asynccontextmanager
async def connect_rpc(cfg: AgentConfig, rpc: _Rpc | None = None) -> AsyncIterator[_Rpc]:
    """A connection of its own to ask the coordinator (``rpc.call``); CommandError if unreachable."""
    rpc = rpc or _Rpc(cfg)
    rpc.session.subscribe(rpc_reply_topic(cfg.space, rpc.token))
    rpc.session.start()
    try:
        if not await rpc.session.wait_connected(CONNECT_TIMEOUT):
            raise CommandError(f"cannot reach broker {cfg.broker} within {CONNECT_TIMEOUT:.0f} s")
        await asyncio.sleep(0.05)  # let the SUBSCRIBE reach the broker before the request
        yield rpc
    finally:
        await rpc.session.stop()


async def _all_versions(cfg: AgentConfig, file_id: str) -> list[VersionEntry]:
    out: list[VersionEntry] = []
    async with connect_rpc(cfg) as rpc:
        while True:
            reply = await rpc.call(lambda req_id, token: VersionsRequest(
                req_id=req_id, reply_to=token, file_id=file_id, offset=len(out), limit=MAX_VERSIONS_PAGE))
            if not isinstance(reply, VersionsReply) or not reply.ok:
                raise CommandError(getattr(reply, "error", "") or "unexpected reply from the coordinator")
            out.extend(reply.versions)
            if not reply.versions or len(out) >= reply.total:
                return out


async def _restore(cfg: AgentConfig, file_id: str, version: int) -> RestoreReply:
    async with connect_rpc(cfg) as rpc:
        reply = await rpc.call(lambda req_id, token: RestoreRequest(
            req_id=req_id, reply_to=token, file_id=file_id, version=version, by=cfg.device))
    if not isinstance(reply, RestoreReply):
        raise CommandError("unexpected reply from the coordinator")
    return reply


def cmd_versions(cfg: AgentConfig, name: str, *, as_json: bool) -> int:
    file_id = resolve_file_id(cfg, name)

    entries = asyncio.run(_all_versions(cfg, file_id))
    if as_json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=1))
        return 0
    print(f"{file_id}: {len(entries)} version(s), newest first")
    print(f"{'version':>7}  {'time (local)':19}  {'author':16}  {'size':>12}  {'hash':12}  note")
    for e in entries:
        note = []
        if e.kind is VersionKind.CONFLICT:
            note.append(f"conflict: lost to a concurrent edit, kept as a conflict copy on {e.author}")
        if e.restored_from:
            note.append(f"restore of v{e.restored_from}")
        if e.deleted:
            note.append("deleted")
        if e.pruned:
            note.append("content pruned")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
        print(f"{e.version:>7}  {when:19}  {e.author:16}  {e.size:>12,}  {e.hash[:12]}  {', '.join(note)}")
    return 0


def cmd_restore(cfg: AgentConfig, name: str, version: int) -> int:
    file_id = resolve_file_id(cfg, name)

    reply = asyncio.run(_restore(cfg, file_id, version))
    if not reply.ok:
        raise CommandError(reply.error)
    print(f"{file_id}: version {version} restored as version {reply.version}; every device will receive it")
    return 0


async def _lock_call(cfg: AgentConfig, make: Callable[[str, str], HubRequestModel]) -> LockReply:
    async with connect_rpc(cfg) as rpc:
        reply = await rpc.call(make)
    if not isinstance(reply, LockReply):
        raise CommandError("unexpected reply from the coordinator")
    return reply


def _local_hash(cfg: AgentConfig, name: str) -> str | None:
    entry = cfg.resolve(name)
    if entry is None:
        return None
    try:
        return hash_file(entry.path)[0]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CommandError(f"cannot read {entry.path}: {exc.strerror or exc}") from exc


def cmd_lock(cfg: AgentConfig, name: str, *, ttl: float | None, note: str) -> int:
    """Exit 0 granted, 3 held by another device, 1 refused (stale copy, unknown file) or failed."""
    file_id = resolve_file_id(cfg, name)
    local = _local_hash(cfg, name)
    reply = asyncio.run(_lock_call(cfg, lambda req_id, token: LockRequest(
        req_id=req_id, reply_to=token, file_id=file_id, by=cfg.device, local_hash=local, ttl=ttl, note=note)))
    if reply.ok and reply.lock is not None:
        verb = "lock renewed" if reply.outcome is LockOutcome.RENEWED else "locked"
        until = f"until {_when(reply.lock.expires_at)}" if reply.lock.expires_at else "until you unlock it"
        print(f"{file_id}: {verb} by {cfg.device} at v{reply.lock.version or reply.head_version}, {until}; "
              "other devices now have it read-only")
        return 0
    if reply.outcome in EXIT_LOCKED_OUTCOMES:
        log.error("%s", reply.error)
        return EXIT_LOCKED
    raise CommandError(reply.error or f"lock refused ({reply.outcome.value})")


def cmd_unlock(cfg: AgentConfig, name: str, *, force: bool) -> int:
    """Exit 0 released (or not locked), 3 held by another device and no ``--force``."""
    file_id = resolve_file_id(cfg, name)
    reply = asyncio.run(_lock_call(cfg, lambda req_id, token: UnlockRequest(
        req_id=req_id, reply_to=token, file_id=file_id, by=cfg.device, force=force)))
    if reply.outcome is LockOutcome.NOT_LOCKED:
        print(f"{file_id}: not locked")
        return 0
    if reply.outcome is LockOutcome.FORCED and reply.lock is not None:
        print(f"{file_id}: lock of {describe(reply.lock)} broken by {cfg.device} (recorded in the lock history)")
        return 0
    if reply.ok:
        print(f"{file_id}: unlocked")
        return 0
    if reply.outcome in EXIT_LOCKED_OUTCOMES:
        log.error("%s", reply.error)
        return EXIT_LOCKED
    raise CommandError(reply.error or f"unlock refused ({reply.outcome.value})")


async def head_pages(rpc: _Rpc, prefix: str = "") -> AsyncIterator[list[Head]]:
    """Every latest head the coordinator holds whose id starts with ``prefix``, a page at a time."""
    after: str | None = None
    while True:
        reply = await rpc.call(functools.partial(_heads_request, prefix, after))
        if not isinstance(reply, HeadsReply):
            return
        if reply.heads:
            yield reply.heads
        if not reply.more or not reply.heads:
            return
        after = reply.heads[-1].file_id


def _heads_request(prefix: str, after: str | None, req_id: str, token: str) -> HeadsRequest:
    return HeadsRequest(req_id=req_id, reply_to=token, prefix=prefix, after=after)
