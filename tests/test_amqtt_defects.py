"""The amqtt 0.12.1 defects of DESIGN.md §5, shown against our embedded broker with raw paho clients.

Each amqtt test runs `broker.embedded.main_broker` (so `run_embedded` and our config) in its own process
and checks what a client sees. Its Mosquitto twin runs the same scenario and expects correct MQTT 3.1.1
behaviour, which shows the test measures the broker, not the client. Each docstring names the workaround.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import (
    MosquittoProc,
    MqttProbe,
    Received,
    ServerProc,
    amqtt_proc,
    barrier,
    free_port,
    require_mosquitto,
    without_barriers,
)
from paho.mqtt.client import topic_matches_sub

pytestmark = pytest.mark.timeout(40)

ROOT = "atrius/v1/defects"


@pytest.fixture
def amqtt(tmp_path: Path) -> Iterator[ServerProc]:
    proc = amqtt_proc(free_port(), log_path=tmp_path / "amqtt.log").start()
    try:
        yield proc
    finally:
        proc.stop()


# --- a. retained messages for other clients' subscriptions, and duplicates --------------------------------

HEAD = f"{ROOT}/files/x/head"
PRESENCE = f"{ROOT}/presence/d1"
HEAD_PAYLOAD = b'{"file_id": "x", "version": 1}'
PRESENCE_PAYLOAD = b'{"device": "d1", "state": "online"}'


def _retained_scenario(port: int) -> tuple[list[Received], list[str]]:
    """A hub-like client watches all heads and everything; we connect and subscribe to presence only."""
    pub = MqttProbe(port, "a-pub").connect()
    pub.publish(HEAD, HEAD_PAYLOAD, retain=True)
    pub.publish(PRESENCE, PRESENCE_PAYLOAD, retain=True)
    other = MqttProbe(port, "a-other").connect()
    other.subscribe(f"{ROOT}/files/+/head")
    other.subscribe(f"{ROOT}/#")
    me = MqttProbe(port, "a-me").connect()
    ours = [f"{ROOT}/presence/+"]
    for topic_filter in ours:
        me.subscribe(topic_filter)
    barrier(me, pub)
    got = without_barriers(me.messages)
    for probe in (me, other, pub):
        probe.close()
    return got, ours


def test_amqtt_sends_retained_messages_of_other_clients_subscriptions(amqtt: ServerProc) -> None:
    """amqtt replays, to every connecting client, the retained messages matching ANY client's filters.

    Broker._handle_client_session loops over self._subscriptions (every session's filters) and sends each
    matching retained message once per matching filter; our own SUBSCRIBE then sends ours once more.
    Workaround (agent/mqtt.py): drop what matches none of our own subscriptions (paho topic_matches_sub)
    and de-duplicate retained heads by version.
    """
    got, ours = _retained_scenario(amqtt.port)
    topics = [m.topic for m in got]
    assert topics.count(HEAD) == 2, topics  # never subscribed to; one copy per filter of the other client
    assert topics.count(PRESENCE) == 2, topics  # once for the other client's '#', once for our subscription
    mine = [m for m in got if any(topic_matches_sub(f, m.topic) for f in ours)]
    assert list(dict.fromkeys((m.topic, m.payload) for m in mine)) == [(PRESENCE, PRESENCE_PAYLOAD)]


@pytest.mark.mosquitto
def test_mosquitto_sends_only_our_retained_messages_once(mosquitto: MosquittoProc) -> None:
    got, _ = _retained_scenario(mosquitto.port)
    assert [(m.topic, m.payload, m.retain) for m in got] == [(PRESENCE, PRESENCE_PAYLOAD, True)]


# --- b. a QoS 1 message whose PUBACK is late is forgotten -------------------------------------------------

LATE_TOPIC = f"{ROOT}/chunks/late"
LATE_ACK_S = 6.0  # amqtt waits 5 s for a PUBACK (handler._handle_qos1_message_flow)


def _late_ack_scenario(port: int) -> list[Received]:
    """A subscriber gets a QoS 1 message, sits on the PUBACK past 5 s, then crashes and reconnects."""
    pub = MqttProbe(port, "b-pub").connect()
    sub = MqttProbe(port, "b-sub", clean_session=False, manual_ack=True).connect()
    sub.subscribe(LATE_TOPIC)
    pub.publish(LATE_TOPIC, b"chunk-1")
    sub.wait_for(lambda ms: any(m.topic == LATE_TOPIC for m in ms))
    time.sleep(LATE_ACK_S)  # e.g. a callback blocked on disk I/O: paho has not sent the PUBACK
    sub.drop()
    again = MqttProbe(port, "b-sub", clean_session=False).connect()
    barrier(again, pub)
    redelivered = [m for m in without_barriers(again.messages) if m.topic == LATE_TOPIC]
    again.close()
    pub.close()
    return redelivered


def test_amqtt_forgets_qos1_message_whose_puback_is_late(amqtt: ServerProc) -> None:
    """After 5 s without PUBACK amqtt drops the message from its in-flight set: it is never redelivered.

    MQTT 3.1.1 requires resending un-acknowledged QoS 1 messages when the session resumes.
    Workaround: never block in a paho callback (hand messages to the asyncio loop), and repair by
    pulling missing chunks by hash rather than trusting QoS 1 redelivery.
    """
    assert _late_ack_scenario(amqtt.port) == []
    assert "Timeout waiting for PUBACK" in amqtt.log_text()


@pytest.mark.mosquitto
def test_mosquitto_redelivers_unacknowledged_qos1_message(mosquitto: MosquittoProc) -> None:
    redelivered = _late_ack_scenario(mosquitto.port)
    assert [(m.payload, m.dup) for m in redelivered] == [(b"chunk-1", True)]


# --- c. persistent sessions do not queue for anonymous clients --------------------------------------------

OFFLINE_TOPIC = f"{ROOT}/files/y/announce"


def _offline_scenario(port: int) -> list[Received]:
    """A persistent-session subscriber goes offline; a QoS 1 message is published; it comes back."""
    sub = MqttProbe(port, "c-sub", clean_session=False).connect()
    sub.subscribe(OFFLINE_TOPIC)
    sub.close()
    time.sleep(1.5)  # offline for a while (amqtt's session monitor runs every second)
    pub = MqttProbe(port, "c-pub").connect()
    pub.publish(OFFLINE_TOPIC, b"v2 while you were away")
    again = MqttProbe(port, "c-sub", clean_session=False).connect()
    barrier(again, pub)
    queued = [m for m in without_barriers(again.messages) if m.topic == OFFLINE_TOPIC]
    again.close()
    pub.close()
    return queued


def test_amqtt_does_not_queue_for_anonymous_persistent_sessions(amqtt: ServerProc) -> None:
    """With anonymous auth amqtt neither queues QoS 1 messages for an offline clean_session=False client
    nor keeps its session (Broker._run_broadcast and _session_monitor skip `is_anonymous` sessions).

    Workaround: agents use clean sessions and catch up on connect from the retained heads plus the
    coordinator's chunk store; file data is never left to a broker queue.
    """
    assert _offline_scenario(amqtt.port) == []


@pytest.mark.mosquitto
def test_mosquitto_queues_for_offline_persistent_session(mosquitto: MosquittoProc) -> None:
    queued = _offline_scenario(mosquitto.port)
    assert [m.payload for m in queued] == [b"v2 while you were away"]


# --- d. no back-pressure: a stalled subscriber grows broker memory ----------------------------------------

STALL_TOPIC = f"{ROOT}/chunks/stall"
STALL_CHUNK = 256 * 1024
STALL_COUNT = 192  # 48 MiB in all
STALL_VOLUME = STALL_CHUNK * STALL_COUNT


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _stalled_subscriber_growth(port: int, broker_pid: int) -> int:
    """Bytes the broker's RSS grows while 48 MiB of QoS 1 chunks go to a subscriber that stopped reading."""
    sub = MqttProbe(port, "d-sub").connect()
    sub.subscribe(STALL_TOPIC)
    sub.pause()  # the connection stays open; nobody reads it
    pub = MqttProbe(port, "d-pub").connect()
    before = _rss(broker_pid)
    chunk = bytes(STALL_CHUNK)
    infos = [pub.client.publish(STALL_TOPIC, chunk, qos=1) for _ in range(STALL_COUNT)]
    for info in infos:
        info.wait_for_publish(15)
    time.sleep(0.5)
    growth = _rss(broker_pid) - before
    pub.close()
    sub.drop()
    return growth


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")


@needs_proc
def test_amqtt_buffers_without_bound_for_a_stalled_subscriber(amqtt: ServerProc) -> None:
    """amqtt has no per-client queue limit: every message for a subscriber that stopped reading stays in
    broker memory (one pending publish task per message), while the publisher still gets its PUBACKs.

    Workaround: application-level flow control (a window of chunks in flight, acknowledged or pulled by
    the receiver) so no broker ever holds more than a window per peer.
    """
    assert amqtt.pid is not None
    growth = _stalled_subscriber_growth(amqtt.port, amqtt.pid)
    assert growth > 0.7 * STALL_VOLUME, f"broker grew {growth / 2**20:.1f} MiB"


@needs_proc
@pytest.mark.mosquitto
def test_mosquitto_bounds_the_queue_of_a_stalled_subscriber(tmp_path: Path) -> None:
    broker = MosquittoProc(tmp_path / "mosquitto", binary=require_mosquitto(), extra_conf=["max_queued_messages 10"])
    with broker:
        assert broker.pid is not None
        growth = _stalled_subscriber_growth(broker.port, broker.pid)
    assert growth < 0.3 * STALL_VOLUME, f"broker grew {growth / 2**20:.1f} MiB"
