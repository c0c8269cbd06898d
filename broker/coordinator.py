"""The coordinator: the store of record for every space on its broker.

It connects to any MQTT 3.1.1 broker as an ordinary client (in-process beside the embedded
broker in ``atrius hub``, or alone against Mosquitto in ``atrius coordinator``) and:

- records every head it sees in the version history (:mod:`broker.history`);
- pulls each version's manifest pages and chunks into the content-addressed store
  (:mod:`broker.store`) with the same windowed, hash-verified pull the agents use, from the
  author and any other online device of the space;
- serves those blobs on ``hub/req``, so a device catches up even when the author is gone;
- answers ``hub/rpc``: ``versions`` (history pages), ``restore`` (publish version N's content as
  a new head), ``lock`` / ``unlock`` (it is the only publisher of the retained lock topics, and
  puts its own state back when anything else appears there), ``status`` (device registry);
- marks concurrent edits that lost as conflicts in the history and stores their content;
- keeps a registry of every device with when it was last seen;
- re-publishes the latest head of every file after (re)connecting when the broker holds none
  (the embedded broker keeps no retained messages across a restart);
- applies the retention policy and repairs blobs found corrupt on disk.

One coordinator serves every space.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from broker.history import History, Record
from broker.locks import LockBook
from broker.registry import DeviceRegistry
from broker.store import ChunkStore, StoreError
from schemas.exchange import BlobExchange, FetchAborted, FetchFailed, device_provider
from schemas.locks import decide_lock, decide_unlock, expire
from schemas.manifest import ChunkRef, ManifestError, decode_inline, decode_page
from schemas.messages import (
    HUB_REQUEST,
    MAX_HEADS_PAGE_BYTES,
    MAX_STATUS_DEVICES,
    MAX_STATUS_EVENTS,
    Head,
    HeadsReply,
    HeadsRequest,
    LockEvent,
    LockReply,
    LockRequest,
    LockState,
    MessageError,
    Model,
    RestoreReply,
    RestoreRequest,
    StatusReply,
    StatusRequest,
    UnlockRequest,
    VersionsReply,
    VersionsRequest,
    decode_head,
    decode_lock,
    decode_presence,
    encode,
    first_error,
)
from schemas.mqtt import STATE_QOS, BrokerUrl, MqttSession
from schemas.names import check_name
from schemas.rules import Relation, next_vector, relation, supersedes
from schemas.topics import (
    ROOT,
    TopicError,
    TopicKind,
    all_conflicts_filter,
    all_heads_filter,
    all_locks_filter,
    all_presence_filter,
    head_topic,
    lock_topic,
    parse_topic,
    rpc_reply_topic,
)

log = logging.getLogger("atrius.coordinator")

RETRY_DELAY = 5.0
MAX_RETRY_DELAY = 120.0
REPUBLISH_GRACE = 1.5
PULL_DELAY = 1.0
PULL_YIELD_RATE = 50e6
MAX_PULL_DELAY = 30.0
GC_INTERVAL = 600.0
MAX_PARALLEL_PULLS = 8
"""Versions fetched at once: a folder of 10,000 new files must not become 10,000 concurrent
requests to one device (its queue, and the broker's per-client queue, would overflow)."""
CONFLICT_LOOKBACK = 50
"""Recent history entries checked for lost conflicts that a new head was built on."""
LOCK_TICK = 1.0
"""How often lock TTLs are checked."""


def pull_delay(size: int) -> float:
    """How long the coordinator waits before pulling a new version.

    Receivers go first: the author's upload and the broker are not split with the coordinator
    while devices are fetching (on the embedded broker both share one core), and a version
    replaced meanwhile is not fetched at all.  The wait grows with the size, by the time a
    transfer takes at ``PULL_YIELD_RATE``, up to ``MAX_PULL_DELAY``.
    """
    return min(PULL_DELAY + size / PULL_YIELD_RATE, MAX_PULL_DELAY)


@dataclass(frozen=True)
class Retention:
    keep_versions: int | None = None
    keep_days: float | None = None

    @property
    def keeps_all(self) -> bool:
        return self.keep_versions is None and self.keep_days is None

    def keep(self, records: list[Record], now: float) -> list[Record]:
        """Records (newest first) to keep; the current version (the newest that is not a conflict
        loser) is always kept."""
        current = next((r for r in records if not r.conflict), None)
        kept = []
        for i, rec in enumerate(records):
            young = self.keep_days is None or now - rec.entry.time <= self.keep_days * 86400
            within = self.keep_versions is None or i < self.keep_versions
            if rec is current or (young and within):
                kept.append(rec)
        return kept


@dataclass(frozen=True)
class RetentionPolicy:
    """The default retention plus per-space overrides (a field an override leaves unset is inherited)."""

    default: Retention = Retention()
    spaces: tuple[tuple[str, Retention], ...] = ()

    def for_space(self, space: str) -> Retention:
        r = dict(self.spaces).get(space)
        if r is None:
            return self.default
        return Retention(
            keep_versions=r.keep_versions if r.keep_versions is not None else self.default.keep_versions,
            keep_days=r.keep_days if r.keep_days is not None else self.default.keep_days,
        )

    @property
    def keeps_all(self) -> bool:
        return self.default.keeps_all and all(r.keeps_all for _, r in self.spaces)

    @classmethod
    def parse(cls, keep_versions: list[str], keep_days: list[str]) -> RetentionPolicy:
        """From CLI values ``N`` (every space) or ``SPACE=N`` (that space); raises ValueError."""
        versions = {space: int(n) for space, n in _space_values("--keep-versions", keep_versions, int)}
        days = {space: float(n) for space, n in _space_values("--keep-days", keep_days, float)}
        default = Retention(keep_versions=versions.pop("", None), keep_days=days.pop("", None))
        spaces = sorted(set(versions) | set(days))
        return cls(default, tuple((s, Retention(versions.get(s), days.get(s))) for s in spaces))


def _space_values(flag: str, values: list[str], conv: Callable[[str], float]) -> Iterator[tuple[str, float]]:
    """``N`` -> ("", N); ``SPACE=N`` -> (SPACE, N); a value must be a positive number."""
    for text in values:
        space, _sep, number = text.rpartition("=")
        try:
            value = conv(number)
        except ValueError as exc:
            raise ValueError(f"{flag} {text!r}: not a number") from exc
        if value <= 0:
            raise ValueError(f"{flag} {text!r}: must be positive")
        if space:
            try:
                check_name(space)
            except ValueError as exc:
                raise ValueError(f"{flag} {text!r}: {exc}") from exc
        yield space, value


class _StoreSink:
    def __init__(self, store: ChunkStore) -> None:
        self.store = store

    def put(self, digest: str, data: memoryview) -> None:
        self.store.put(digest, data)


class Coordinator:
    def __init__(
        self, url: BrokerUrl, data_dir: Path, *, username: str | None = None, password: str | None = None,
        ca_file: str | None = None, retention: RetentionPolicy | Retention | None = None,
    ) -> None:
        self.url = url
        self.data_dir = data_dir
        self.store = ChunkStore(data_dir)
        self.history = History(data_dir)
        self.retention = retention if isinstance(retention, RetentionPolicy) else RetentionPolicy(
            retention or Retention())
        self._creds = (username, password, ca_file)
        self._pulls: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._pull_heads: dict[tuple[str, str], dict[str, Head]] = {}
        self._pull_slots = asyncio.Semaphore(MAX_PARALLEL_PULLS)
        self._stored: set[tuple[str, str, str]] = set()
        self.locks = LockBook(data_dir)
        self.registry = DeviceRegistry(data_dir)
        self._lock_sent: dict[tuple[str, str], list[bytes]] = {}
        self._file_ids: dict[str, list[str]] = {}
        self._heads_seen: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gc_protect: set[str] | None = None
        self.session: MqttSession
        self.exchange: BlobExchange

    # -- BlobSource (runs in a worker thread) ----------------------------------------------------
    def read_blobs(self, space: str, file_id: str, digests: list[str]) -> list[tuple[str, bytes | None]]:
        before = self.store.corrupt_found
        out = [(d, self.store.get(d)) for d in digests]
        if self.store.corrupt_found != before and self._loop is not None:
            self._loop.call_soon_threadsafe(self._repair, space, file_id)
        return out

    def _spawn(self, coro: Callable[[], Coroutine[Any, Any, object]], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- incoming --------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(topic)
        except TopicError as exc:
            log.warning("dropped message: %s", exc)
            return
        kind = parsed.kind
        if kind is TopicKind.HUB_REQUEST:
            self.exchange.on_request(parsed.space, payload)
        elif kind is TopicKind.HUB_DATA:
            self.exchange.on_data(payload)
        elif kind is TopicKind.HUB_RPC:
            self._on_rpc(parsed.space, payload)
        elif kind is TopicKind.PRESENCE and parsed.device is not None:
            self._on_presence(parsed.space, parsed.device, payload)
        elif kind in (TopicKind.HEAD, TopicKind.CONFLICT) and parsed.file_id is not None and payload:
            try:
                head = decode_head(parsed.file_id, payload)
            except MessageError as exc:
                log.warning("dropped %s in %s", exc, parsed.space)
                return
            if kind is TopicKind.HEAD:
                self._on_head(parsed.space, head)
            else:
                self._on_conflict(parsed.space, head)
        elif kind is TopicKind.LOCK and parsed.file_id is not None:
            self._on_lock_message(parsed.space, parsed.file_id, payload)

    def _on_presence(self, space: str, device: str, payload: bytes) -> None:
        if not payload:
            self.registry.forget(space, device)
            return
        try:
            p = decode_presence(device, payload)
        except MessageError as exc:
            log.warning("dropped %s in %s", exc, space)
            return
        self.registry.update(space, p)

    def _providers(self, space: str, author: str) -> list[str]:
        """The author first, then every other online device of the space (they may hold it too)."""
        online = self.registry.online(space)
        return [device_provider(author)] + [device_provider(d) for d in online if d != author]

    def _on_head(self, space: str, head: Head) -> None:
        self._heads_seen.add((space, head.file_id))
        cur = self.history.latest(space, head.file_id)
        try:
            recorded = self.history.record(space, head)
        except OSError as exc:
            log.error("recording %s/%s v%d failed: %s", space, head.file_id, head.version, exc)
            recorded = False
        if recorded:
            log.info("recorded %s/%s v%d by %s", space, head.file_id, head.version, head.author)
            self._note_id(space, head.file_id)
        if cur is not None and cur.hash != head.hash:
            if recorded and relation(head, cur.head) is Relation.CONCURRENT:
                self._concurrent(space, head, cur)
            if recorded and head.parent != cur.hash:
                self._clear_ancestor_conflicts(space, head)
            if not supersedes(head, cur.head) and not cur.conflict:
                # The broker now retains a head that loses to the one we hold: put the winner back
                # (its author does too, if online; an offline author cannot).
                log.info("%s/%s: the broker got v%d by %s, older than v%d by %s; re-publishing v%d", space,
                         head.file_id, head.version, head.author, cur.version, cur.head.author, cur.version)
                self.session.publish(head_topic(space, head.file_id), encode(cur.head), retain=True)
        self._start_pull(space, head, pull_delay(head.size))

    def _concurrent(self, space: str, head: Head, cur: Record) -> None:
        """Two edits of one version: the rules' winner is the head; record the loser as a conflict."""
        lost = cur.head if supersedes(head, cur.head) else head
        won = head if lost is cur.head else cur.head
        try:
            self.history.mark_conflict(space, head.file_id, lost.version, lost.hash)
        except OSError as exc:
            log.error("marking %s/%s v%d as a conflict failed: %s", space, head.file_id, lost.version, exc)
        log.warning("%s/%s: concurrent edits: v%d by %s wins over v%d by %s (kept as a conflict copy by %s)",
                    space, head.file_id, won.version, won.author, lost.version, lost.author, lost.author)

    def _clear_ancestor_conflicts(self, space: str, head: Head) -> None:
        """A version marked as a lost conflict that the new head was built on lives on: unmark it."""
        try:
            for rec in self.history.recent_conflicts(space, head.file_id, CONFLICT_LOOKBACK):
                if relation(head, rec.head) is Relation.DESCENDS:
                    self.history.mark_conflict(space, head.file_id, rec.version, rec.hash, conflict=False)
                    log.info("%s/%s: v%d by %s lives on in v%d; no longer a conflict", space, head.file_id,
                             rec.version, rec.entry.author, head.version)
        except OSError as exc:
            log.error("updating the history of %s/%s failed: %s", space, head.file_id, exc)

    def _on_conflict(self, space: str, head: Head) -> None:
        """An author's edit that lost before it was published, now a conflict copy on its device."""
        try:
            recorded = self.history.record(space, head, conflict=True)
        except OSError as exc:
            log.error("recording conflict %s/%s by %s failed: %s", space, head.file_id, head.author, exc)
            return
        if recorded:
            log.warning("%s/%s: conflicting edit by %s (based on v%d) recorded; kept as a conflict copy there",
                        space, head.file_id, head.author, head.version - 1)
            self._start_pull(space, head, 0.2)

    def _start_pull(self, space: str, head: Head, delay: float = 0.0) -> None:
        key = (space, head.file_id, head.hash)
        if key in self._stored or (key in self._pulls and not self._pulls[key].done()):
            return
        running = list(self._pull_heads.get((space, head.file_id), {}).values())
        if running and all(relation(head, h) is Relation.DESCENDS for h in running):
            # Only a descendant makes a running pull pointless; a concurrent edit's is kept.
            self.exchange.abort(space, head.file_id, f"superseded by v{head.version}")
        task = asyncio.get_running_loop().create_task(self._pull(space, head, delay),
                                                      name=f"pull:{space}/{head.file_id}")
        self._pulls[key] = task
        self._pull_heads.setdefault((space, head.file_id), {})[head.hash] = head

        def forget(_task: asyncio.Task[None]) -> None:
            self._pulls.pop(key, None)
            heads = self._pull_heads.get((space, head.file_id), {})
            heads.pop(head.hash, None)
            if not heads:
                self._pull_heads.pop((space, head.file_id), None)

        task.add_done_callback(forget)

    def _repair(self, space: str, file_id: str) -> None:
        latest = self.history.latest(space, file_id)
        if latest is not None:
            log.warning("%s/%s: corrupt blob moved aside; fetching it again from devices", space, file_id)
            self._stored.discard((space, file_id, latest.hash))
            self._start_pull(space, latest.head)

    async def _pull(self, space: str, head: Head, start_after: float = 0.0) -> None:
        await asyncio.sleep(start_after)
        latest = self.history.latest(space, head.file_id)
        if latest is not None and head.restored_from is None and relation(latest.head, head) is Relation.DESCENDS:
            log.info("%s/%s v%d superseded before it was fetched; content not stored", space, head.file_id,
                     head.version)
            return
        delay = RETRY_DELAY
        while True:
            try:
                async with self._pull_slots:
                    fetched = await self._pull_once(space, head)
                self._stored.add((space, head.file_id, head.hash))
                if fetched:
                    log.info("stored %s/%s v%d from %s (%d chunks, %d fetched)", space, head.file_id, head.version,
                             head.author, head.chunks, fetched)
                return
            except (FetchFailed, StoreError) as exc:
                latest = self.history.latest(space, head.file_id)
                if latest is not None and relation(latest.head, head) is Relation.DESCENDS:
                    log.warning("%s/%s v%d: %s; superseded, not retrying", space, head.file_id, head.version, exc)
                    return
                log.warning("%s/%s v%d: %s; retrying in %.0fs", space, head.file_id, head.version, exc, delay)
            except ManifestError as exc:
                log.error("%s/%s v%d: bad manifest (%s); not stored", space, head.file_id, head.version, exc)
                return
            except FetchAborted as exc:
                log.info("%s/%s v%d: %s", space, head.file_id, head.version, exc)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)  # the author may be gone for a long time

    def entries_of(self, head: Head) -> list[ChunkRef] | None:
        """The manifest of a head from the store (or inline in the head), or None when a page is missing."""
        entries: list[ChunkRef] = []
        for d in head.manifest:
            page = self.store.get(d)
            if page is None and head.inline_manifest is not None:
                page = decode_inline(head.inline_manifest, d)
            if page is None:
                return None
            entries.extend(decode_page(page))
        return entries

    async def _pull_once(self, space: str, head: Head) -> int:
        if head.deleted or head.size == 0:
            return 0
        sink = _StoreSink(self.store)

        def providers() -> list[str]:
            return self._providers(space, head.author)

        if head.inline_manifest is not None:
            self.store.put(head.manifest[0], decode_inline(head.inline_manifest, head.manifest[0]))
        missing = [d for d in head.manifest if not self.store.has(d)]
        if missing:
            await self.exchange.fetch(space, head.file_id, missing, providers, sink, give_up_after=30)
        entries = self.entries_of(head)
        if entries is None:
            raise FetchFailed("a manifest page vanished from the store")
        if len(entries) != head.chunks or sum(e.length for e in entries) != head.size:
            raise ManifestError("chunk count or size disagrees with the head")
        if self._gc_protect is not None:  # a retention sweep is running: these are in use
            self._gc_protect.update(head.manifest)
            self._gc_protect.update(e.hash for e in entries)
        need = [d for d in dict.fromkeys(e.hash for e in entries) if not self.store.has(d)]
        if need:
            await self.exchange.fetch(space, head.file_id, need, providers, sink, give_up_after=60)
        return len(need) + len(missing)

    # -- rpc ---------------------------------------------------------------------------------------
    def _on_rpc(self, space: str, payload: bytes) -> None:
        try:
            req = HUB_REQUEST.validate_json(payload)
        except ValidationError as exc:
            log.warning("dropped malformed rpc in %s: %s", space, first_error(exc))
            return
        reply: Model
        if isinstance(req, VersionsRequest):
            reply = self._versions(space, req)
        elif isinstance(req, RestoreRequest):
            reply = self._restore(space, req)
        elif isinstance(req, LockRequest):
            reply = self._lock(space, req)
        elif isinstance(req, UnlockRequest):
            reply = self._unlock(space, req)
        elif isinstance(req, HeadsRequest):
            reply = self._heads(space, req)
        else:
            reply = self._status(space, req)
        self.session.publish(rpc_reply_topic(space, req.reply_to), encode(reply))

    # -- locks -------------------------------------------------------------------------------------
    def _current_lock(self, space: str, file_id: str, now: float) -> LockState | None:
        """The lock of a file, expiring it first if its TTL ran out."""
        lock = self.locks.get(space, file_id)
        event = expire(lock, now)
        if event is not None:
            try:
                self._set_lock(space, file_id, None, event)
            except OSError as exc:
                log.error("expiring the lock of %s/%s failed: %s", space, file_id, exc.strerror or exc)
                return lock
            log.info("%s/%s: lock of %s expired", space, file_id, event.holder)
            return None
        return lock

    def _set_lock(self, space: str, file_id: str, lock: LockState | None, event: LockEvent | None) -> None:
        """Save first (raises OSError, nothing published), then publish the retained state."""
        self.locks.set(space, file_id, lock, event)
        self._publish_lock(space, file_id)

    def _publish_lock(self, space: str, file_id: str) -> None:
        lock = self.locks.get(space, file_id)
        payload = encode(lock) if lock is not None else b""
        sent = self._lock_sent.setdefault((space, file_id), [])
        sent.append(payload)
        del sent[:-8]
        self.session.publish(lock_topic(space, file_id), payload, retain=True)

    def _on_lock_message(self, space: str, file_id: str, payload: bytes) -> None:
        """Only the coordinator publishes locks: anything else on the topic is answered with its own state."""
        try:
            seen = decode_lock(file_id, payload)
            valid = True
        except MessageError as exc:
            seen, valid = None, False
            log.warning("malformed lock message on %s/%s (%s); re-asserting the coordinator's state",
                        space, file_id, exc)
        mine = self.locks.get(space, file_id)
        if valid and seen == mine:
            return
        if valid and payload not in self._lock_sent.get((space, file_id), []):
            log.warning("lock message on %s/%s not published by the coordinator (holder %s); re-asserting %s",
                        space, file_id, seen.holder if seen else "none",
                        f"the lock of {mine.holder}" if mine else "unlocked")
        self._publish_lock(space, file_id)

    def _lock(self, space: str, req: LockRequest) -> LockReply:
        now = time.time()
        current = self._current_lock(space, req.file_id, now)
        latest = self.history.latest(space, req.file_id)
        d = decide_lock(current, file_id=req.file_id, requester=req.by, local_hash=req.local_hash,
                        head=latest.head if latest else None, ttl=req.ttl, note=req.note, now=now)
        if d.changed:
            try:
                self._set_lock(space, req.file_id, d.lock, d.event)
            except OSError as exc:
                text = f"the coordinator cannot save the lock: {exc.strerror or exc}"
                log.error("%s/%s: %s", space, req.file_id, text)
                return LockReply(req_id=req.req_id, ok=False, outcome=d.outcome, error=text)
            log.info("%s: %s", space, d.message)
        else:
            log.info("%s/%s: lock for %s refused: %s", space, req.file_id, req.by, d.message)
        return LockReply(req_id=req.req_id, ok=d.ok, outcome=d.outcome, error="" if d.ok else d.message[:500],
                         lock=d.lock, head_version=latest.version if latest else None,
                         head_author=latest.head.author if latest else None)

    def _unlock(self, space: str, req: UnlockRequest) -> LockReply:
        now = time.time()
        current = self._current_lock(space, req.file_id, now)
        d = decide_unlock(current, file_id=req.file_id, requester=req.by, force=req.force, now=now)
        if d.changed:
            try:
                self._set_lock(space, req.file_id, d.lock, d.event)
            except OSError as exc:
                text = f"the coordinator cannot save the lock: {exc.strerror or exc}"
                return LockReply(req_id=req.req_id, ok=False, outcome=d.outcome, error=text)
            log.info("%s: %s", space, d.message)
        return LockReply(req_id=req.req_id, ok=d.ok, outcome=d.outcome, error="" if d.ok else d.message[:500],
                         lock=current)

    async def _lock_expiry(self) -> None:
        while True:
            await asyncio.sleep(LOCK_TICK)
            now = time.time()
            for space in self.locks.spaces():
                for lock in self.locks.locks(space):
                    self._current_lock(space, lock.file_id, now)

    def _ids(self, space: str) -> list[str]:
        """Every file id of a space with a history, sorted (kept up to date as heads are recorded)."""
        ids = self._file_ids.get(space)
        if ids is None:
            ids = self._file_ids[space] = sorted(self.history.files(space))
        return ids

    def _note_id(self, space: str, file_id: str) -> None:
        ids = self._ids(space)
        i = bisect.bisect_left(ids, file_id)
        if i == len(ids) or ids[i] != file_id:
            ids.insert(i, file_id)

    def _heads(self, space: str, req: HeadsRequest) -> HeadsReply:
        ids = self._ids(space)
        i = bisect.bisect_right(ids, req.after) if req.after is not None else bisect.bisect_left(ids, req.prefix)
        heads: list[Head] = []
        size = 0
        while i < len(ids) and ids[i].startswith(req.prefix) and len(heads) < req.limit:
            rec = self.history.latest(space, ids[i])
            if rec is not None:
                size += len(encode(rec.head))
                if heads and size > MAX_HEADS_PAGE_BYTES:
                    break
                heads.append(rec.head)
            i += 1
        more = i < len(ids) and ids[i].startswith(req.prefix)
        return HeadsReply(req_id=req.req_id, heads=heads, more=more)

    def _status(self, space: str, req: StatusRequest) -> StatusReply:
        return StatusReply(req_id=req.req_id, time=time.time(),
                           devices=self.registry.records(space)[:MAX_STATUS_DEVICES],
                           lock_events=self.locks.events(space, MAX_STATUS_EVENTS))

    def _versions(self, space: str, req: VersionsRequest) -> VersionsReply:
        total, entries = self.history.page(space, req.file_id, req.offset, req.limit)
        if total == 0:
            error = f"no versions of {req.file_id!r} in space {space!r}"
            return VersionsReply(req_id=req.req_id, ok=False, error=error)
        return VersionsReply(req_id=req.req_id, ok=True, total=total, versions=entries)

    def _restore(self, space: str, req: RestoreRequest) -> RestoreReply:
        def fail(text: str) -> RestoreReply:
            log.warning("restore of %s/%s v%d refused: %s", space, req.file_id, req.version, text)
            return RestoreReply(req_id=req.req_id, ok=False, error=text)

        latest = self.history.latest(space, req.file_id)
        if latest is None:
            return fail(f"no versions of {req.file_id!r} in space {space!r}")
        rec = self.history.get(space, req.file_id, req.version)
        if rec is None:
            return fail(f"{req.file_id!r} has no version {req.version} (latest is {latest.version})")
        if rec.entry.pruned:
            return fail(f"version {req.version} of {req.file_id!r} was removed by the retention policy")
        src = rec.head
        if not src.deleted and src.size:
            entries = self.entries_of(src)
            if entries is None or not all(self.store.has(e.hash) for e in entries):
                return fail(f"the content of version {req.version} is not in the coordinator's store")
        head = Head(
            file_id=src.file_id, hash=src.hash, size=src.size, version=latest.version + 1, author=req.by,
            deleted=src.deleted, time=time.time(), parent=latest.hash, chunks=src.chunks, manifest=src.manifest,
            inline_manifest=src.inline_manifest, restored_from=req.version, kind=src.kind,
            vector=next_vector(latest.head, req.by, latest.version + 1) if latest.head.vector else {},
        )
        self.history.record(space, head)
        self.history.flush()
        self._stored.add((space, head.file_id, head.hash))
        self.session.publish(head_topic(space, head.file_id), encode(head), retain=True)
        log.info("restored %s/%s v%d as v%d for %s", space, head.file_id, req.version, head.version, req.by)
        return RestoreReply(req_id=req.req_id, ok=True, version=head.version)

    # -- lifecycle -------------------------------------------------------------------------------
    def _on_connected(self) -> None:
        self._heads_seen.clear()
        self._spawn(self._republish_after_grace, "republish")
        for space in self.locks.spaces():  # the embedded broker keeps no retained messages across restarts
            for lock in self.locks.locks(space):
                self._publish_lock(space, lock.file_id)

    async def _republish_after_grace(self) -> None:
        """Give the broker's retained heads time to arrive; publish ours where it has none."""
        await asyncio.sleep(REPUBLISH_GRACE)
        n = 0
        for space in self.history.spaces():
            for file_id in self.history.files(space):
                if (space, file_id) in self._heads_seen:
                    continue
                latest = self.history.latest(space, file_id)
                if latest is not None:
                    await self.session.publish_paced(head_topic(space, file_id), encode(latest.head), retain=True)
                    n += 1
        if n:
            log.info("re-published %d head(s) the broker did not hold", n)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.history.flush_interval)
            self.history.maybe_flush()

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(GC_INTERVAL)
            await self.collect_garbage()

    async def collect_garbage(self) -> int:
        """Apply the retention policy: prune old versions, delete blobs no kept version references."""
        if self.retention.keeps_all:
            return 0
        started = time.time()
        self._gc_protect = keep = set()
        unknown = 0
        now = time.time()
        for space in self.history.spaces():
            for file_id in self.history.files(space):
                records = self.history.records(space, file_id)
                kept = self.retention.for_space(space).keep(records, now)
                kept_keys = {r.key() for r in kept}
                pruned = {r.key() for r in records if r.key() not in kept_keys and not r.entry.pruned}
                if pruned:
                    self.history.mark_pruned(space, file_id, pruned)
                for rec in kept:
                    keep.update(rec.head.manifest)
                    entries = self.entries_of(rec.head) if rec.head.manifest else []
                    if entries is None:
                        # Never fetched (replaced within the pull delay): nothing of it to keep.
                        # A page that rotted on disk, though, hides which chunks are in use.
                        if any(self.store.is_corrupt(d) for d in rec.head.manifest):
                            unknown += 1
                        continue
                    keep.update(e.hash for e in entries)
        self.history.flush()
        try:
            if unknown:
                log.warning("retention: %d kept version(s) have corrupt manifests; no blob deleted this time",
                            unknown)
                return 0
            # ``keep`` is the live set: versions pulled while the sweep runs add their blobs to it.
            removed = await asyncio.to_thread(self.store.sweep, keep, started - 60)
        finally:
            self._gc_protect = None
        log.info("retention: %d unreferenced blob(s) deleted", removed)
        return removed

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        username, password, ca_file = self._creds
        self.session = MqttSession(
            self.url, f"atrius-coordinator-{uuid.uuid4().hex[:8]}", on_message=self._on_message,
            on_connected=self._on_connected, username=username, password=password, ca_file=ca_file,
        )
        self.exchange = BlobExchange(self.session, None, self)
        self.session.subscribe(all_heads_filter("+"), qos=STATE_QOS)
        self.session.subscribe(all_presence_filter("+"), qos=STATE_QOS)
        self.session.subscribe(all_locks_filter("+"), qos=STATE_QOS)
        self.session.subscribe(all_conflicts_filter("+"))
        for leaf in ("req", "data", "rpc"):
            self.session.subscribe(f"{ROOT}/+/hub/{leaf}")
        self.exchange.start()
        self.session.start()
        self._spawn(self._housekeeping, "history-flush")
        self._spawn(self._lock_expiry, "lock-expiry")
        if not self.retention.keeps_all:
            self._spawn(self.collect_garbage, "gc-first")
            self._spawn(self._gc_loop, "gc")
        log.info("coordinator using %s, data in %s", self.url, self.data_dir)
        try:
            await stop.wait()
        finally:
            for task in [*self._pulls.values(), *self._tasks]:
                task.cancel()
            await self.exchange.close()
            await self.session.stop()
            self.history.close()
