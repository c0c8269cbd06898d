"""Locks with real processes: one winner, read-only elsewhere, conflict copies, TTL, restarts, bad input.

Every scenario runs over ``atrius hub`` (embedded amqtt + coordinator) and over a private Mosquitto
with ``atrius coordinator`` (the ``net`` fixture); the CLI runs as a subprocess like a user would.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from brokers import REPO_ROOT, MosquittoProc, MqttProbe, atrius_env, barrier, free_port
from e2e import Device, HubNet, MosquittoNet, content_hash, random_bytes, wait_synced, wait_until

FID = "art/hero.png"
FILES = {FID: "Art/hero.png"}
LOCK_TOPIC = f"atrius/v1/game/files/{quote(FID, safe='')}/lock"
WRITE_BITS = 0o222


# --- helpers ---------------------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atrius_cli", *args], cwd=REPO_ROOT, env=atrius_env(),
                          capture_output=True, text=True, timeout=timeout)


def run(dev: Device, *args: str) -> subprocess.CompletedProcess[str]:
    """`atrius ARGS --config <dev's config>`."""
    return cli(*args, "--config", str(dev.config))


def popen(dev: Device, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "atrius_cli", *args, "--config", str(dev.config)],
                            cwd=REPO_ROOT, env=atrius_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"{r.args[3:]} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def status(dev: Device) -> dict:
    r = ok(run(dev, "status", "--json"))
    return json.loads(r.stdout)


def lock_in(st: dict) -> dict | None:
    """The lock of FID in a `status --json` document (also checked against its files row)."""
    locks = [lk for lk in st["locks"] if lk["file_id"] == FID]
    [row] = [f for f in st["files"] if f["file_id"] == FID]
    assert row["lock"] == (locks[0] if locks else None), st
    return locks[0] if locks else None


def holder(dev: Device) -> str | None:
    lk = lock_in(status(dev))
    return lk["holder"] if lk else None


def mode(dev: Device) -> int:
    return stat.S_IMODE(dev.path(FID).stat().st_mode)


def writable(dev: Device) -> bool:
    return bool(mode(dev) & WRITE_BITS)


def wait_read_only(dev: Device, timeout: float = 5) -> None:
    wait_until(lambda: not writable(dev), timeout,
               f"{FID} read-only on {dev.name} (mode {mode(dev):o})\n{dev.log()[-2000:]}")


def wait_mode(dev: Device, expected: int, timeout: float = 5) -> None:
    wait_until(lambda: mode(dev) == expected, timeout,
               f"{FID} mode {expected:o} on {dev.name} (is {mode(dev):o})\n{dev.log()[-2000:]}")


def modes_hold(expected: dict[Device, int], seconds: float) -> None:
    """No file mode changes during `seconds` (longer than the agents' 150 ms lock settle time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen = {d.name: mode(d) for d in expected}
        assert seen == {d.name: m for d, m in expected.items()}, f"modes changed: {seen}"
        time.sleep(0.02)


def start_all(*devs: Device) -> None:
    with ThreadPoolExecutor(len(devs)) as pool:
        list(pool.map(Device.start, devs))


def space(tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device],
          names: tuple[str, ...] = ("alice-pc", "bob-laptop")) -> tuple[list[Device], str]:
    """Devices sharing FID at v1 (written by the first), stored by the coordinator."""
    devs = [Device(tmp_path, n, net.url, FILES) for n in names]
    devices += devs
    v1 = devs[0].write(FID, random_bytes(100_000))
    start_all(*devs)
    for d in devs[1:]:
        wait_synced(d, FID, v1)
    wait_until(lambda: f"stored game/{FID} v1 " in net.log_text(), 20, "the coordinator to store v1")
    return devs, v1


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def retained_lock(port: int) -> bytes | None:
    """The retained payload on LOCK_TOPIC as a new subscriber sees it (None: nothing retained)."""
    probe = MqttProbe(port).connect()
    try:
        probe.subscribe(LOCK_TOPIC)
        barrier(probe, probe)
        got = [m.payload for m in probe.messages if m.topic == LOCK_TOPIC]
    finally:
        probe.close()
    return got[-1] if got else None


def conflict_copies(dev: Device) -> list[Path]:
    p = dev.path(FID)
    rx = re.compile(rf"{re.escape(p.stem)}\.conflict-{re.escape(dev.name)}-\d{{8}}-\d{{6}}(-\d+)?{re.escape(p.suffix)}")
    return sorted(c for c in p.parent.iterdir() if rx.fullmatch(c.name))


# --- tests -----------------------------------------------------------------------------------------------


def test_simultaneous_locks_have_one_winner_and_only_other_devices_go_read_only(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    (alice, bob), _v1 = space(tmp_path, net, devices)
    original = {alice: 0o640, bob: 0o604}
    for d, m in original.items():
        d.path(FID).chmod(m)

    procs = {d: popen(d, "lock", FID, "--note", f"by {d.name}") for d in (alice, bob)}
    outs = {d: (p.communicate(timeout=30), p.returncode) for d, p in procs.items()}
    codes = sorted(rc for _o, rc in outs.values())
    assert codes == [0, 3], outs
    [winner] = [d for d, (_o, rc) in outs.items() if rc == 0]
    [loser] = [d for d, (_o, rc) in outs.items() if rc == 3]
    (_out, err), _rc = outs[loser]
    assert re.search(rf"^atrius: {re.escape(FID)} is locked by {winner.name} since .*\(\"by {winner.name}\"\)",
                     err, re.M), err

    # read-only on the other device, the holder's copy untouched
    wait_read_only(loser)
    assert mode(loser) == original[loser] & ~WRITE_BITS
    winner.wait_log(r"locked by this device")
    assert mode(winner) == original[winner]

    # renewing one's own lock is fine (and takes a TTL); the lock stays the holder's
    r = ok(run(winner, "lock", FID, "--ttl", "2h"))
    assert "renewed" in r.stdout
    lk = lock_in(status(loser))
    assert lk is not None and lk["holder"] == winner.name
    assert lk["expires_at"] is not None and abs(lk["expires_at"] - (time.time() + 7200)) < 60, lk

    # the holder unlocks: the exact original mode comes back
    ok(run(winner, "unlock", FID))
    wait_mode(loser, original[loser])
    assert mode(winner) == original[winner]

    # unlock by a non-holder is refused; --force breaks the lock and is recorded
    ok(run(winner, "lock", FID))
    wait_read_only(loser)
    r = run(loser, "unlock", FID)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert f"locked by {winner.name}" in r.stderr and "--force" in r.stderr, r.stderr
    assert holder(loser) == winner.name
    assert not writable(loser)

    r = ok(run(loser, "unlock", FID, "--force"))
    wait_mode(loser, original[loser])
    st = status(winner)
    assert lock_in(st) is None
    forced = [e for e in st["lock_events"] if e["kind"] == "forced"]
    assert forced and forced[0]["holder"] == winner.name and forced[0]["by"] == loser.name, st["lock_events"]
    assert mode(winner) == original[winner]
    r = ok(run(loser, "unlock", FID))
    assert "not locked" in r.stdout


def test_the_lock_reaches_a_late_device_and_survives_restarts(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    (alice, bob), v1 = space(tmp_path, net, devices)
    fresh_mode = mode(bob)  # of a file the agent created: carol's will be the same
    bob.path(FID).chmod(0o640)
    ok(run(alice, "lock", FID, "--note", "painting"))
    wait_read_only(bob)

    carol = Device(tmp_path, "carol-mac", net.url, FILES)  # connects after the lock was taken
    devices.append(carol)
    carol.start()
    wait_synced(carol, FID, v1)
    wait_read_only(carol)
    assert mode(carol) == fresh_mode & ~WRITE_BITS
    st = status(carol)
    lk = lock_in(st)
    assert lk is not None and lk["holder"] == "alice-pc" and lk["note"] == "painting" and lk["expires_at"] is None
    assert lk["version"] == 1

    # the holder and a non-holder stop: the lock stays; then both come back
    assert alice.stop() == 0
    assert bob.stop() == 0
    st = status(carol)
    assert lock_in(st) is not None and lock_in(st)["holder"] == "alice-pc"
    assert {d["device"]: d["state"] for d in st["devices"]}["alice-pc"] == "offline"
    r = run(carol, "lock", FID)
    assert r.returncode == 3 and "locked by alice-pc" in r.stderr, (r.returncode, r.stderr)
    assert not writable(carol) and not writable(bob)
    start_all(alice, bob)
    assert holder(carol) == "alice-pc"
    assert writable(alice) and not writable(bob) and not writable(carol)
    assert "unlocked" not in bob.log() and "unlocked" not in carol.log()

    # the coordinator restarts (the hub's embedded broker also loses every retained message)
    if isinstance(net, HubNet):
        net.stop()
        net.start()
        for d, n in ((alice, 3), (bob, 3), (carol, 2)):
            d.wait_log(r"connected to", count=n)
    else:
        assert net.coord.stop() == 0
        net.coord.start()
    wait_until(lambda: lock_in(status(carol)) is not None, 15, "the lock back after the coordinator restart")
    assert holder(bob) == "alice-pc"
    r = run(bob, "unlock", FID)  # the coordinator's own record still names alice
    assert r.returncode == 3 and "locked by alice-pc" in r.stderr, (r.returncode, r.stderr)
    wait_until(lambda: retained_lock(port_of(net.url)), 5, "the lock retained on the broker again")
    assert json.loads(retained_lock(port_of(net.url)) or b"{}")["holder"] == "alice-pc"
    time.sleep(0.5)  # past the agents' retained grace and lock settle time after reconnecting
    assert writable(alice) and not writable(bob) and not writable(carol)
    assert "unlocked" not in bob.log() and "unlocked" not in carol.log(), (bob.log()[-2000:], carol.log()[-2000:])

    # unlocking brings back bob's mode, saved across his agent's restart, and carol's, who was offline
    assert carol.stop() == 0
    ok(run(alice, "unlock", FID))
    wait_mode(bob, 0o640)
    assert not writable(carol)
    carol.start()
    wait_mode(carol, fresh_mode)


def test_a_write_under_someone_elses_lock_becomes_a_conflict_copy_and_ttls_expire(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    (alice, bob), v1 = space(tmp_path, net, devices)
    ok(run(alice, "lock", FID))
    wait_read_only(bob)

    # bob writes anyway: kept beside the file, not published, the file returns to the head
    p = bob.path(FID)
    p.chmod(0o644)
    p.write_bytes(b"bob was here")
    wait_until(lambda: any(c.read_bytes() == b"bob was here" for c in conflict_copies(bob)), 10,
               f"bob's edit kept as a conflict copy\n{bob.log()[-2000:]}")
    wait_synced(bob, FID, v1, timeout=10)
    wait_read_only(bob)
    bob.wait_log(r"edited while alice-pc holds the lock")
    [copy] = conflict_copies(bob)
    assert copy.stat().st_mode & 0o200, "the conflict copy is the user's to edit"
    st = status(bob)
    [row] = st["files"]
    assert row["version"] == 1 and row["hash"] == v1 and row["conflict_copies"] == [copy.name], row
    listed = json.loads(ok(run(alice, "versions", FID, "--json")).stdout)
    assert [v["version"] for v in listed] == [1], listed
    assert content_hash(alice.path(FID)) == v1
    assert "published v2" not in bob.log() and f"game/{FID} v2" not in net.log_text()
    assert writable(alice)

    # the holder's edits still reach bob, whose copy stays read-only
    v2 = alice.write(FID, random_bytes(120_000))
    wait_synced(bob, FID, v2)
    assert mode(bob) == 0o444 and conflict_copies(bob) == [copy]

    # a TTL lock runs out by itself
    ok(run(alice, "unlock", FID))
    wait_until(lambda: writable(bob), 5, "bob writable after unlock")
    ok(run(alice, "lock", FID, "--ttl", "2s"))
    wait_read_only(bob)
    t0 = time.monotonic()
    wait_until(lambda: writable(bob), 6, f"bob writable once the TTL ran out\n{bob.log()[-2000:]}")
    assert time.monotonic() - t0 < 5
    st = status(alice)
    assert lock_in(st) is None
    assert st["lock_events"][0]["kind"] == "expired" and st["lock_events"][0]["holder"] == "alice-pc", st
    assert mode(bob) == 0o644


def test_locking_a_stale_copy_is_refused(tmp_path: Path, net: HubNet | MosquittoNet,
                                         devices: list[Device]) -> None:
    (alice, bob), _v1 = space(tmp_path, net, devices)
    v2 = alice.write(FID, random_bytes(100_000))
    wait_synced(bob, FID, v2)
    wait_until(lambda: f"stored game/{FID} v2 " in net.log_text(), 20, "the coordinator to store v2")
    assert bob.stop() == 0
    bob.write(FID, b"offline edit, never published")
    r = run(bob, "lock", FID)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "current version" in r.stderr and "v2" in r.stderr, r.stderr
    assert lock_in(status(alice)) is None
    assert retained_lock(port_of(net.url)) in (None, b"")
    # the up-to-date device still gets the lock (named by its local path here)
    ok(run(alice, "lock", str(alice.path(FID))))
    assert holder(alice) == "alice-pc"

    # bob's agent comes back: his offline edit under alice's lock is kept aside, not published
    bob.start()
    wait_until(lambda: [c.read_bytes() for c in conflict_copies(bob)] == [b"offline edit, never published"], 10,
               f"bob's offline edit kept as a conflict copy\n{bob.log()[-2000:]}")
    wait_synced(bob, FID, v2, timeout=10)
    wait_read_only(bob)
    assert "published v3" not in bob.log() and f"game/{FID} v3" not in net.log_text()
    assert content_hash(alice.path(FID)) == v2


def test_lock_messages_from_anyone_but_the_coordinator_are_overruled(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    (alice, bob), _v1 = space(tmp_path, net, devices)
    port = port_of(net.url)
    probe = MqttProbe(port).connect()
    try:
        probe.subscribe(LOCK_TOPIC)

        def seen() -> list[bytes]:
            return [m.payload for m in probe.messages if m.topic == LOCK_TOPIC]

        def publish_and_wait_for_reassert(payload: bytes, expected: bytes) -> None:
            n = len(seen())
            probe.publish(LOCK_TOPIC, payload, retain=True)
            probe.wait_for(lambda _m: len(seen()) >= n + 2 and seen()[-1] == expected, timeout=5)
            assert retained_lock(port) in ((None, b"") if expected == b"" else (expected,))

        fake = {"file_id": FID, "holder": "mallory", "acquired_at": time.time(), "expires_at": None,
                "note": "mine now", "version": 1}
        before = {alice: mode(alice), bob: mode(bob)}

        # unlocked: a fake lock and garbage are answered with "unlocked" at once; no file changes mode
        publish_and_wait_for_reassert(json.dumps(fake).encode(), b"")
        publish_and_wait_for_reassert(b"\xff\x00not json{", b"")
        modes_hold(before, 0.6)
        assert "mallory" not in alice.log() + bob.log()

        # locked by alice: a fake lock for bob and garbage give way to alice's lock
        ok(run(alice, "lock", FID))
        wait_read_only(bob)
        real = seen()[-1]
        assert json.loads(real)["holder"] == "alice-pc"
        locked = {alice: mode(alice), bob: mode(bob)}
        publish_and_wait_for_reassert(json.dumps({**fake, "holder": "bob-laptop"}).encode(), real)
        publish_and_wait_for_reassert(b"garbage", real)
        publish_and_wait_for_reassert(b"", real)  # a fake unlock
        modes_hold(locked, 0.6)
        assert "this device" not in bob.log() and "unlocked" not in bob.log(), bob.log()[-2000:]
        assert "not published by the coordinator" in net.log_text()
        assert "malformed lock message" in net.log_text()
    finally:
        probe.close()

    # everyone keeps serving
    assert holder(bob) == "alice-pc"
    ok(run(alice, "unlock", FID))
    wait_mode(bob, before[bob])
    ok(run(bob, "lock", FID))
    wait_read_only(alice)
    ok(run(bob, "unlock", FID))
    wait_mode(alice, before[alice])

    # a file id the coordinator has never seen
    r = run(alice, "lock", "no/such-file.png")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no/such-file.png" in r.stderr and "no versions" in r.stderr, r.stderr


def test_lock_without_a_coordinator_or_a_broker(tmp_path: Path, mosquitto: MosquittoProc) -> None:
    alice = Device(tmp_path, "alice-pc", mosquitto.url, FILES)  # only a broker: no coordinator
    alice.write(FID, b"content")
    nobody = Device(tmp_path / "nobody", "alice-pc", f"mqtt://127.0.0.1:{free_port()}", FILES)
    nobody.write(FID, b"content")

    t0 = time.monotonic()
    no_coord, no_broker = popen(alice, "lock", FID), popen(nobody, "lock", FID)
    (_o, err), rc = no_coord.communicate(timeout=20), no_coord.returncode
    assert rc == 1 and time.monotonic() - t0 < 10, (rc, err)
    assert "coordinator" in err, err
    (_o, err), rc = no_broker.communicate(timeout=20), no_broker.returncode
    assert rc == 1 and time.monotonic() - t0 < 10, (rc, err)
    assert "cannot reach broker" in err, err
    assert retained_lock(mosquitto.port) in (None, b"")

    r = run(alice, "lock", FID, "--ttl", "banana")
    assert r.returncode == 2 and "banana" in r.stderr, (r.returncode, r.stderr)
