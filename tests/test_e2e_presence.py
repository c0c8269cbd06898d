"""Presence and `atrius status` with real processes: what devices announce, stale wills, the registry.

The basics (retained online/offline, Last Will on kill -9, a newer epoch after restart) are in
test_e2e_sync.py; these cover the details a status view relies on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from brokers import REPO_ROOT, MqttProbe, ServerProc, atrius_env
from e2e import Device, HubNet, MosquittoNet, content_hash, random_bytes, wait_synced, wait_until

from agent import __version__ as agent_version
from schemas.topics import presence_topic

FID = "art/hero.png"
FILES = {FID: "Art/hero.png"}
BIG = 64 << 20


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atrius_cli", *args], cwd=REPO_ROOT, env=atrius_env(),
                          capture_output=True, text=True, timeout=timeout)


def status(dev: Device, *, code: int = 0) -> dict[str, Any]:
    r = cli("status", "--config", str(dev.config), "--json")
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    got = json.loads(r.stdout)
    assert isinstance(got, dict)
    return got


def status_both_ways(dev: Device) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """`status --json` (expected to exit 1) and the table, run side by side: without a coordinator
    each waits out the reply timeout."""
    with ThreadPoolExecutor(2) as pool:
        as_json = pool.submit(status, dev, code=1)
        table = pool.submit(cli, "status", "--config", str(dev.config))
        return as_json.result(), table.result()


def row(st: dict[str, Any], device: str) -> dict[str, Any] | None:
    return next((d for d in st["devices"] if d["device"] == device), None)


def state_of(dev: Device, device: str) -> str | None:
    r = row(status(dev), device)
    return r["state"] if r else None


def _pair(tmp_path: Path, url: str, devices: list[Device]) -> tuple[Device, Device]:
    a = Device(tmp_path, "alice-pc", url, FILES)
    b = Device(tmp_path, "bob-laptop", url, FILES)
    devices += [a, b]
    return a, b


def probe_for(url: str) -> MqttProbe:
    probe = MqttProbe(int(url.rsplit(":", 1)[1])).connect()
    probe.subscribe(presence_topic("game", "+"))
    return probe


def presences(probe: MqttProbe, device: str) -> list[dict[str, Any]]:
    topic = presence_topic("game", device)
    return [json.loads(m.payload) for m in probe.messages if m.topic == topic and m.payload]


def latest(probe: MqttProbe, device: str) -> dict[str, Any] | None:
    seen = presences(probe, device)
    return seen[-1] if seen else None


def test_presence_details_and_transfer_activity(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net.url, devices)
    v1 = a.write(FID, b"first")
    t0 = time.time()
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    probe = probe_for(net.url)

    def idle(device: str) -> bool:
        p = latest(probe, device)
        return p is not None and p["sending"] == [] and p["receiving"] == []

    try:
        # (alice served v1 a moment ago: her presence says "sending" for a couple of seconds)
        wait_until(lambda: idle(a.name) and idle(b.name), 10, "retained presence of both, idle")
        for dev in (a, b):
            p = latest(probe, dev.name)
            assert p is not None
            assert p["device"] == dev.name and p["state"] == "online"
            assert isinstance(p["epoch"], int) and p["epoch"] > 0
            assert p["host"] and isinstance(p["host"], str)
            assert p["agent_version"] == agent_version
            assert t0 - 1 <= p["since"] <= time.time()
        epochs = {dev.name: latest(probe, dev.name)["epoch"] for dev in (a, b)}  # type: ignore[index]

        v2 = a.write(FID, random_bytes(BIG))
        wait_synced(b, FID, v2, timeout=90)
        wait_until(lambda: idle(a.name) and idle(b.name), 15, "both presences idle again after the transfer")
        assert any(FID in p["receiving"] for p in presences(probe, b.name)), presences(probe, b.name)
        assert any(FID in p["sending"] for p in presences(probe, a.name)), presences(probe, a.name)
        assert not any(FID in p["receiving"] for p in presences(probe, a.name))
        for dev in (a, b):  # activity updates are the same session: the epoch does not move
            assert {p["epoch"] for p in presences(probe, dev.name)} == {epochs[dev.name]}
            assert all(p["state"] == "online" for p in presences(probe, dev.name))
    finally:
        probe.close()


def test_a_stale_last_will_is_ignored(tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]) -> None:
    a, b = _pair(tmp_path, net.url, devices)
    a.start()
    b.start()
    probe = probe_for(net.url)
    try:
        wait_until(lambda: latest(probe, b.name), 10, "bob's retained presence")
        current = latest(probe, b.name)
        assert current is not None and current["state"] == "online"
        wait_until(lambda: state_of(a, b.name) == "online", 10, "status to show bob online", interval=0.2)

        # The Last Will of an older session of bob arrives late (and is retained): everyone ignores it
        # and bob puts his current presence back on the broker, so a device starting later sees him online.
        stale = {**current, "state": "offline", "epoch": current["epoch"] - 1, "sending": [], "receiving": []}
        probe.publish(presence_topic("game", b.name), json.dumps(stale).encode(), retain=True)
        wait_until(lambda: (latest(probe, b.name) or {}).get("state") == "online"
                   and latest(probe, b.name)["epoch"] == current["epoch"], 10,  # type: ignore[index]
                   "bob's online presence back on the broker")
        st = status(a)
        assert row(st, b.name)["state"] == "online" and st["coordinator"] is True  # type: ignore[index]
        assert row(st, a.name)["state"] == "online"  # type: ignore[index]
        assert f"device {b.name} is offline" not in a.log()

        # "Offline" at bob's current epoch while he is connected is not his: he starts a new session
        # (new epoch, new will) and is online again everywhere.
        probe.publish(presence_topic("game", b.name), json.dumps({**stale, "epoch": current["epoch"]}).encode(),
                      retain=True)
        b.wait_log("published this device as offline; reconnecting", timeout=10)
        wait_until(lambda: (latest(probe, b.name) or {}).get("state") == "online"
                   and latest(probe, b.name)["epoch"] > current["epoch"], 15,  # type: ignore[index]
                   "bob online again with a newer epoch")
        wait_until(lambda: state_of(a, b.name) == "online", 10, "status to show bob online again", interval=0.2)
        assert b.proc.running
    finally:
        probe.close()
    assert b.stop() == 0
    wait_until(lambda: state_of(a, b.name) == "offline", 10, "status to show bob offline after he stops",
               interval=0.2)


def restart_coordinator(net: HubNet | MosquittoNet, agent: Device) -> None:
    if isinstance(net, HubNet):
        net.stop()
        net.start()
        agent.wait_log(r"connected to", count=2, timeout=30)
    else:
        net.coord.stop()
        net.coord.start()
        wait_until(lambda: net.coord.log_text().count("connected to") >= 2, 20, "the coordinator to reconnect")
    time.sleep(0.5)


def test_device_registry_keeps_last_seen_across_a_restart(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net.url, devices)
    a.start()
    b.start()
    wait_until(lambda: state_of(a, b.name) == "online", 10, "status to show bob online", interval=0.2)
    stopped_at = time.time()
    assert b.stop() == 0
    wait_until(lambda: state_of(a, b.name) == "offline", 10, "status to show bob offline", interval=0.2)
    st = status(a)
    assert st["coordinator"] is True
    bob, alice = row(st, b.name), row(st, a.name)
    assert bob is not None and alice is not None
    assert bob["state"] == "offline" and abs(bob["last_seen"] - stopped_at) < 5, (bob, stopped_at)
    assert alice["state"] == "online" and abs(alice["last_seen"] - time.time()) < 5, alice
    before = bob["last_seen"]

    restart_coordinator(net, a)
    data = tmp_path / ("hub-data" if isinstance(net, HubNet) else "coord-data")
    saved = json.loads((data / "devices.json").read_text())
    assert saved["game"][b.name]["last_seen"] == before, saved

    def bob_after() -> dict[str, Any] | None:
        st = status(a)
        return row(st, b.name) if st["coordinator"] and row(st, a.name) else None

    wait_until(lambda: (r := bob_after()) and r["state"] == "offline" and r["last_seen"] is not None, 15,
               "the restarted coordinator to report bob", interval=0.2)
    st = status(a)
    bob = row(st, b.name)
    assert bob is not None and bob["state"] == "offline" and abs(bob["last_seen"] - before) < 0.01, (bob, before)
    assert row(st, a.name)["state"] == "online"  # type: ignore[index]


def test_status_table_locks_and_local_states(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = _pair(tmp_path, net.url, devices)
    v1 = a.write(FID, random_bytes(50_000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    r = cli("lock", FID, "--config", str(a.config))
    assert r.returncode == 0, r.stderr

    def lock_seen() -> bool:
        [f] = status(b)["files"]
        return bool(f["lock"]) and f["lock"]["holder"] == a.name

    wait_until(lock_seen, 10, "the lock in status", interval=0.2)
    r = cli("status", "--config", str(b.config))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in (a.name, b.name, FID, f"locked by {a.name}", "in sync", "v1"):
        assert text in out, f"{text!r} not in:\n{out}"
    [line] = [ln for ln in out.splitlines() if FID in ln and "locked by" in ln]
    assert "in sync" in line, line

    st = status(b)
    [f] = st["files"]
    assert f["file_id"] == FID and f["version"] == 1 and f["hash"] == v1 and f["author"] == a.name
    assert f["local"] == "in sync" and f["local_hash"] == v1 and f["conflict_copies"] == []
    assert st["locks"] and st["locks"][0]["holder"] == a.name
    assert any(e["holder"] == a.name and e["kind"] == "taken" for e in st["lock_events"]), st["lock_events"]

    assert b.stop() == 0
    edited = b.write(FID, random_bytes(40_000))  # edited while bob's agent is not running
    [f] = status(b)["files"]
    assert f["local"] == "locally modified" and f["local_hash"] == edited, f
    assert content_hash(a.path(FID)) == v1

    if isinstance(net, MosquittoNet):  # the broker alone: what it retains is still shown (see also below)
        net.coord.stop()
        st, r = status_both_ways(b)
        assert st["coordinator"] is False
        assert row(st, a.name)["state"] == "online" and row(st, b.name)["state"] == "offline"  # type: ignore[index]
        assert r.returncode == 1 and a.name in r.stdout and b.name in r.stdout and FID in r.stdout, r
        assert "Traceback" not in r.stderr


def test_status_without_a_coordinator(tmp_path: Path, embedded_broker: ServerProc, devices: list[Device]) -> None:
    a, b = _pair(tmp_path, embedded_broker.url, devices)
    a.start()
    t0 = time.monotonic()
    st, r = status_both_ways(b)
    assert time.monotonic() - t0 < 20
    assert r.returncode == 1, r
    assert a.name in r.stdout and "online" in r.stdout and FID in r.stdout, r.stdout
    assert "no answer from the coordinator" in r.stderr and "Traceback" not in r.stderr
    assert st["coordinator"] is False and row(st, a.name)["state"] == "online"  # type: ignore[index]
