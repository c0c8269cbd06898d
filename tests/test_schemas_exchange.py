"""Tests for schemas/exchange.py: BlobExchange fetching and serving blobs over an in-memory fake bus.

``FakeBus`` stands in for the broker the way httpx's ``MockTransport`` stands in for the network:
each party (the coordinator ``hub`` or a device) gets a :class:`FakeTransport`, and every publish
is delivered asynchronously (``loop.call_soon``) to the exchange that owns the topic.  An
``intercept`` hook may drop, delay, duplicate or tamper with any message, and every publish is
recorded.  Each test runs its own event loop with ``asyncio.run`` and short timeouts.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import blake3
import pytest

from schemas.exchange import HUB, BlobExchange, FetchAborted, FetchFailed, device_provider
from schemas.frames import Frame, FrameStatus, decode_frame, encode_frame
from schemas.messages import MAX_HASHES_PER_REQUEST, ChunkRequest, encode
from schemas.topics import (
    ParsedTopic,
    TopicKind,
    device_data_topic,
    device_request_topic,
    hub_data_topic,
    hub_request_topic,
    parse_topic,
)

SPACE = "team"
FILE = "docs/report.txt"
OTHER_FILE = "docs/other.txt"
T = TypeVar("T")

_REQUEST_KINDS = {TopicKind.DEVICE_REQUEST, TopicKind.HUB_REQUEST}
_DATA_KINDS = {TopicKind.DEVICE_DATA, TopicKind.HUB_DATA}


# -- the fake bus ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One publish as the bus saw it (before any interception)."""

    sender: str
    """The publishing party: ``hub`` or a device name; ``outsider`` for :meth:`FakeBus.inject`."""
    topic: str
    payload: bytes
    at: float

    @property
    def parsed(self) -> ParsedTopic:
        return parse_topic(self.topic)

    @property
    def target(self) -> str:
        p = self.parsed
        return HUB if p.kind in {TopicKind.HUB_REQUEST, TopicKind.HUB_DATA} else str(p.device)


Delivery = list[tuple[float, bytes]]
"""What the bus delivers for one publish: (delay in seconds, payload) pairs; [] drops it."""

Intercept = Callable[[Message], Delivery | None]
"""Returns the deliveries for a message, or None to deliver it unchanged."""


class FakeTransport:
    """One party's session: publishes go to the bus; ``out_queue`` is whatever the test says."""

    def __init__(self, bus: FakeBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.connected = True
        self.unacked = 0
        """Publishes the 'broker' has not acknowledged; what ``out_queue`` reports."""
        self.hold_acks = False
        """When set, every publish adds one to ``unacked`` until the test calls :meth:`ack_all`."""
        self.max_unacked_seen = 0

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> object:
        if self.hold_acks:
            self.unacked += 1
            self.max_unacked_seen = max(self.max_unacked_seen, self.unacked)
        self.bus.publish(self.name, topic, payload)
        return None

    def out_queue(self) -> int:
        return self.unacked

    def ack_all(self) -> None:
        self.unacked = 0


class FakeBus:
    """Routes ``dev/<name>/req`` and ``hub/req`` to that party's ``on_request``, ``dev/<name>/data``
    and ``hub/data`` to its ``on_data``; records every publish and counts outstanding hashes."""

    def __init__(self) -> None:
        self.parties: dict[str, BlobExchange] = {}
        self.transports: dict[str, FakeTransport] = {}
        self.published: list[Message] = []
        self.undeliverable: list[Message] = []
        self.intercept: Intercept | None = None
        self.hashes_requested = 0
        self.frames_delivered = 0
        self.max_outstanding = 0
        """Most hashes ever requested but not yet answered by a delivered frame."""

    def party(self, name: str, blobs: dict[str, bytes] | DictSource | None = None, **kw: float) -> BlobExchange:
        """A BlobExchange for ``name`` (``hub`` = the coordinator) serving ``blobs``; not started."""
        source = blobs if isinstance(blobs, DictSource) else DictSource(blobs or {})
        transport = self.transports[name] = FakeTransport(self, name)
        options: dict[str, float] = {"timeout": 0.2, **kw}
        ex = BlobExchange(
            transport,
            None if name == HUB else name,
            source,
            window=int(options.pop("window", 64)),
            timeout=options.pop("timeout"),
            max_unacked=int(options.pop("max_unacked", 96)),
            serve_queue=int(options.pop("serve_queue", 1024)),
        )
        assert not options, options
        self.parties[name] = ex
        return ex

    def server(self, name: str, blobs: dict[str, bytes] | DictSource | None = None, **kw: float) -> BlobExchange:
        ex = self.party(name, blobs, **kw)
        ex.start()
        return ex

    def publish(self, sender: str, topic: str, payload: bytes) -> None:
        msg = Message(sender, topic, bytes(payload), time.monotonic())
        self.published.append(msg)
        kind = msg.parsed.kind
        if kind in _REQUEST_KINDS and sender != "outsider":
            self.hashes_requested += len(ChunkRequest.model_validate_json(payload).hashes)
            self.max_outstanding = max(self.max_outstanding, self.hashes_requested - self.frames_delivered)
        deliveries = self.intercept(msg) if self.intercept is not None else None
        if deliveries is None:
            deliveries = [(0.0, msg.payload)]
        loop = asyncio.get_running_loop()
        for delay, data in deliveries:
            if delay > 0:
                loop.call_later(delay, self._deliver, msg, data)
            else:
                loop.call_soon(self._deliver, msg, data)

    def inject(self, topic: str, payload: bytes) -> None:
        """A message from someone outside the test's parties (a hostile or confused client)."""
        self.publish("outsider", topic, payload)

    def _deliver(self, msg: Message, data: bytes) -> None:
        parsed = msg.parsed
        ex = self.parties.get(msg.target)
        if ex is None:
            self.undeliverable.append(msg)
            return
        if parsed.kind in _DATA_KINDS:
            self.frames_delivered += 1
            ex.on_data(data)
        elif parsed.kind in _REQUEST_KINDS:
            ex.on_request(parsed.space, data)

    # -- what was said ------------------------------------------------------------------------
    def requests(self, to: str | None = None) -> list[ChunkRequest]:
        """Chunk requests sent by the parties (not injected), optionally only those addressed to ``to``."""
        return [
            ChunkRequest.model_validate_json(m.payload)
            for m in self.published
            if m.parsed.kind in _REQUEST_KINDS and m.sender != "outsider" and (to is None or m.target == to)
        ]

    def asks_for(self, digest: str, sender: str = "alice") -> list[Message]:
        """The requests ``sender`` published that include ``digest``, in order."""
        return [
            m
            for m in self.published
            if m.sender == sender
            and m.parsed.kind in _REQUEST_KINDS
            and digest in ChunkRequest.model_validate_json(m.payload).hashes
        ]

    def asked(self, to: str) -> list[str]:
        """Every hash requested from party ``to``, in order, repeats included."""
        return [h for req in self.requests(to) for h in req.hashes]

    def frames(self, sender: str | None = None, topic: str | None = None) -> list[Frame]:
        return [decode_frame(m.payload) for m in self.frame_messages(sender, topic)]

    def frame_messages(self, sender: str | None = None, topic: str | None = None) -> list[Message]:
        return [
            m
            for m in self.published
            if m.parsed.kind in _DATA_KINDS
            and (sender is None or m.sender == sender)
            and (topic is None or m.topic == topic)
        ]

    async def close(self) -> None:
        for ex in self.parties.values():
            await ex.close()


# -- sources and sinks -------------------------------------------------------------------------------------


class DictSource:
    """A BlobSource over a dict of hash -> bytes; raises for the file ids in ``fail_for``."""

    def __init__(self, blobs: dict[str, bytes], fail_for: frozenset[str] = frozenset()) -> None:
        self.blobs = dict(blobs)
        self.fail_for = fail_for
        self.calls: list[tuple[str, str, list[str]]] = []

    def read_blobs(self, space: str, file_id: str, digests: list[str]) -> list[tuple[str, bytes | None]]:
        self.calls.append((space, file_id, list(digests)))
        if file_id in self.fail_for:
            raise OSError(errno.EIO, f"Input/output error reading {file_id}")
        return [(d, self.blobs.get(d)) for d in digests]


class RecordingSink:
    """Keeps every put; raises ``error`` on put number ``fail_at`` (1-based) and after."""

    def __init__(self, fail_at: int | None = None, error: Exception | None = None) -> None:
        self.puts: list[str] = []
        self.data: dict[str, bytes] = {}
        self.fail_at = fail_at
        self.error = error or OSError(errno.ENOSPC, "No space left on device")
        self.calls = 0

    def put(self, digest: str, data: memoryview) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.error
        self.puts.append(digest)
        self.data[digest] = bytes(data)


def make_blobs(n: int, size: int = 1024, tag: str = "b") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for i in range(n):
        data = (f"{tag}-{i}-".encode() * (size // 4 + 1))[:size]
        out[blake3.blake3(data).hexdigest()] = data
    return out


def only(providers: list[str]) -> Callable[[], list[str]]:
    return lambda: list(providers)


def run(scenario: Callable[[FakeBus], Awaitable[T]], limit: float = 5.0) -> T:
    async def main() -> T:
        bus = FakeBus()
        try:
            return await asyncio.wait_for(scenario(bus), limit)
        finally:
            await bus.close()

    return asyncio.run(main())


async def until(cond: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def request(hashes: list[str], requester: str | None = "alice", file_id: str = FILE, req_id: str = "r1") -> bytes:
    return encode(ChunkRequest(req_id=req_id, requester=requester, file_id=file_id, hashes=hashes))


# -- 1. windowed fetch --------------------------------------------------------------------------------------


def test_fetch_of_200_blobs_lands_each_once_and_stays_within_the_window() -> None:
    blobs = make_blobs(200)
    digests = list(blobs)
    progress: list[int] = []

    async def scenario(bus: FakeBus) -> None:
        bus.server(HUB, blobs)
        # A generous timeout: this test is about the window, and a late reply must not cause a re-request.
        alice = bus.party("alice", window=16, timeout=2.0)
        sink = RecordingSink()
        await alice.fetch(SPACE, FILE, digests, only([HUB]), sink, on_progress=progress.append)

        assert Counter(sink.puts) == Counter(digests)  # every blob exactly once
        assert sink.data == blobs
        assert 0 < bus.max_outstanding <= 16
        assert bus.max_outstanding == 16  # and the window is actually used
        assert bus.hashes_requested == 200  # nothing asked twice
        reqs = bus.requests(HUB)
        assert all(len(r.hashes) <= MAX_HASHES_PER_REQUEST for r in reqs)
        assert all(r.requester == "alice" and r.file_id == FILE for r in reqs)
        assert {m.topic for m in bus.frame_messages("hub")} == {device_data_topic(SPACE, "alice")}
        assert {m.topic for m in bus.published if m.sender == "alice"} == {hub_request_topic(SPACE)}
        assert alice.frames_dropped == 0
        assert sum(progress) == sum(len(b) for b in blobs.values())

    run(scenario)


def test_duplicate_digests_in_a_fetch_are_fetched_and_stored_once() -> None:
    blobs = make_blobs(5)
    digests = list(blobs)

    async def scenario(bus: FakeBus) -> None:
        bus.server(HUB, blobs)
        alice = bus.party("alice")
        sink = RecordingSink()
        await alice.fetch(SPACE, FILE, digests + digests[:3], only([HUB]), sink)
        assert Counter(sink.puts) == Counter(digests)
        assert Counter(bus.asked(HUB)) == Counter(digests)

    run(scenario)


def test_two_fetches_wanting_the_same_blob_both_receive_it() -> None:
    blobs = make_blobs(6)
    digests = list(blobs)

    async def scenario(bus: FakeBus) -> None:
        bus.server(HUB, blobs)
        alice = bus.party("alice")
        a, b = RecordingSink(), RecordingSink()
        await asyncio.gather(
            alice.fetch(SPACE, FILE, digests[:4], only([HUB]), a),
            alice.fetch(SPACE, OTHER_FILE, digests[2:], only([HUB]), b),
        )
        assert sorted(a.puts) == sorted(digests[:4])
        assert sorted(b.puts) == sorted(digests[2:])

    run(scenario)


def test_coordinator_fetches_from_a_device_over_hub_data() -> None:
    blobs = make_blobs(10)

    async def scenario(bus: FakeBus) -> None:
        bus.server("alice", blobs)
        hub = bus.party(HUB)
        sink = RecordingSink()
        await hub.fetch(SPACE, FILE, list(blobs), only([device_provider("alice")]), sink)
        assert sink.data == blobs
        assert {r.requester for r in bus.requests("alice")} == {None}
        assert {m.topic for m in bus.published if m.sender == HUB} == {device_request_topic(SPACE, "alice")}
        assert {m.topic for m in bus.frame_messages("alice")} == {hub_data_topic(SPACE)}

    run(scenario)


# -- 2. wrong content ------------------------------------------------------------------------------------


def test_tampered_frame_never_reaches_the_sink_and_the_hash_is_asked_again() -> None:
    blobs = make_blobs(10)
    digests = list(blobs)
    target = digests[3]
    tampered: list[bytes] = []

    def intercept(msg: Message) -> Delivery | None:
        if msg.sender != "bob" or msg.parsed.kind is not TopicKind.DEVICE_DATA:
            return None
        frame = decode_frame(msg.payload)
        if frame.hash != target or frame.status is not FrameStatus.OK:
            return None
        bad = b"X" + bytes(frame.data)[1:]
        assert bad != blobs[target]
        tampered.append(bad)
        return [(0.0, encode_frame(FrameStatus.OK, target, bad))]  # same hash, wrong content, every time

    async def scenario(bus: FakeBus) -> None:
        bus.intercept = intercept
        bus.server("bob", blobs)
        bus.server(HUB, blobs)
        alice = bus.party("alice")
        sink = RecordingSink()
        await alice.fetch(SPACE, FILE, digests, only([device_provider("bob"), HUB]), sink)

        assert len(tampered) == 1
        assert sink.puts.count(target) == 1
        assert sink.data == blobs  # including the right content for target
        assert tampered[0] not in sink.data.values()
        assert alice.frames_dropped == 1
        assert bus.asked("bob").count(target) == 1
        assert bus.asked(HUB) == [target]  # asked again, from the next provider, after bob's timeout

    run(scenario)


def test_tampered_frame_from_the_sole_provider_is_retried_there() -> None:
    blobs = make_blobs(3)
    digests = list(blobs)
    target = digests[0]
    state = {"tampered": 0}

    def intercept(msg: Message) -> Delivery | None:
        if msg.parsed.kind is TopicKind.DEVICE_DATA and state["tampered"] == 0:
            frame = decode_frame(msg.payload)
            if frame.hash == target:
                state["tampered"] += 1
                return [(0.0, encode_frame(FrameStatus.OK, target, b"forged"))]
        return None

    async def scenario(bus: FakeBus) -> None:
        bus.intercept = intercept
        bus.server(HUB, blobs)
        alice = bus.party("alice")
        sink = RecordingSink()
        await alice.fetch(SPACE, FILE, digests, only([HUB]), sink)
        assert sink.data == blobs
        assert Counter(sink.puts) == Counter(digests)
        assert bus.asked(HUB).count(target) == 2
        assert alice.frames_dropped == 1

    run(scenario)


# -- 3. missing at one provider ----------------------------------------------------------------------------


def test_blobs_missing_at_the_first_provider_come_from_the_next() -> None:
    blobs = make_blobs(30)
    digests = list(blobs)
    missing = digests[:10]
    at_bob = {d: blobs[d] for d in digests[10:]}

    async def scenario(bus: FakeBus) -> None:
        bus.server("bob", at_bob)
        bus.server(HUB, blobs)
        alice = bus.party("alice", timeout=1.0)
        sink = RecordingSink()
        t0 = time.monotonic()
        await alice.fetch(SPACE, FILE, digests, only([device_provider("bob"), HUB]), sink)
        elapsed = time.monotonic() - t0

        assert sink.data == blobs
        assert Counter(sink.puts) == Counter(digests)
        assert Counter(bus.asked("bob")) == Counter(digests)  # A first, for everything
        assert Counter(bus.asked(HUB)) == Counter(missing)  # B only for what A lacks
        first_hub = next(m.at for m in bus.published if m.sender == "alice" and m.target == HUB)
        first_bob = next(m.at for m in bus.published if m.sender == "alice" and m.target == "bob")
        assert first_bob <= first_hub
        assert elapsed < 0.5  # a "missing" frame moves on at once, without waiting for the timeout
        missing_frames = [f for f in bus.frames("bob") if f.status is FrameStatus.MISSING]
        assert sorted(f.hash for f in missing_frames) == sorted(missing)
        assert alice.frames_dropped == 0

    run(scenario)


# -- 4. lost messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lose", ["frame", "request"])
def test_lost_message_is_requested_again_after_the_timeout(lose: str) -> None:
    blobs = make_blobs(8)
    digests = list(blobs)
    target = digests[5]
    lost: list[Message] = []

    def intercept(msg: Message) -> Delivery | None:
        if lost:
            return None
        kind = msg.parsed.kind
        if lose == "frame" and kind is TopicKind.DEVICE_DATA and decode_frame(msg.payload).hash == target:
            lost.append(msg)
            return []
        if (
            lose == "request"
            and kind in _REQUEST_KINDS
            and target in ChunkRequest.model_validate_json(msg.payload).hashes
        ):
            lost.append(msg)
            return []
        return None

    async def scenario(bus: FakeBus) -> None:
        bus.intercept = intercept
        bus.server("bob", blobs)
        bus.server(HUB, blobs)
        alice = bus.party("alice")
        sink = RecordingSink()
        await alice.fetch(SPACE, FILE, digests, only([device_provider("bob"), HUB]), sink)

        assert len(lost) == 1
        assert sink.data == blobs
        assert Counter(sink.puts) == Counter(digests)
        asks = bus.asks_for(target)
        assert [m.target for m in asks] == ["bob", HUB]
        assert asks[1].at - asks[0].at >= 0.2 - 0.01  # only after the timeout

    run(scenario)


def test_lost_frame_from_the_sole_provider_is_asked_of_it_again() -> None:
    """With one provider, a timeout exhausts the provider list, so the retry waits PullPlan's
    retry_after (2 s, not configurable through BlobExchange) on top of the timeout."""
    blobs = make_blobs(4)
    digests = list(blobs)
    target = digests[1]
    dropped: list[str] = []

    def intercept(msg: Message) -> Delivery | None:
        if not dropped and msg.parsed.kind is TopicKind.DEVICE_DATA and decode_frame(msg.payload).hash == target:
            dropped.append(target)
            return []
        return None

    async def scenario(bus: FakeBus) -> None:
        bus.intercept = intercept
        bus.server(HUB, blobs)
        alice = bus.party("alice")
        sink = RecordingSink()
        await alice.fetch(SPACE, FILE, digests, only([HUB]), sink)
        assert dropped == [target]
        assert sink.data == blobs
        asks = bus.asks_for(target)
        assert [m.target for m in asks] == [HUB, HUB]
        assert asks[1].at - asks[0].at >= 0.2 - 0.01

    run(scenario)


# -- 5. unsolicited and duplicate frames -----------------------------------------------------------------------


def test_duplicate_frames_reach_the_sink_once() -> None:
    blobs = make_blobs(20)
    digests = list(blobs)

    def twice(msg: Message) -> Delivery | None:
        if msg.parsed.kind is TopicKind.DEVICE_DATA:
            return [(0.0, msg.payload), (0.0, msg.payload), (0.03, msg.payload)]
        return None

    async def scenario(bus: FakeBus) -> None:
        bus.intercept = twice
        bus.server(HUB, blobs)
        alice = bus.party("alice")
        sink = RecordingSink()
        await alice.fetch(SPACE, FILE, digests, only([HUB]), sink)
        await asyncio.sleep(0.08)  # let the late copies arrive after the fetch ended
        assert Counter(sink.puts) == Counter(digests)
        assert sink.calls == len(digests)
        assert bus.frames_delivered == 3 * len(digests)

    run(scenario)


def test_unsolicited_and_malformed_frames_are_dropped_and_counted() -> None:
    blobs = make_blobs(4)
    digests = list(blobs)
    stranger = make_blobs(1, tag="stranger")
    [(stranger_hash, stranger_data)] = stranger.items()
    topic = device_data_topic(SPACE, "alice")

    def hold_hub_frames(msg: Message) -> Delivery | None:
        if msg.sender == HUB:
            return [(0.3, msg.payload)]  # keep the fetch running while junk arrives
        return None

    async def scenario(bus: FakeBus) -> None:
        bus.intercept = hold_hub_frames
        bus.server(HUB, blobs)
        alice = bus.party("alice", timeout=1.0)
        sink = RecordingSink()
        task = asyncio.create_task(alice.fetch(SPACE, FILE, digests, only([HUB]), sink))
        await until(lambda: len(bus.requests(HUB)) > 0)

        junk = [
            encode_frame(FrameStatus.OK, stranger_hash, stranger_data),  # verified, but nobody wants it
            encode_frame(FrameStatus.MISSING, stranger_hash),  # a "missing" nobody asked about
            b"hello",  # not a frame
            encode_frame(FrameStatus.OK, digests[0], blobs[digests[0]])[:20],  # truncated header
            b"ZZ" + encode_frame(FrameStatus.OK, digests[0], blobs[digests[0]])[2:],  # wrong magic
        ]
        for payload in junk:
            bus.inject(topic, payload)
        await until(lambda: alice.frames_dropped >= len(junk))
        assert alice.frames_dropped == len(junk)
        assert sink.calls == 0
        assert not task.done()

        await task
        assert Counter(sink.puts) == Counter(digests)
        assert stranger_hash not in sink.data

    run(scenario)


# -- 6. abort -------------------------------------------------------------------------------------------


def test_abort_ends_only_that_files_fetch_promptly() -> None:
    blobs = make_blobs(5)
    digests = list(blobs)
    others = make_blobs(3, tag="other")

    def intercept(msg: Message) -> Delivery | None:
        if msg.parsed.kind is not TopicKind.DEVICE_DATA:
            return None
        if decode_frame(msg.payload).hash in blobs:
            return []  # the doomed fetch never gets an answer
        return [(0.3, msg.payload)]  # the bystander's answers come late, so it is still running at the abort

    async def scenario(bus: FakeBus) -> None:
        bus.intercept = intercept
        bus.server(HUB, blobs | others)
        # With a 2 s timeout the fetch sleeps a whole second between polls: abort must wake it.
        alice = bus.party("alice", timeout=2.0)
        doomed = asyncio.create_task(alice.fetch(SPACE, FILE, digests, only([HUB]), RecordingSink()))
        other_sink = RecordingSink()
        bystander = asyncio.create_task(alice.fetch(SPACE, OTHER_FILE, list(others), only([HUB]), other_sink))
        await until(lambda: len(bus.requests(HUB)) >= 2)
        await asyncio.sleep(0.05)

        alice.abort(SPACE, "docs/unrelated.txt", "nothing")  # no such fetch: no effect
        alice.abort("elsewhere", FILE, "other space")  # same file id, other space: no effect
        await asyncio.sleep(0.02)
        assert not doomed.done()

        t0 = time.monotonic()
        alice.abort(SPACE, FILE, "superseded by v2")
        with pytest.raises(FetchAborted, match="superseded by v2"):
            await asyncio.wait_for(doomed, 0.5)
        assert time.monotonic() - t0 < 0.1
        assert not bystander.done()

        await bystander  # unaffected by the abort
        assert sorted(other_sink.puts) == sorted(others)

        bus.intercept = None
        sink = RecordingSink()  # and the aborted file can be fetched afresh
        await alice.fetch(SPACE, FILE, digests, only([HUB]), sink)
        assert sorted(sink.puts) == sorted(digests)

    run(scenario)


# -- 7. sink failure --------------------------------------------------------------------------------------


def test_sink_error_ends_the_fetch_and_the_exchange_keeps_working() -> None:
    blobs = make_blobs(40)
    digests = list(blobs)

    async def scenario(bus: FakeBus) -> None:
        bus.server(HUB, blobs)
        alice = bus.party("alice", window=8)
        full = RecordingSink(fail_at=5)
        with pytest.raises(OSError, match="No space left on device") as info:
            await asyncio.wait_for(alice.fetch(SPACE, FILE, digests, only([HUB]), full), 1.0)
        assert info.value is full.error
        assert info.value.errno == errno.ENOSPC
        assert full.calls == 5  # the fetch ended at the first failure; nothing more was put
        assert len(full.puts) == 4
        await asyncio.sleep(0.05)  # late frames of the dead fetch arrive and are dropped
        assert full.calls == 5

        sink = RecordingSink()
        await asyncio.wait_for(alice.fetch(SPACE, FILE, digests, only([HUB]), sink), 2.0)
        assert sink.data == blobs
        assert Counter(sink.puts) == Counter(digests)

    run(scenario)


def test_sink_error_on_the_last_blob_still_fails_the_fetch() -> None:
    """A put that fails on the final wanted blob must fail the fetch like any other put.

    on_data pops the hash from the plan (``plan.received``) before calling ``sink.put``; when that
    was the last hash, ``plan.done`` is already true, so fetch's ``while not plan.done`` loop ends
    and fetch returns normally without looking at ``f.error``: the ENOSPC is swallowed and the
    caller believes every blob was stored.
    """
    blobs = make_blobs(6)
    digests = list(blobs)

    async def scenario(bus: FakeBus) -> None:
        bus.server(HUB, blobs)
        alice = bus.party("alice")
        for n in (1, len(digests)):
            sink = RecordingSink(fail_at=n)  # the n-th and last put fails
            with pytest.raises(OSError, match="No space left on device"):
                await alice.fetch(SPACE, FILE, digests[:n], only([HUB]), sink)
            assert len(sink.puts) == n - 1

    run(scenario)


# -- 8. giving up ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing everywhere", "silent provider", "no providers"])
def test_give_up_after_raises_fetch_failed(case: str) -> None:
    blobs = make_blobs(3)
    digests = list(blobs)

    async def scenario(bus: FakeBus) -> None:
        if case == "silent provider":
            bus.intercept = lambda msg: [] if msg.parsed.kind is TopicKind.DEVICE_DATA else None
        bus.server(HUB, {digests[0]: blobs[digests[0]]} if case == "missing everywhere" else {})
        alice = bus.party("alice")
        providers = only([]) if case == "no providers" else only([HUB])
        sink = RecordingSink()
        t0 = time.monotonic()
        with pytest.raises(FetchFailed, match="still missing"):
            await alice.fetch(SPACE, FILE, digests, providers, sink, give_up_after=0.4)
        elapsed = time.monotonic() - t0
        assert 0.4 <= elapsed < 0.4 + 1.0 + 0.3  # the fetch sleeps at most 1 s between checks
        if case == "missing everywhere":
            assert sink.puts == [digests[0]]
        else:
            assert sink.puts == []

    run(scenario)


# -- 9. serving ------------------------------------------------------------------------------------------


def test_malformed_requests_are_dropped_and_serving_goes_on() -> None:
    blobs = make_blobs(2)
    digests = list(blobs)
    good = request(digests)

    def with_hashes(hashes: list[str]) -> bytes:
        return json.dumps(
            {"kind": "get", "req_id": "r1", "requester": "alice", "file_id": FILE, "hashes": hashes}
        ).encode()

    assert ChunkRequest.model_validate_json(with_hashes(digests))  # the template itself is valid
    malformed = [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"{}",
        b'{"kind": "get"}',
        good.replace(b'"get"', b'"put"'),  # unknown kind
        good[:-1] + b', "extra": 1}',  # unknown field
        good.replace(b'"docs/report.txt"', b'"../etc/passwd"'),  # hostile file id
        good.replace(b'"alice"', b'"al/ice"'),  # a requester that is no device name
        with_hashes([]),
        with_hashes(["ABC"]),  # not a hash
        with_hashes([digests[0].upper()]),  # not lowercase hex
        with_hashes([digests[0]] * (MAX_HASHES_PER_REQUEST + 1)),  # too many
    ]

    async def scenario(bus: FakeBus) -> None:
        source = DictSource(blobs)
        bob = bus.server("bob", source)
        for payload in malformed:
            bus.inject(device_request_topic(SPACE, "bob"), payload)
        await asyncio.sleep(0.05)
        assert bob.requests_dropped == len(malformed)
        assert source.calls == []
        assert bus.frame_messages("bob") == []

        bus.inject(device_request_topic(SPACE, "bob"), good)
        await until(lambda: len(bus.frame_messages("bob")) == 2)
        assert bob.requests_dropped == len(malformed)

    run(scenario)


def test_valid_request_is_answered_one_frame_per_hash_on_the_requesters_data_topic() -> None:
    blobs = make_blobs(3)
    held = list(blobs)
    absent = list(make_blobs(2, tag="absent"))
    asked = [held[0], absent[0], held[1], absent[1], held[2]]

    async def scenario(bus: FakeBus) -> None:
        bob = bus.server("bob", blobs)
        bus.inject(device_request_topic(SPACE, "bob"), request(asked, requester="alice"))
        await until(lambda: len(bus.frame_messages("bob")) == len(asked))
        msgs = bus.frame_messages("bob")
        assert {m.topic for m in msgs} == {device_data_topic(SPACE, "alice")}
        frames = [decode_frame(m.payload) for m in msgs]
        assert [f.hash for f in frames] == asked
        for f in frames:
            if f.hash in blobs:
                assert f.status is FrameStatus.OK
                assert bytes(f.data) == blobs[f.hash]
            else:
                assert f.status is FrameStatus.MISSING
                assert bytes(f.data) == b""
        assert bob.bytes_served == sum(len(b) for b in blobs.values())

    run(scenario)


def test_request_from_the_coordinator_is_answered_on_hub_data() -> None:
    blobs = make_blobs(2)

    async def scenario(bus: FakeBus) -> None:
        bus.server("bob", blobs)
        bus.inject(device_request_topic(SPACE, "bob"), request(list(blobs), requester=None))
        await until(lambda: len(bus.frame_messages("bob")) == 2)
        assert {m.topic for m in bus.frame_messages("bob")} == {hub_data_topic(SPACE)}

    run(scenario)


def test_the_hub_serves_requests_on_hub_req() -> None:
    blobs = make_blobs(2)

    async def scenario(bus: FakeBus) -> None:
        bus.server(HUB, blobs)
        bus.inject(hub_request_topic(SPACE), request(list(blobs), requester="carol"))
        await until(lambda: len(bus.frame_messages(HUB)) == 2)
        assert {m.topic for m in bus.frame_messages(HUB)} == {device_data_topic(SPACE, "carol")}

    run(scenario)


def test_server_waits_while_its_client_has_max_unacked_publishes_queued() -> None:
    blobs = make_blobs(10)
    digests = list(blobs)

    async def scenario(bus: FakeBus) -> None:
        bob = bus.server("bob", blobs, max_unacked=4)
        transport = bus.transports["bob"]
        transport.unacked = 7  # a backlog from earlier traffic
        transport.hold_acks = True
        bus.inject(device_request_topic(SPACE, "bob"), request(digests))
        await asyncio.sleep(0.1)
        assert bus.frame_messages("bob") == []  # nothing while the queue is over the limit

        sent: list[int] = []
        for _ in range(10):
            transport.ack_all()
            await asyncio.sleep(0.05)
            sent.append(len(bus.frame_messages("bob")))
            assert transport.unacked <= 4
            if sent[-1] == len(digests):
                break
        assert sent[:3] == [4, 8, 10]  # four at a time, each batch only after the acks
        assert transport.max_unacked_seen <= 4
        assert [f.hash for f in bus.frames("bob")] == digests
        assert bob.requests_dropped == 0

    run(scenario)


def test_full_serve_queue_drops_the_request() -> None:
    blobs = make_blobs(1)

    async def scenario(bus: FakeBus) -> None:
        bob = bus.party("bob", blobs, serve_queue=2)  # not started: nothing drains the queue
        for i in range(3):
            bob.on_request(SPACE, request(list(blobs), req_id=f"r{i}"))
        assert bob.requests_dropped == 1
        bob.start()
        await until(lambda: len(bus.frame_messages("bob")) == 2)

    run(scenario)


# -- 10. a failing source ------------------------------------------------------------------------------------


def test_a_failing_read_is_logged_and_the_next_request_is_served(caplog: pytest.LogCaptureFixture) -> None:
    blobs = make_blobs(3)
    digests = list(blobs)
    caplog.set_level(logging.ERROR, logger="atrius.exchange")

    async def scenario(bus: FakeBus) -> None:
        source = DictSource(blobs, fail_for=frozenset({"bad/file"}))
        bob = bus.server("bob", source)
        topic = device_request_topic(SPACE, "bob")
        bus.inject(topic, request(digests[:1], file_id="bad/file", req_id="doomed-req"))
        bus.inject(topic, request(digests, req_id="next-req"))
        await until(lambda: len(bus.frame_messages("bob")) == 3)
        assert [f.hash for f in bus.frames("bob")] == digests
        assert [c[1] for c in source.calls] == ["bad/file", FILE]

        bus.inject(topic, request(digests[:1], file_id="bad/file", req_id="doomed-again"))
        bus.inject(topic, request(digests[2:], req_id="third-req"))
        await until(lambda: len(bus.frame_messages("bob")) == 4)
        assert bob.requests_dropped == 0

    run(scenario)
    failures = [r for r in caplog.records if r.name == "atrius.exchange" and r.levelno >= logging.ERROR]
    assert len(failures) == 2
    assert "doomed-req" in failures[0].getMessage()
    assert "bad/file" in failures[0].getMessage()
    assert failures[0].exc_info is not None and isinstance(failures[0].exc_info[1], OSError)
