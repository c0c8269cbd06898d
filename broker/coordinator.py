"""The coordinator: the store of record for every space on its broker.

It connects to any MQTT 3.1.1 broker as an ordinary client (in-process beside the embedded
broker in ``atrius hub``, or alone against Mosquitto in ``atrius coordinator``) and:

- records every head it sees in the version history (:mod:`broker.history`);
- pulls each version's manifest pages and chunks into the content-addressed store
  (:mod:`broker.store`) with the same windowed, hash-verified pull the agents use, from the
  author and any other online device of the space;
- serves those blobs on ``hub/req``, so a device catches up even when the author is gone;
- answers ``hub/rpc``: ``versions`` (history pages) and ``restore`` (publish version N's
  content as a new head);
- re-publishes the latest head of every file after (re)connecting when the broker holds none
  (the embedded broker keeps no retained messages across a restart);
- applies the retention policy and repairs blobs found corrupt on disk.

One coordinator serves every space.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from broker.history import History, Record
from broker.store import ChunkStore, StoreError
from schemas.exchange import BlobExchange, FetchAborted, FetchFailed, device_provider
from schemas.manifest import ChunkRef, ManifestError, decode_inline, decode_page
from schemas.messages import (
    HUB_REQUEST,
    Head,
    MessageError,
    Model,
    Presence,
    PresenceState,
    RestoreReply,
    RestoreRequest,
    VersionsReply,
    VersionsRequest,
    decode_head,
    decode_presence,
    encode,
    first_error,
)
from schemas.mqtt import BrokerUrl, MqttSession
from schemas.names import check_name
from schemas.rules import presence_is_current
from schemas.topics import (
    ROOT,
    TopicError,
    TopicKind,
    all_heads_filter,
    all_presence_filter,
    head_topic,
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
        """Records (newest first) to keep; the newest is always kept."""
        kept = []
        for i, rec in enumerate(records):
            young = self.keep_days is None or now - rec.entry.time <= self.keep_days * 86400
            within = self.keep_versions is None or i < self.keep_versions
            if i == 0 or (young and within):
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
        self._stored: set[tuple[str, str, str]] = set()
        self._presence: dict[tuple[str, str], Presence] = {}
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
        elif kind is TopicKind.HEAD and parsed.file_id is not None and payload:
            try:
                head = decode_head(parsed.file_id, payload)
            except MessageError as exc:
                log.warning("dropped %s in %s", exc, parsed.space)
                return
            self._on_head(parsed.space, head)

    def _on_presence(self, space: str, device: str, payload: bytes) -> None:
        if not payload:
            self._presence.pop((space, device), None)
            return
        try:
            p = decode_presence(device, payload)
        except MessageError as exc:
            log.warning("dropped %s in %s", exc, space)
            return
        if presence_is_current(p, self._presence.get((space, device))):
            self._presence[(space, device)] = p

    def _providers(self, space: str, author: str) -> list[str]:
        """The author first, then every other online device of the space (they may hold it too)."""
        online = [d for (s, d), p in self._presence.items() if s == space and p.state is PresenceState.ONLINE]
        return [device_provider(author)] + [device_provider(d) for d in sorted(online) if d != author]

    def _on_head(self, space: str, head: Head) -> None:
        self._heads_seen.add((space, head.file_id))
        try:
            if self.history.record(space, head):
                log.info("recorded %s/%s v%d by %s", space, head.file_id, head.version, head.author)
        except OSError as exc:
            log.error("recording %s/%s v%d failed: %s", space, head.file_id, head.version, exc)
        self._start_pull(space, head, pull_delay(head.size))

    def _start_pull(self, space: str, head: Head, delay: float = 0.0) -> None:
        key = (space, head.file_id, head.hash)
        if key in self._stored or (key in self._pulls and not self._pulls[key].done()):
            return
        if any(s == space and f == head.file_id for (s, f, _h) in self._pulls):
            self.exchange.abort(space, head.file_id, f"superseded by v{head.version}")
        task = asyncio.get_running_loop().create_task(self._pull(space, head, delay),
                                                      name=f"pull:{space}/{head.file_id}")
        self._pulls[key] = task

        def forget(_task: asyncio.Task[None]) -> None:
            self._pulls.pop(key, None)

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
        if latest is not None and head.restored_from is None and (latest.version, latest.hash) > (
                head.version, head.hash):
            log.info("%s/%s v%d superseded before it was fetched; content not stored", space, head.file_id,
                     head.version)
            return
        delay = RETRY_DELAY
        while True:
            try:
                fetched = await self._pull_once(space, head)
                self._stored.add((space, head.file_id, head.hash))
                if fetched:
                    log.info("stored %s/%s v%d from %s (%d chunks, %d fetched)", space, head.file_id, head.version,
                             head.author, head.chunks, fetched)
                return
            except (FetchFailed, StoreError) as exc:
                latest = self.history.latest(space, head.file_id)
                if latest is not None and latest.hash != head.hash:
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
        reply = self._versions(space, req) if isinstance(req, VersionsRequest) else self._restore(space, req)
        self.session.publish(rpc_reply_topic(space, req.reply_to), encode(reply))

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
            inline_manifest=src.inline_manifest, restored_from=req.version,
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
                    self.session.publish(head_topic(space, file_id), encode(latest.head), retain=True)
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
        self.session.subscribe(all_heads_filter("+"))
        self.session.subscribe(all_presence_filter("+"))
        for leaf in ("req", "data", "rpc"):
            self.session.subscribe(f"{ROOT}/+/hub/{leaf}")
        self.exchange.start()
        self.session.start()
        self._spawn(self._housekeeping, "history-flush")
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
