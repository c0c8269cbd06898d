"""Raw paho-mqtt baseline clients: a windowed QoS 1 publisher, a counting subscriber and a round-trip probe."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

WINDOW = 100
"""At most this many QoS 1 publishes are unacknowledged (no PUBACK yet) at any time."""
SEQ_BYTES = 8
"""Each payload starts with its sequence number, so the subscriber can count distinct messages."""
PROGRESS_EVERY = 16
"""The subscriber prints ``n <count>`` after every this many distinct messages (see FlowGate)."""
CONNECT_TIMEOUT = 10.0


class RawError(RuntimeError):
    """A baseline step that failed (connect, subscribe, publish) or did not finish in time."""


def _client(prefix: str) -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{uuid.uuid4().hex[:8]}",
                       protocol=paho.MQTTv311)


def _connect(client: paho.Client, host: str, port: int) -> None:
    """Connect, start the network thread and wait for CONNACK."""
    connected = threading.Event()

    def on_connect(c: paho.Client, ud: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            connected.set()

    client.on_connect = on_connect
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not connected.wait(CONNECT_TIMEOUT):
        client.loop_stop()
        raise RawError(f"connecting to {host}:{port}: no CONNACK within {CONNECT_TIMEOUT:.0f} s")


def _subscribe(client: paho.Client, topic: str) -> None:
    """Subscribe at QoS 1 and wait for SUBACK."""
    subscribed = threading.Event()

    def on_subscribe(c: paho.Client, ud: Any, mid: int, rcs: Any, props: Any) -> None:
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    if not subscribed.wait(CONNECT_TIMEOUT):
        raise RawError(f"subscribing to {topic}: no SUBACK within {CONNECT_TIMEOUT:.0f} s")


def _close(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


# -- publisher (runs in the bench process) ----------------------------------------------------
class FlowGate:
    """Bounds how far the publisher runs ahead: unacknowledged publishes, and messages not yet delivered.

    A PUBACK only says the broker took the message: Mosquitto keeps queueing for a subscriber that
    lags and silently drops past ``max_queued_messages`` (1000).  So, besides the PUBACK window, the
    subscriber reports how many messages it counted (out of band, through its stdout pipe) and the
    publisher stays at most ``ahead`` messages in front of it.
    """

    def __init__(self, window: int, ahead: int | None) -> None:
        self.window = window
        self.ahead = ahead
        self.sent = 0
        self.acked = 0
        self.delivered = 0
        self._cond = threading.Condition()

    def on_sent(self) -> None:
        with self._cond:
            self.sent += 1

    def on_ack(self) -> None:
        with self._cond:
            self.acked += 1
            self._cond.notify_all()

    def on_delivered(self, n: int) -> None:
        with self._cond:
            self.delivered = max(self.delivered, n)
            self._cond.notify_all()

    def _room(self) -> bool:
        return self.sent - self.acked < self.window and (self.ahead is None or self.sent - self.delivered < self.ahead)

    def wait_room(self, deadline: float) -> bool:
        with self._cond:
            return self._cond.wait_for(self._room, max(0.0, deadline - time.monotonic()))

    def wait_acked(self, count: int, deadline: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.acked >= count, max(0.0, deadline - time.monotonic()))


def ahead_limit(size: int) -> int:
    """Messages the publisher may be ahead of the subscriber: 64 MiB worth, at most 500 (< Mosquitto's 1000)."""
    return max(WINDOW + 1, min(500, (64 << 20) // size))


@dataclass
class PubResult:
    started_at: float
    """time.monotonic() just before the first publish (monotonic is system-wide on Linux)."""
    acked_at: float | None
    """time.monotonic() when the last PUBACK arrived; None if the publisher timed out."""
    sent: int
    acked: int


def publish_stream(
    host: str, port: int, topic: str, count: int, size: int, timeout: float, gate: FlowGate
) -> PubResult:
    """Publish ``count`` QoS 1 messages of ``size`` bytes, pausing whenever ``gate`` has no room."""
    client = _client("bench-pub")
    client.max_inflight_messages_set(gate.window)
    client.on_publish = lambda c, ud, mid, rc, props: gate.on_ack()
    _connect(client, host, port)
    body = os.urandom(size)
    started = time.monotonic()
    deadline = started + timeout
    try:
        for seq in range(count):
            if not gate.wait_room(deadline):
                return PubResult(started, None, gate.sent, gate.acked)
            payload = seq.to_bytes(SEQ_BYTES, "big") + body[SEQ_BYTES:]
            info = client.publish(topic, payload, qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise RawError(f"publishing message {seq}: {paho.error_string(info.rc)}")
            gate.on_sent()
        done = gate.wait_acked(count, deadline)
        return PubResult(started, time.monotonic() if done else None, gate.sent, gate.acked)
    finally:
        _close(client)


# -- subscriber (runs as its own process, so it does not share the publisher's GIL) -----------
@dataclass
class SubResult:
    expected: int
    unique: int
    duplicates: int
    wrong_size: int
    first_at: float | None
    last_at: float | None
    timed_out: bool


@dataclass
class _Tally:
    """Written only by paho's network thread; the waiting thread only peeks at ``last_at``."""

    unique: int = 0
    duplicates: int = 0
    wrong_size: int = 0
    first_at: float | None = None
    last_at: float | None = None


def subscribe_count(host: str, port: int, topic: str, count: int, size: int, timeout: float, idle: float) -> SubResult:
    """Count distinct messages until all ``count`` arrived, ``timeout`` passed, or none came for ``idle`` s."""
    client = _client("bench-sub")
    seen = bytearray(count)
    done = threading.Event()
    tally = _Tally()

    def on_message(c: paho.Client, ud: Any, msg: paho.MQTTMessage) -> None:
        tally.last_at = time.monotonic()
        if tally.first_at is None:
            tally.first_at = tally.last_at
        payload = msg.payload
        if len(payload) != size:
            tally.wrong_size += 1
            return
        seq = int.from_bytes(payload[:SEQ_BYTES], "big")
        if seq >= count or seen[seq]:
            tally.duplicates += 1
            return
        seen[seq] = 1
        tally.unique += 1
        if tally.unique % PROGRESS_EVERY == 0 or tally.unique == count:
            print(f"n {tally.unique}", flush=True)  # a pipe write to the bench process; it always reads
        if tally.unique == count:
            done.set()

    client.on_message = on_message
    _connect(client, host, port)
    try:
        _subscribe(client, topic)
        print("ready", flush=True)
        deadline = time.monotonic() + timeout
        while not done.is_set():
            now = time.monotonic()
            if now >= deadline or (tally.last_at is not None and now - tally.last_at >= idle):
                break
            done.wait(0.05)
    finally:
        _close(client)
    return SubResult(count, tally.unique, tally.duplicates, tally.wrong_size, tally.first_at, tally.last_at,
                     not done.is_set())


# -- round trip (both clients in the bench process) -------------------------------------------
def round_trips(host: str, port: int, topic: str, size: int, samples: int, timeout: float) -> list[float]:
    """Seconds from publish() to on_message in another client, one message at a time, after one warm-up."""
    sub, pub = _client("bench-rtt-sub"), _client("bench-rtt-pub")
    arrived: dict[int, float] = {}
    cond = threading.Condition()

    def on_message(c: paho.Client, ud: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        with cond:
            arrived.setdefault(int.from_bytes(msg.payload[:SEQ_BYTES], "big"), now)
            cond.notify()

    sub.on_message = on_message
    _connect(sub, host, port)
    try:
        _subscribe(sub, topic)
        _connect(pub, host, port)
        try:
            out: list[float] = []
            for seq in range(samples + 1):
                payload = seq.to_bytes(SEQ_BYTES, "big") + os.urandom(size - SEQ_BYTES)
                sent_at = time.perf_counter()
                pub.publish(topic, payload, qos=1)
                with cond:
                    if not cond.wait_for(lambda s=seq: s in arrived, timeout):
                        raise RawError(f"round trip {seq}: no message within {timeout:.0f} s")
                if seq > 0:  # sample 0 is the warm-up
                    out.append(arrived[seq] - sent_at)
            return out
        finally:
            _close(pub)
    finally:
        _close(sub)


def main() -> int:
    ap = argparse.ArgumentParser(description="raw paho subscriber used by bench/run.py; prints ready, n <count>, "
                                             "result <json>")
    ap.add_argument("role", choices=["sub"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--idle", type=float, default=10.0)
    args = ap.parse_args()
    try:
        res = subscribe_count(args.host, args.port, args.topic, args.count, args.size, args.timeout, args.idle)
    except RawError as exc:
        print("result " + json.dumps({"error": str(exc)}), flush=True)
        return 1
    print("result " + json.dumps(asdict(res)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
