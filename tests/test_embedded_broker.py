"""`atrius broker` as a process: it serves MQTT, stops cleanly on a signal, and fails in one line."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
from brokers import LOCALHOST, MqttProbe, ServerProc, amqtt_proc, barrier, broker_proc, free_port

pytestmark = pytest.mark.timeout(60)

TOPIC = "atrius/v1/test/files/x/head"


def _launch(kind: str, port: int, log_path: Path) -> ServerProc:
    """`cli`: the atrius command; `module`: broker.embedded.main_broker without the CLI."""
    if kind == "cli":
        return broker_proc(port, log_path=log_path)
    return amqtt_proc(port, log_path=log_path)


def test_embedded_broker_serves_retained_and_stops_on_sigterm(embedded_broker: ServerProc) -> None:
    embedded_broker.wait_for_log(rf"broker listening on {LOCALHOST}:{embedded_broker.port}")
    pub = MqttProbe(embedded_broker.port, "pub").connect()
    pub.publish(TOPIC, b'{"version": 1}', retain=True)
    sub = MqttProbe(embedded_broker.port, "sub").connect()
    sub.subscribe(TOPIC)
    got = sub.wait_for(lambda ms: any(m.topic == TOPIC for m in ms))
    assert next((m.payload, m.retain) for m in got if m.topic == TOPIC) == (b'{"version": 1}', True)
    # both clients are still connected: shutdown must not wait for them
    assert embedded_broker.stop(timeout=10) == 0
    assert "Traceback" not in embedded_broker.log_text()


@pytest.mark.parametrize("kind", ["cli", "module"])
def test_broker_exits_0_on_sigint_with_clients_connected(kind: str, tmp_path: Path) -> None:
    proc = _launch(kind, free_port(), tmp_path / "broker.log").start()
    try:
        a = MqttProbe(proc.port, "a").connect()
        b = MqttProbe(proc.port, "b").connect()
        barrier(b, a)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.running:
            proc.kill()
    assert "Traceback" not in proc.log_text()


@pytest.mark.parametrize("kind", ["cli", "module"])
def test_port_in_use_exits_1_with_one_line(kind: str, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((LOCALHOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = _launch(kind, port, tmp_path / "broker.log").start(wait=False)
        try:
            code = proc.wait(20)
        finally:
            if proc.running:
                proc.kill()
    output = proc.log_text()
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1, output
    assert len(lines) == 1, output
    assert f"cannot listen on {LOCALHOST}:{port}: Address already in use" in lines[0]
