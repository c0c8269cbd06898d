"""One-shot commands that talk to the coordinator: ``atrius versions`` and ``atrius restore``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable

from pydantic import ValidationError

from agent.config import AgentConfig
from schemas.messages import (
    HUB_REPLY,
    MAX_REPLY_MESSAGE,
    MAX_VERSIONS_PAGE,
    RestoreReply,
    RestoreRequest,
    VersionEntry,
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


class CommandError(RuntimeError):
    """A command that could not be carried out; the message is shown as one line, exit code 1."""


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

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.token = secrets.token_hex(8)
        self.pending: dict[str, asyncio.Future[VersionsReply | RestoreReply]] = {}
        self.session = MqttSession(
            cfg.broker, f"atrius-cli-{cfg.device}-{self.token[:6]}", on_message=self._on_message,
            username=cfg.username, password=cfg.password, ca_file=cfg.ca_file,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
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

    async def call(self, make: Callable[[str, str], VersionsRequest | RestoreRequest]) -> VersionsReply | RestoreReply:
        req_id = uuid.uuid4().hex
        fut: asyncio.Future[VersionsReply | RestoreReply] = asyncio.get_running_loop().create_future()
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
async def _connect(cfg: AgentConfig) -> AsyncIterator[_Rpc]:
    rpc = _Rpc(cfg)
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
    async with _connect(cfg) as rpc:
        while True:
            reply = await rpc.call(lambda req_id, token: VersionsRequest(
                req_id=req_id, reply_to=token, file_id=file_id, offset=len(out), limit=MAX_VERSIONS_PAGE))
            if not isinstance(reply, VersionsReply) or not reply.ok:
                raise CommandError(getattr(reply, "error", "") or "unexpected reply from the coordinator")
            out.extend(reply.versions)
            if not reply.versions or len(out) >= reply.total:
                return out


async def _restore(cfg: AgentConfig, file_id: str, version: int) -> RestoreReply:
    async with _connect(cfg) as rpc:
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
