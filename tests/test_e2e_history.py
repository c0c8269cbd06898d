"""The coordinator as store of record, with real processes: catch-up, history, restore, resume, delta."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import paho.mqtt.client as paho
import pytest
from brokers import REPO_ROOT, atrius_env, free_port, hub_proc, require_mosquitto, small_disk
from e2e import Device, HubNet, MosquittoNet, content_hash, random_bytes, wait_synced, wait_until
from paho.mqtt.enums import CallbackAPIVersion

FID = "art/hero.png"
FILES = {FID: "Art/hero.png"}
BIG = 128 << 20


def make_net(kind: str, root: Path) -> HubNet | MosquittoNet:
    return HubNet(root) if kind == "hub" else MosquittoNet(root, require_mosquitto())


def _pair(tmp_path: Path, url: str, devices: list[Device]) -> tuple[Device, Device]:
    a = Device(tmp_path, "alice-pc", url, FILES)
    b = Device(tmp_path, "bob-laptop", url, FILES)
    devices += [a, b]
    return a, b


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atrius_cli", *args], cwd=REPO_ROOT, env=atrius_env(),
                          capture_output=True, text=True, timeout=timeout)


def stored(net: HubNet | MosquittoNet, version: int) -> bool:
    return f"stored game/{FID} v{version} " in net.log_text()


def test_offline_catch_up_with_the_author_stopped(tmp_path: Path, net: HubNet | MosquittoNet,
                                                  devices: list[Device]) -> None:
    a, b = _pair(tmp_path, net.url, devices)
    v1 = a.write(FID, random_bytes(400_000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    assert b.stop() == 0
    v2 = a.write(FID, random_bytes(2_000_000))
    a.wait_log("published v2")
    wait_until(lambda: stored(net, 2), 20, "the coordinator to store v2")
    assert a.stop() == 0  # the author is gone before bob comes back
    b.start()
    wait_synced(b, FID, v2)


def test_versions_and_restore_reaching_a_device_that_was_offline(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net.url, devices)
    contents = [random_bytes(150_000 + i) for i in range(3)]
    a.start()
    b.start()
    hashes = []
    for i, data in enumerate(contents, 1):
        hashes.append(a.write(FID, data))
        wait_synced(b, FID, hashes[-1])
        wait_until(lambda i=i: stored(net, i), 20, f"v{i} stored")
    r = cli("versions", FID, "--config", str(a.config), "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [v["version"] for v in listed] == [3, 2, 1]
    assert [v["hash"] for v in listed] == hashes[::-1]
    for v in listed:
        assert {"version", "hash", "size", "author", "time"} <= v.keys() and v["author"] == "alice-pc"
    r = cli("versions", str(a.path(FID)), "--config", str(a.config))  # a local path maps to the id
    assert r.returncode == 0 and "3 version(s)" in r.stdout

    assert b.stop() == 0
    r = cli("restore", FID, "--version", "1", "--config", str(a.config))
    assert r.returncode == 0, r.stderr
    assert "restored as version 4" in r.stdout
    wait_synced(a, FID, hashes[0])
    b.start()  # offline during the restore
    wait_synced(b, FID, hashes[0])
    listed = json.loads(cli("versions", FID, "--config", str(b.config), "--json").stdout)
    assert listed[0]["version"] == 4 and listed[0]["restored_from"] == 1 and listed[0]["hash"] == hashes[0]


def test_one_coordinator_serves_every_space(tmp_path: Path, net: HubNet | MosquittoNet,
                                            devices: list[Device]) -> None:
    game = Device(tmp_path, "alice-pc", net.url, FILES)
    other = Device(tmp_path / "other", "alice-pc", net.url, FILES, space="other-game")
    devices += [game, other]
    game.write(FID, b"in game")
    other.write(FID, b"in other-game")
    game.start()
    other.start()
    for dev, space in ((game, "game"), (other, "other-game")):
        wait_until(lambda space=space: f"stored {space}/{FID} v1 " in net.log_text(), 20, f"v1 stored in {space}")
        r = cli("versions", FID, "--config", str(dev.config), "--json")
        assert r.returncode == 0, r.stderr
        [entry] = json.loads(r.stdout)
        assert entry["hash"] == content_hash(dev.path(FID))


def test_any_device_that_holds_a_version_serves_it(tmp_path: Path, devices: list[Device]) -> None:
    mosq = MosquittoNet(tmp_path, require_mosquitto()).broker.start()  # no coordinator at all
    try:
        a, b = _pair(tmp_path, mosq.url, devices)
        c = Device(tmp_path, "carol-mac", mosq.url, FILES)
        devices.append(c)
        v1 = a.write(FID, random_bytes(1_500_000))
        a.start()
        b.start()
        wait_synced(b, FID, v1)
        assert a.stop() == 0  # the author is gone and there is no coordinator: bob must serve carol
        c.start()
        wait_synced(c, FID, v1, timeout=60)
        assert "applied v1 from alice-pc" in c.log()
    finally:
        mosq.stop()


def test_cli_errors_for_history(tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]) -> None:
    a, _ = _pair(tmp_path, net.url, devices)
    a.write(FID, b"one")
    a.start()
    a.wait_log("published v1")
    wait_until(lambda: stored(net, 1), 20, "v1 stored")
    r = cli("restore", FID, "--version", "7", "--config", str(a.config))
    assert r.returncode == 1 and "has no version 7" in r.stderr
    r = cli("versions", "never/seen.png", "--config", str(a.config))
    assert r.returncode == 1 and "no versions of 'never/seen.png'" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_without_coordinator_or_broker(tmp_path: Path, devices: list[Device]) -> None:
    mosq = MosquittoNet(tmp_path, require_mosquitto()).broker.start()  # a broker, but no coordinator
    try:
        a = Device(tmp_path, "alice-pc", mosq.url, FILES)
        t0 = time.monotonic()
        r = cli("versions", FID, "--config", str(a.config))
        assert r.returncode == 1 and "no answer from the coordinator" in r.stderr
        assert time.monotonic() - t0 < 20
    finally:
        mosq.stop()
    r = cli("versions", FID, "--config", str(a.config))  # now nothing listens at all
    assert r.returncode == 1 and "cannot reach broker" in r.stderr


# -- resume after kill -9 -----------------------------------------------------------------------------------

def _journal_chunks(dev: Device) -> int:
    part = dev.dir / ".atrius" / dev.name / "partial"
    return sum(p.stat().st_size // 32 for p in part.glob("*.done")) if part.is_dir() else 0


def _applied_line(dev: Device, version: int) -> str:
    lines = [ln for ln in dev.log().splitlines() if f"applied v{version} " in ln]
    assert lines, dev.log()[-2000:]
    return lines[-1]


def _counts(line: str) -> tuple[int, int, int]:
    import re

    m = re.search(r"(\d+) chunks fetched, (\d+) reused, (\d+) resumed", line)
    assert m, line
    return int(m[1]), int(m[2]), int(m[3])


def _start_big_transfer(a: Device, b: Device) -> tuple[str, str]:
    v1 = a.write(FID, random_bytes(1000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    v2 = a.write(FID, random_bytes(BIG))
    wait_until(lambda: _journal_chunks(b) >= 250, 60, "the transfer to be under way")
    return v1, v2


def _never_torn(dev: Device, allowed: set[str], stop: threading.Event, seen: list[str | None]) -> None:
    while not stop.is_set():
        seen.append(content_hash(dev.path(FID)))
        time.sleep(0.05)


@pytest.mark.parametrize("victim", ["receiver", "sender"])
def test_resume_after_killing_an_agent(tmp_path: Path, victim: str, devices: list[Device]) -> None:
    net = HubNet(tmp_path)
    net.start()
    try:
        a, b = _pair(tmp_path, net.url, devices)
        v1, v2 = _start_big_transfer(a, b)
        seen: list[str | None] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_never_torn, args=(b, {v1, v2}, stop, seen))
        watcher.start()
        try:
            (b if victim == "receiver" else a).kill()
            before = _journal_chunks(b)
            time.sleep(1.0)
            (b if victim == "receiver" else a).start(wait=False)
            wait_synced(b, FID, v2, timeout=120)
        finally:
            stop.set()
            watcher.join()
        assert set(seen) <= {v1, v2}, "the receiver's file was seen torn"
        fetched, _reused, resumed = _counts(_applied_line(b, 2))
        total = len(list(dict.fromkeys(_chunks_of(a.path(FID)))))
        if victim == "receiver":
            assert resumed >= before - 5 and resumed > 0, (resumed, before)
            assert fetched + resumed <= total + 1
        else:
            assert fetched <= total
        assert not b.temp_files() and not list((b.dir / ".atrius" / b.name / "partial").glob("*"))
    finally:
        net.stop()


@pytest.mark.parametrize("kind", ["hub", "mosquitto"])
def test_resume_after_killing_the_broker(tmp_path: Path, kind: str, devices: list[Device]) -> None:
    net = make_net(kind, tmp_path)
    net.start()
    try:
        a, b = _pair(tmp_path, net.url, devices)
        _v1, v2 = _start_big_transfer(a, b)
        net.kill()
        time.sleep(1.0)
        net.start()
        wait_synced(b, FID, v2, timeout=120)
        fetched, reused, resumed = _counts(_applied_line(b, 2))
        total = len(list(dict.fromkeys(_chunks_of(a.path(FID)))))
        assert fetched + resumed + reused <= total + 1
        assert not b.temp_files()
    finally:
        net.close() if isinstance(net, MosquittoNet) else net.stop()


def _chunks_of(path: Path) -> list[str]:
    from agent.chunker import scan_file

    return [c.hash for c in scan_file(path).chunks]


# -- delta ------------------------------------------------------------------------------------------------

class WireCounter:
    """Counts every payload byte on the space's topics, as a broker would carry them."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.bytes = 0
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2)
        self.c.on_message = self._on
        self.c.connect(host, int(port))
        self.c.subscribe("atrius/v1/game/#", 1)
        self.c.loop_start()

    def _on(self, _c: object, _u: object, m: paho.MQTTMessage) -> None:
        with self.lock:
            self.bytes += len(m.payload) + len(m.topic)

    def reset(self) -> None:
        with self.lock:
            self.bytes = 0

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_delta_moves_a_few_chunks_not_the_file(tmp_path: Path, devices: list[Device]) -> None:
    mosq = MosquittoNet(tmp_path, require_mosquitto())
    mosq.broker.start()  # agents only: every byte counted moved between the two devices
    try:
        a, b = _pair(tmp_path, mosq.url, devices)
        data = bytearray(random_bytes(BIG))
        v1 = a.write(FID, bytes(data))
        a.start()
        b.start()
        wait_synced(b, FID, v1, timeout=60)
        time.sleep(0.5)
        counter = WireCounter(mosq.url)
        time.sleep(0.3)
        counter.reset()
        mid = len(data) // 2
        data[mid:mid] = os.urandom(100)  # a 100-byte insertion in the middle
        v2 = a.write(FID, bytes(data))
        wait_synced(b, FID, v2, timeout=60)
        time.sleep(0.3)
        moved = counter.bytes
        counter.close()
        fetched, reused, _ = _counts(_applied_line(b, 2))
        assert fetched <= 4 and reused > 1000
        assert moved < 1_500_000, f"{moved} bytes crossed the broker for a 100-byte insertion"
    finally:
        mosq.broker.stop()


# -- the store and the database under damage ------------------------------------------------------------

def test_corrupt_chunk_in_store_is_never_served_and_is_repaired(tmp_path: Path, devices: list[Device]) -> None:
    net = HubNet(tmp_path)
    net.start()
    try:
        a, b = _pair(tmp_path, net.url, devices)
        c = Device(tmp_path, "carol-mac", net.url, FILES)
        devices.append(c)
        v1 = a.write(FID, random_bytes(3_000_000))
        a.start()
        b.start()
        wait_synced(b, FID, v1)
        wait_until(lambda: stored(net, 1), 20, "v1 stored")
        assert a.stop() == 0  # the author is gone; bob still holds the content
        victim = _chunks_of(a.path(FID))[5]
        blob = tmp_path / "hub-data" / "chunks" / victim[:2] / victim[2:4] / victim
        blob.write_bytes(b"bit rot" + blob.read_bytes()[7:])
        c.start()  # carol asks the hub first (alice is offline); the hub must not serve the rotten chunk
        wait_synced(c, FID, v1, timeout=60)
        wait_until(lambda: "is corrupt on disk" in net.log_text(), 10, "the hub to report the corrupt blob")
        wait_until(lambda: blob.exists() and blake3.blake3(blob.read_bytes()).hexdigest() == victim, 30,
                   "the hub to fetch a good copy from a device that has it")
    finally:
        net.stop()


def test_history_database_intact_after_coordinator_kill_mid_write(tmp_path: Path) -> None:
    mosq = MosquittoNet(tmp_path, require_mosquitto())
    mosq.start()
    try:
        mosq.coord.wait_for_log("connected to", 20)
        time.sleep(0.3)
        host, port = mosq.url.removeprefix("mqtt://").split(":")
        pub = paho.Client(CallbackAPIVersion.VERSION2)
        pub.connect(host, int(port))
        pub.loop_start()
        topic = f"atrius/v1/game/files/{FID.replace('/', '%2F')}/head"
        for v in range(1, 4001):  # a stream of (empty-file) versions keeps the coordinator writing
            head = {"file_id": FID, "hash": f"{v:064x}", "size": 0, "version": v, "author": "alice-pc",
                    "time": time.time()}
            pub.publish(topic, json.dumps(head), qos=1)
            time.sleep(0.001)
            if v == 2500:  # well past one flush interval, with writes still going on
                wait_until(lambda: "recorded game/art/hero.png v1200 " in mosq.log_text(), 30, "recording")
                mosq.coord.kill()
        pub.loop_stop()
        pub.disconnect()
        files = list((tmp_path / "coord-data" / "history").rglob("*.json"))
        assert files, "nothing was flushed before the kill"
        for f in files:
            json.loads(f.read_text())  # every file on disk is complete JSON
        mosq.coord.start()  # the database opens and answers
        mosq.coord.wait_for_log("connected to", 20)
        a = Device(tmp_path, "alice-pc", mosq.url, FILES)
        r = cli("versions", FID, "--config", str(a.config), "--json")
        assert r.returncode == 0, r.stderr
        versions = [v["version"] for v in json.loads(r.stdout)]
        assert len(versions) >= 500 and versions == sorted(versions, reverse=True)
        assert len(set(versions)) == len(versions)
    finally:
        mosq.close()


def test_full_disk_on_the_hub_keeps_it_serving(tmp_path: Path, devices: list[Device]) -> None:
    with small_disk(tmp_path / "small-disk", "2m") as data:
        hub = hub_proc(free_port(), data / "hub", log_path=tmp_path / "hub.log").start()
        try:
            a, b = _pair(tmp_path, hub.url, devices)
            v1 = a.write(FID, random_bytes(300_000))
            a.start()
            b.start()
            wait_synced(b, FID, v1)
            wait_until(lambda: f"stored game/{FID} v1 " in hub.log_text(), 20, "v1 stored")
            v2 = a.write(FID, random_bytes(4_000_000))  # does not fit on the hub's disk
            wait_synced(b, FID, v2)  # devices keep syncing directly
            wait_until(lambda: "No space left on device" in hub.log_text(), 20, "a clear disk-full error")
            assert hub.running
            r = cli("restore", FID, "--version", "1", "--config", str(a.config))  # v1 is intact
            assert r.returncode == 0, r.stderr
            wait_synced(b, FID, v1)
            assert "Traceback" not in hub.log_text()
        finally:
            hub.stop()
