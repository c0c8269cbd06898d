"""End-to-end sync between real agent processes over the embedded hub and over a real Mosquitto."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import blake3
import paho.mqtt.client as paho
from e2e import Device, HubNet, MosquittoNet, content_hash, random_bytes, wait_synced, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from schemas.topics import device_data_topic, device_request_topic, head_topic, presence_topic

FID = "art/hero.png"
FILES = {FID: "Art/hero.png"}


def _pair(tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]) -> tuple[Device, Device]:
    a = Device(tmp_path, "alice-pc", net.url, FILES)
    b = Device(tmp_path, "bob-laptop", net.url, FILES)
    devices += [a, b]
    return a, b


class Client:
    """A raw paho client for observing and injecting messages."""

    def __init__(self, url: str, subscribe: list[str] | None = None) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{os.getpid()}-{time.time_ns()}")
        self.c.on_message = lambda c, u, m: self._add(m.topic, m.payload)
        connected = threading.Event()
        self.c.on_connect = lambda *a: connected.set()
        self.c.connect(host, int(port))
        self.c.loop_start()
        assert connected.wait(10), "test client could not connect"
        for t in subscribe or []:
            self.c.subscribe(t, 1)

    def _add(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((topic, payload))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_first_sync_then_edits_both_ways(tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]) -> None:
    a, b = _pair(tmp_path, net, devices)
    v1 = a.write(FID, random_bytes(700_000))  # present before the agents start
    a.start()
    b.start()
    wait_synced(b, FID, v1)

    v2 = b.write(FID, random_bytes(300_000))  # edit on the other side
    wait_synced(a, FID, v2)

    # in-place rewrite of the middle on A: same size, same inode
    data = bytearray(a.path(FID).read_bytes())
    data[100_000:100_100] = b"x" * 100
    with open(a.path(FID), "r+b") as fh:
        fh.seek(100_000)
        fh.write(b"x" * 100)
    v3 = blake3.blake3(bytes(data)).hexdigest()
    wait_synced(b, FID, v3)
    assert "reused" in b.log()
    # the content v3 replaced on bob (his own v2) was kept in his snapshots
    snaps = list((b.dir / ".atrius" / b.name / "snapshots").rglob("*.png"))
    assert v2 in {blake3.blake3(p.read_bytes()).hexdigest() for p in snaps if p.is_file()}

    # editor-style save: write a temp file, rename over the path
    tmp = b.path(FID).with_name("hero.png.swp-save")
    tmp.write_bytes(b"saved by rename")
    os.replace(tmp, b.path(FID))
    wait_synced(a, FID, blake3.blake3(b"saved by rename").hexdigest())
    time.sleep(0.5)
    # each device published only its own edits, never the versions it applied
    assert a.log().count(": published v") == 2 and b.log().count(": published v") == 2
    assert not a.temp_files() and not b.temp_files()
    assert "Traceback" not in a.log() + b.log()


def test_large_file_never_torn(tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]) -> None:
    a, b = _pair(tmp_path, net, devices)
    old = a.write(FID, random_bytes(64 << 20))
    a.start()
    b.start()
    wait_synced(b, FID, old, timeout=60)

    seen: list[str | None] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(content_hash(b.path(FID)))

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        new = a.write(FID, random_bytes(64 << 20))
        wait_synced(b, FID, new, timeout=60)
        time.sleep(0.1)
    finally:
        stop.set()
        reader.join()
    assert len(seen) > 5
    torn = [h for h in seen if h not in {old, new}]
    assert not torn, f"{len(torn)} of {len(seen)} reads saw a torn or missing file"
    assert seen[-1] == new
    assert not b.temp_files()


def test_presence_retained_offline_on_kill_and_clean_stop(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net, devices)
    a.start()
    b.start()
    watcher = Client(net.url, [presence_topic("game", "+")])
    try:
        wait_until(lambda: watcher.on(presence_topic("game", a.name)) and watcher.on(presence_topic("game", b.name)),
                   10, "retained presence of both devices for a late subscriber")
        pa = json.loads(watcher.on(presence_topic("game", a.name))[-1])
        assert pa["state"] == "online" and pa["device"] == a.name and pa["epoch"] > 0

        a.kill()  # no clean stop: the Last Will marks it offline
        def offline(dev: str) -> bool:
            msgs = watcher.on(presence_topic("game", dev))
            return bool(msgs) and json.loads(msgs[-1])["state"] == "offline"
        wait_until(lambda: offline(a.name), 15, "alice offline via Last Will after kill -9")
        assert json.loads(watcher.on(presence_topic("game", a.name))[-1])["epoch"] == pa["epoch"]
        wait_until(lambda: "device alice-pc is offline" in b.log(), 10, "bob to see alice offline")

        assert b.stop() == 0  # clean stop publishes offline itself
        wait_until(lambda: offline(b.name), 10, "bob offline after a clean stop")
    finally:
        watcher.close()

    late = Client(net.url, [presence_topic("game", "+")])  # the offline states are retained
    try:
        wait_until(lambda: late.on(presence_topic("game", a.name)) and late.on(presence_topic("game", b.name)),
                   10, "retained offline presence")
        assert json.loads(late.on(presence_topic("game", a.name))[-1])["state"] == "offline"
        assert json.loads(late.on(presence_topic("game", b.name))[-1])["state"] == "offline"
    finally:
        late.close()
    a.start()  # a restart comes back online with a newer epoch
    probe = Client(net.url, [presence_topic("game", a.name)])
    try:
        wait_until(lambda: probe.on(presence_topic("game", a.name))
                   and json.loads(probe.on(presence_topic("game", a.name))[-1])["state"] == "online", 10,
                   "alice online again")
        assert json.loads(probe.on(presence_topic("game", a.name))[-1])["epoch"] > pa["epoch"]
    finally:
        probe.close()


def test_garbled_messages_dropped_while_sync_continues(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net, devices)
    v1 = a.write(FID, random_bytes(200_000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    evil = Client(net.url)
    try:
        head = head_topic("game", FID)
        evil.publish(head, b"\xff\xfe not json")
        evil.publish(head, json.dumps({"file_id": FID, "hash": "00" * 32}).encode())
        evil.publish(head, json.dumps({"file_id": "other.txt", "hash": "ab" * 32, "size": 1, "version": 99,
                                       "author": "mallory", "chunks": 1, "manifest": ["cd" * 32]}).encode())
        evil.publish(head_topic("game", "../../etc/passwd"), b"{}")
        evil.publish(presence_topic("game", b.name), b"[1,2,3]")
        evil.publish(device_data_topic("game", b.name), b"AT\x01\x00" + b"\x11" * 32 + b"not the chunk")
        evil.publish(device_data_topic("game", b.name), b"garbage")
        evil.publish(device_request_topic("game", a.name), b'{"kind":"get"}')
        evil.publish(device_request_topic("game", a.name),
                     json.dumps({"req_id": "x", "requester": "../x", "file_id": FID, "hashes": ["00" * 32]}).encode())
    finally:
        evil.close()
    time.sleep(0.5)
    v2 = a.write(FID, random_bytes(250_000))
    wait_synced(b, FID, v2)
    v3 = b.write(FID, random_bytes(1000))
    wait_synced(a, FID, v3)
    assert a.proc.running and b.proc.running
    logs = b.log()
    assert "dropped malformed head" in logs
    assert "does not match its topic" in logs
    assert "dropped" in a.log()
    assert "Traceback" not in logs + a.log()
    # nothing written outside the configured files
    assert sorted(p.relative_to(b.dir).as_posix() for p in b.dir.rglob("*") if p.is_file()
                  and ".atrius" not in p.parts) == ["Art/hero.png", "agent.yaml"]


def test_restart_reconciles_with_retained_head(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net, devices)
    v1 = a.write(FID, random_bytes(150_000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)

    assert b.stop() == 0  # B offline: A edits; B catches up when it starts
    v2 = a.write(FID, random_bytes(160_000))
    a.wait_log(r"published v2")
    b.start()
    wait_synced(b, FID, v2)

    assert b.stop() == 0  # B edits while stopped: published on start
    v3 = b.write(FID, random_bytes(170_000))
    b.start()
    wait_synced(a, FID, v3)
    assert "conflict" not in a.log() + b.log()


def test_first_run_with_different_content_keeps_conflict_copy(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net, devices)
    va = a.write(FID, b"alice's texture" * 1000)
    bob_data = b"bob's texture" * 1000
    b.write(FID, bob_data)
    a.start()
    a.wait_log(r"published v1")
    b.start()
    wait_synced(b, FID, va)
    copies = list(b.path(FID).parent.glob("hero.conflict-bob-laptop-*.png"))
    assert len(copies) == 1 and copies[0].read_bytes() == bob_data
    assert content_hash(a.path(FID)) == va


def test_receiver_repairs_from_coordinator_after_author_is_gone(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net, devices)
    v1 = a.write(FID, random_bytes(3_000_000))
    a.start()
    a.wait_log(r"published v1")
    wait_until(lambda: "stored game/art/hero.png v1" in net.log_text(), 20, "the coordinator to store v1")
    a.kill()
    b.start()
    wait_synced(b, FID, v1)
    assert "applied v1 from alice-pc" in b.log()


def test_agent_reconnects_after_broker_restart(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net, devices)
    v1 = a.write(FID, random_bytes(100_000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    net.kill()
    time.sleep(0.5)
    v2 = a.write(FID, random_bytes(110_000))  # edited while the broker is down
    time.sleep(0.5)
    net.start()
    a.wait_log(r"connected to", count=2, timeout=30)
    b.wait_log(r"connected to", count=2, timeout=30)
    wait_synced(b, FID, v2, timeout=30)
    v3 = b.write(FID, random_bytes(120_000))
    wait_synced(a, FID, v3, timeout=30)
