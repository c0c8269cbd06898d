"""One MQTT 3.1.1 session bridged into asyncio: connect, reconnect, presence epoch, filtered delivery.

paho runs its network loop in its own thread; every paho callback here does nothing but hand the
event to the asyncio loop with ``call_soon_threadsafe``.  Incoming messages are filtered against
our own subscriptions, because amqtt 0.12 also delivers retained messages that match *other*
clients' subscriptions (see tests/test_amqtt_defects.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("atrius.mqtt")

MAX_QUEUED_OUT = 4096
"""Outgoing QoS 1 messages paho may hold; past it publish fails (use :meth:`MqttSession.publish_paced`)."""
PACE_OUT = 256
"""``publish_paced`` waits while more than this many messages are not yet acknowledged by the broker."""
STATE_QOS = 0
"""Subscription QoS for retained state (heads, locks, presence).  Mosquitto queues at most
``max_queued_messages`` (default 1,000) QoS 1 messages per subscriber and drops the rest, retained
ones included: a device joining a space of 10,000 files would get only ~1,000 heads.  QoS 0
deliveries to a connected client are not limited that way, and state is re-sent (retained) on
every reconnect, so nothing is lost by it.  Data and requests keep QoS 1 with our own flow control."""


class BrokerUrlError(ValueError):
    """A broker URL that is not mqtt://host[:port] or mqtts://host[:port]."""


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BrokerUrlError(f"broker url {url!r}: {exc}") from exc
        if parts.scheme not in {"mqtt", "mqtts"}:
            raise BrokerUrlError(f"broker url {url!r} must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise BrokerUrlError(f"broker url {url!r} has no host")
        if parts.path not in {"", "/"} or parts.query or parts.fragment:
            raise BrokerUrlError(f"broker url {url!r} must be scheme://host[:port] only")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes


Handler = Callable[[str, bytes], None]


class MqttSession:
    """Owns one paho client.  All callbacks it makes run on the asyncio loop."""

    def __init__(
        self,
        url: BrokerUrl,
        client_id: str,
        *,
        on_message: Handler,
        on_connected: Callable[[], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        will: Callable[[], Will | None] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        keepalive: int = 15,
        quiet_connect: bool = False,
    ) -> None:
        self.url = url
        self._quiet_connect = quiet_connect
        """A helper connection (request/reply): its connects are logged at debug level only."""
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._will = will
        self._subs: dict[str, int] = {}
        self._exact: set[str] = set()
        self._wildcards: list[str] = []
        self.connected = False
        self._stopping = False
        self.connect_count = 0
        self._connected_evt = asyncio.Event()
        self._last_error: str | None = None
        self.dropped_foreign = 0
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        c.max_queued_messages_set(MAX_QUEUED_OUT)
        c.max_inflight_messages_set(64)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        if username is not None:
            c.username_pw_set(username, password)
        if url.tls:
            ctx = ssl.create_default_context(cafile=ca_file)
            c.tls_set_context(ctx)
        c.on_pre_connect = self._cb_pre_connect
        c.on_connect = self._cb_connect
        c.on_connect_fail = self._cb_connect_fail
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        self._client = c
        self._keepalive = keepalive

    # -- paho thread side: hand over only ---------------------------------------------------
    def _cb_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        will = self._will() if self._will else None
        if will is not None:
            client.will_set(will.topic, will.payload, qos=1, retain=True)

    def _cb_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        # paho leaves Nagle on: a small request then waits for the peer's delayed ACK (40 ms on Linux).
        sock = client.socket()
        if isinstance(sock, socket.socket) and not rc.is_failure:  # ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.call_soon_threadsafe(self._connected, not rc.is_failure, str(rc))

    def _cb_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._loop.call_soon_threadsafe(self._connect_failed)

    def _cb_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self._loop.call_soon_threadsafe(self._disconnected, str(rc))

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        self._loop.call_soon_threadsafe(self._deliver, msg.topic, payload)

    # -- asyncio side -----------------------------------------------------------------------
    def _connected(self, ok: bool, reason: str) -> None:
        if not ok:
            self._report(f"broker {self.url} refused the connection: {reason}")
            return
        self.connected = True
        self.connect_count += 1
        self._last_error = None
        log.log(logging.DEBUG if self._quiet_connect else logging.INFO, "connected to %s", self.url)
        for topic, qos in self._subs.items():
            self._client.subscribe(topic, qos)
        self._connected_evt.set()
        if self._on_connected:
            self._on_connected()

    def _connect_failed(self) -> None:
        self._report(f"cannot reach broker {self.url}; retrying")

    def _disconnected(self, reason: str) -> None:
        was = self.connected
        self.connected = False
        self._connected_evt.clear()
        if was and not self._stopping:
            log.warning("lost connection to %s (%s); reconnecting", self.url, reason)
            if self._on_disconnected:
                self._on_disconnected()

    def _report(self, text: str) -> None:
        if text != self._last_error:
            log.warning("%s", text)
            self._last_error = text

    def _deliver(self, topic: str, payload: bytes) -> None:
        if topic not in self._exact and not any(paho.topic_matches_sub(sub, topic) for sub in self._wildcards):
            self.dropped_foreign += 1
            log.debug("dropped message on %s: matches none of our subscriptions", topic)
            return
        try:
            self._on_message(topic, payload)
        except Exception:  # one bad message must not stop the session
            log.exception("handling message on %s failed; dropped", topic)

    # -- public -----------------------------------------------------------------------------
    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subs[topic] = qos
        if "+" in topic or "#" in topic:
            self._wildcards.append(topic)
        else:
            self._exact.add(topic)
        if self.connected:
            self._client.subscribe(topic, qos)

    def start(self) -> None:
        self._client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive)
        self._client.loop_start()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected_evt.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish to %s not queued: %s", topic, paho.error_string(info.rc))
        return info

    async def publish_paced(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish at QoS 1 once fewer than ``PACE_OUT`` messages are unacknowledged: a burst (a
        folder of 10,000 new files) must not overflow paho's queue.  False if it was not queued."""
        while self.connected and self.out_queue() >= PACE_OUT:
            await asyncio.sleep(0.005)
        info = self.publish(topic, payload, qos=1, retain=retain)
        return info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)

    def out_queue(self) -> int:
        """Outgoing QoS 1 messages not yet acknowledged by the broker (pacing, not delivery)."""
        return len(self._client._out_messages)

    def drop_connection(self) -> None:
        """Break the connection as a network failure would: the broker publishes the will and the
        session reconnects (with a new will from ``on_pre_connect``)."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def stop(self, final: list[tuple[str, bytes]] | None = None, timeout: float = 2.0) -> None:
        """Publish ``final`` retained messages (e.g. presence offline), then disconnect cleanly."""
        self._stopping = True
        infos = [self._client.publish(t, p, qos=1, retain=True) for t, p in (final or [])]
        deadline = self._loop.time() + timeout
        while self.connected and any(not i.is_published() for i in infos) and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
