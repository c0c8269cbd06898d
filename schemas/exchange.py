"""Blob exchange over MQTT: windowed, verified pulls of chunks by hash, and serving them to others.

Both sides of a transfer live here so the agent and the coordinator run the same code:
:class:`BlobExchange` routes incoming data frames to the fetches that want them and answers
requests from a :class:`BlobSource`.  Flow control is end-to-end: a receiver never has more than
its window of blobs requested, and a provider keeps at most ``max_unacked`` frames queued in
its client before it reads more from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import blake3
from pydantic import ValidationError

from schemas.frames import Frame, FrameError, FrameStatus, decode_frame, encode_frame
from schemas.messages import MAX_HASHES_PER_REQUEST, ChunkRequest, encode, first_error
from schemas.pull import PullPlan
from schemas.topics import device_request_topic, hub_request_topic, reply_topic

log = logging.getLogger("atrius.exchange")

HUB = "hub"
"""Provider name of the coordinator; devices are named ``dev:<device>``."""


def device_provider(device: str) -> str:
    return f"dev:{device}"


def provider_topic(space: str, provider: str) -> str:
    if provider == HUB:
        return hub_request_topic(space)
    if provider.startswith("dev:"):
        return device_request_topic(space, provider[4:])
    raise ValueError(f"unknown provider {provider!r}")


class Transport(Protocol):
    """What the exchange needs of an MQTT session (:class:`schemas.mqtt.MqttSession` in production)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> object: ...

    def out_queue(self) -> int: ...


class BlobSink(Protocol):
    def put(self, digest: str, data: memoryview) -> None:
        """Store a blob whose hash has already been verified."""


class BlobSource(Protocol):
    def read_blobs(self, space: str, file_id: str, digests: list[str]) -> list[tuple[str, bytes | None]]:
        """Blocking: return each blob (verified against its hash) or None when not held."""


class FetchFailed(RuntimeError):
    """A fetch that could not finish: every provider kept failing until the deadline."""


class FetchAborted(RuntimeError):
    """The caller no longer wants this fetch (a newer version superseded it)."""


@dataclass(eq=False)
class _Fetch:
    space: str
    file_id: str
    plan: PullPlan
    sink: BlobSink
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    on_progress: Callable[[int], None] | None = None
    error: Exception | None = None
    """Set when the sink failed (e.g. disk full): the fetch raises it."""


class BlobExchange:
    """Routes data frames to fetches and serves requests; ``me`` is None for the coordinator."""

    def __init__(
        self,
        session: Transport,
        me: str | None,
        source: BlobSource,
        *,
        window: int = 64,
        timeout: float = 3.0,
        max_unacked: int = 96,
        serve_queue: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.me = me
        self.source = source
        self.window = window
        self.timeout = timeout
        self.max_unacked = max_unacked
        self._clock = clock
        self._fetches: set[_Fetch] = set()
        self._by_hash: dict[str, set[_Fetch]] = {}
        self._serve_q: asyncio.Queue[tuple[str, ChunkRequest]] = asyncio.Queue(serve_queue)
        self._server_task: asyncio.Task[None] | None = None
        self.frames_dropped = 0
        self.requests_dropped = 0
        self.bytes_served = 0

    # -- receiving --------------------------------------------------------------------------
    async def fetch(
        self,
        space: str,
        file_id: str,
        digests: list[str],
        providers: Callable[[], list[str]],
        sink: BlobSink,
        *,
        give_up_after: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Pull every blob in ``digests`` into ``sink``; returns when all arrived and were verified."""
        plan = PullPlan(digests, providers(), window=self.window, timeout=self.timeout)
        f = _Fetch(space, file_id, plan, sink, on_progress=on_progress)
        started = self._clock()
        self._fetches.add(f)
        for d in dict.fromkeys(digests):
            self._by_hash.setdefault(d, set()).add(f)
        try:
            while not plan.done:
                if f.error is not None:
                    raise f.error
                now = self._clock()
                if give_up_after is not None and now - started > give_up_after:
                    raise FetchFailed(f"{file_id}: {plan.remaining} blobs still missing after {give_up_after:.0f}s")
                plan.set_providers(providers())
                for provider, batch in plan.poll(now):
                    self._request(space, file_id, provider, batch)
                delay = max(0.005, min(plan.next_deadline(now) - now, 1.0))
                f.wake.clear()
                if plan.done:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(f.wake.wait(), delay)
            if f.error is not None:  # the last blob's put may have failed after the plan finished
                raise f.error
        finally:
            self._fetches.discard(f)
            for d in plan_keys(digests):
                holders = self._by_hash.get(d)
                if holders is not None:
                    holders.discard(f)
                    if not holders:
                        del self._by_hash[d]

    def abort(self, space: str, file_id: str, reason: str) -> None:
        """End every running fetch for this file with FetchAborted (e.g. a newer version arrived)."""
        for f in self._fetches:
            if f.space == space and f.file_id == file_id and f.error is None:
                f.error = FetchAborted(f"{file_id}: {reason}")
                f.wake.set()

    def _request(self, space: str, file_id: str, provider: str, batch: list[str]) -> None:
        for i in range(0, len(batch), MAX_HASHES_PER_REQUEST):
            part = batch[i : i + MAX_HASHES_PER_REQUEST]
            req = ChunkRequest(req_id=uuid.uuid4().hex[:16], requester=self.me, file_id=file_id, hashes=part)
            self.session.publish(provider_topic(space, provider), encode(req))

    def on_data(self, payload: bytes) -> None:
        """A frame arrived on our data topic: verify it and hand it to every fetch that wants it."""
        try:
            frame = decode_frame(payload)
        except FrameError as exc:
            self.frames_dropped += 1
            log.warning("dropped data frame: %s", exc)
            return
        holders = self._by_hash.get(frame.hash)
        if not holders:
            self.frames_dropped += 1
            log.debug("dropped unsolicited frame %s", frame.hash[:12])
            return
        if frame.status is FrameStatus.MISSING:
            now = self._clock()
            for f in list(holders):
                f.plan.missing_current(frame.hash, now)
                f.wake.set()
            return
        if not self._verify(frame):
            return
        for f in list(holders):
            if f.error is None and f.plan.received(frame.hash):
                try:
                    f.sink.put(frame.hash, frame.data)
                    if f.on_progress:
                        f.on_progress(len(frame.data))
                except Exception as exc:  # the sink's own failure ends that fetch, not the session
                    f.error = exc
                f.wake.set()

    def _verify(self, frame: Frame) -> bool:
        if blake3.blake3(frame.data).hexdigest() != frame.hash:
            self.frames_dropped += 1
            log.warning("dropped frame: content does not match hash %s", frame.hash[:12])
            return False
        return True

    # -- serving ----------------------------------------------------------------------------
    def on_request(self, space: str, payload: bytes) -> None:
        try:
            req = ChunkRequest.model_validate_json(payload)
        except ValidationError as exc:
            self.requests_dropped += 1
            log.warning("dropped malformed chunk request in %s: %s", space, first_error(exc))
            return
        try:
            self._serve_q.put_nowait((space, req))
        except asyncio.QueueFull:
            self.requests_dropped += 1
            log.debug("serve queue full; dropped request %s (the requester will retry)", req.req_id)
            return

    def start(self) -> None:
        """Start serving requests (call once, from the loop)."""
        self._server_task = asyncio.get_running_loop().create_task(self._serve_loop(), name="blob-server")

    async def _serve_loop(self) -> None:
        while True:
            space, req = await self._serve_q.get()
            try:
                await self._serve(space, req)
            except Exception:  # one failed request must not stop serving the others
                log.exception("serving request %s for %s failed", req.req_id, req.file_id)

    async def _serve(self, space: str, req: ChunkRequest) -> None:
        blobs = await asyncio.to_thread(self.source.read_blobs, space, req.file_id, list(req.hashes))
        topic = reply_topic(space, req.requester)
        for digest, data in blobs:
            while self.session.connected and self.session.out_queue() >= self.max_unacked:
                await asyncio.sleep(0.001)
            if not self.session.connected:
                return  # the requester re-asks after reconnecting; don't queue stale frames in paho
            if data is None:
                self.session.publish(topic, encode_frame(FrameStatus.MISSING, digest))
            else:
                self.session.publish(topic, encode_frame(FrameStatus.OK, digest, data))
                self.bytes_served += len(data)

    async def close(self) -> None:
        if self._server_task is not None:
            self._server_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server_task


def plan_keys(digests: list[str]) -> list[str]:
    return list(dict.fromkeys(digests))
