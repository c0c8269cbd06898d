"""Conflicts without locks, with real processes: concurrent edits converge on one winner, nothing is lost.

Concurrent edits are made reproducibly by taking the broker down after a file has synced, writing
different content on each device while they cannot talk, and bringing the broker back: every agent
reconnects holding an unpublished edit of the same version.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import blake3
from brokers import REPO_ROOT, atrius_env
from e2e import Device, HubNet, MosquittoNet, content_hash, random_bytes, wait_synced, wait_until

FID = "lvl/scene.bin"
FILES = {FID: "Levels/scene.bin"}
NAMES = ("alice-pc", "bob-laptop", "carol-mac")


def content_hash_of(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atrius_cli", *args], cwd=REPO_ROOT, env=atrius_env(),
                          capture_output=True, text=True, timeout=timeout)


def versions(dev: Device) -> list[dict[str, object]]:
    r = cli("versions", FID, "--config", str(dev.config), "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert isinstance(listed, list)
    return listed


def conflict_copies(dev: Device, author: str = "*") -> list[Path]:
    p = dev.path(FID)
    return sorted(p.parent.glob(f"{p.stem}.conflict-{author}-*{p.suffix}"))


def chunk_store(net: HubNet | MosquittoNet, root: Path) -> Path:
    return root / ("hub-data" if isinstance(net, HubNet) else "coord-data") / "chunks"


def chunks_of(path: Path) -> list[str]:
    from agent.chunker import scan_file

    return [c.hash for c in scan_file(path).chunks]


def stored_from(net: HubNet | MosquittoNet, version: int, author: str) -> bool:
    return f"stored game/{FID} v{version} from {author} " in net.log_text()


def broker_down(net: HubNet | MosquittoNet) -> None:
    """Stop the broker only (the hub's coordinator goes with it; a separate coordinator stays up)."""
    if isinstance(net, MosquittoNet):
        net.broker.stop()
    else:
        net.stop()


def make(tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device], n: int) -> list[Device]:
    made = [Device(tmp_path, name, net.url, FILES) for name in NAMES[:n]]
    devices += made
    return made


def synced_everywhere(net: HubNet | MosquittoNet, devs: list[Device]) -> str:
    """v1 written on the first device, applied on all, stored by the coordinator; returns its hash."""
    v1 = devs[0].write(FID, random_bytes(20_000))
    for d in devs:
        d.start()
    for d in devs[1:]:
        wait_synced(d, FID, v1)
    wait_until(lambda: stored_from(net, 1, devs[0].name), 20, "the coordinator to store v1")
    return v1


def concurrent_edits(net: HubNet | MosquittoNet, devs: list[Device]) -> dict[str, bytes]:
    """Each device edits v1 while the broker is down; returns device -> its content."""
    broker_down(net)
    # Different sizes too, all under one chunk; distinct random bytes so the hashes decide nothing predictable.
    edits = {d.name: os.urandom(30_000 + 1000 * i) for i, d in enumerate(devs)}
    for d in devs:
        d.write(FID, edits[d.name])
    time.sleep(1.0)  # let every watcher see its edit while nothing can be published
    net.start()
    return edits


def converged(devs: list[Device], candidates: set[str]) -> str | None:
    hashes = {content_hash(d.path(FID)) for d in devs}
    if len(hashes) == 1:
        (h,) = hashes
        if h in candidates:
            return h
    return None


def test_simultaneous_edits_converge_and_the_loser_is_kept(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = make(tmp_path, net, devices, 2)
    v1 = synced_everywhere(net, [a, b])
    edits = concurrent_edits(net, [a, b])
    by_hash = {content_hash_of(data): name for name, data in edits.items()}

    wait_until(lambda: converged([a, b], set(by_hash)), 40,
               f"both devices to hold the same edit\n--- {a.name} ---\n{a.log()[-2000:]}\n"
               f"--- {b.name} ---\n{b.log()[-2000:]}")
    winner_hash = converged([a, b], set(by_hash))
    assert winner_hash is not None
    winner = by_hash[winner_hash]
    loser = a.name if winner == b.name else b.name
    loser_dev, winner_dev = (a, b) if loser == a.name else (b, a)
    loser_hash = content_hash_of(edits[loser])

    wait_until(lambda: conflict_copies(loser_dev), 20, f"a conflict copy on {loser}")
    copies = conflict_copies(loser_dev)
    assert len(copies) == 1, copies
    assert copies[0].name.startswith(f"scene.conflict-{loser}-") and copies[0].read_bytes() == edits[loser]
    assert not conflict_copies(winner_dev), "the winner must not keep a conflict copy"

    # Both edits are usually v2; one whose author saw the other arrive before publishing is v3
    # (still concurrent: its vector says so).
    def v2_entries() -> list[dict[str, object]]:
        return [v for v in versions(a) if v["version"] >= 2]

    wait_until(lambda: len(v2_entries()) == 2, 20, "both edits in the history", interval=0.3)
    listed = versions(b)
    assert [v["hash"] for v in listed if v["version"] == 1] == [v1]
    v2 = [v for v in listed if v["version"] >= 2]
    assert {v["hash"] for v in v2} == {winner_hash, loser_hash}
    lost = [v for v in v2 if v.get("kind") == "conflict"]
    assert len(lost) == 1, v2
    assert lost[0]["hash"] == loser_hash and lost[0]["author"] == loser
    [won] = [v for v in v2 if v.get("kind") != "conflict"]
    assert won["hash"] == winner_hash and won["author"] == winner

    # The coordinator keeps the losing content too: once stored, its chunks are on the hub's disk
    # even with the loser gone.
    wait_until(lambda: stored_from(net, int(lost[0]["version"]), loser), 20,  # type: ignore[call-overload]
               f"the coordinator to store {loser}'s edit")
    wait_until(lambda: stored_from(net, int(won["version"]), winner), 20,  # type: ignore[call-overload]
               f"the coordinator to store {winner}'s edit")
    loser_chunks = chunks_of(copies[0])
    loser_dev.kill()
    store = chunk_store(net, tmp_path)
    for digest in loser_chunks:
        blob = store / digest[:2] / digest[2:4] / digest
        assert blob.is_file(), f"chunk {digest[:12]} of {loser}'s edit missing from the coordinator's store"
        assert content_hash_of(blob.read_bytes()) == digest
    assert "Traceback" not in a.log() + b.log()


def test_three_devices_edit_at_once(tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]) -> None:
    devs = make(tmp_path, net, devices, 3)
    synced_everywhere(net, devs)
    edits = concurrent_edits(net, devs)
    by_hash = {content_hash_of(data): name for name, data in edits.items()}

    wait_until(lambda: converged(devs, set(by_hash)), 40,
               "all three devices to hold the same edit\n" + "\n".join(f"--- {d.name} ---\n{d.log()[-1500:]}"
                                                                        for d in devs))
    winner_hash = converged(devs, set(by_hash))
    assert winner_hash is not None
    winner = by_hash[winner_hash]
    losers = [d for d in devs if d.name != winner]
    for d in losers:
        wait_until(lambda d=d: conflict_copies(d), 20, f"a conflict copy on {d.name}")
    time.sleep(0.5)  # nothing more arrives late
    for d in devs:
        copies = conflict_copies(d)
        if d.name == winner:
            assert not copies, f"the winner {winner} kept a conflict copy: {copies}"
            continue
        assert len(copies) == 1, f"{d.name}: {copies}"
        assert copies[0].name.startswith(f"scene.conflict-{d.name}-")
        assert copies[0].read_bytes() == edits[d.name], f"{d.name}'s conflict copy is not its own edit"
    assert converged(devs, set(by_hash)) == winner_hash

    # (An edit usually becomes v2; one whose author saw another v2 arrive before publishing is v3:
    # still concurrent, as its vector says.)
    def conflicts() -> list[dict[str, object]]:
        return [v for v in versions(devs[0]) if v["version"] >= 2 and v.get("kind") == "conflict"]

    wait_until(lambda: len(conflicts()) == 2, 20, "two conflicts in the history", interval=0.3)
    listed = [v for v in versions(devs[1]) if v["version"] >= 2]
    assert len(listed) == 3, listed
    assert {(v["author"], v["hash"]) for v in listed if v.get("kind") == "conflict"} == {
        (d.name, content_hash_of(edits[d.name])) for d in losers}
    assert [(v["author"], v["hash"]) for v in listed if v.get("kind") != "conflict"] == [(winner, winner_hash)]


def test_offline_edit_meets_a_newer_published_version(
    tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]
) -> None:
    a, b = make(tmp_path, net, devices, 2)
    v1 = synced_everywhere(net, [a, b])
    assert b.stop() == 0
    va = a.write(FID, random_bytes(25_000))  # published while bob is away
    a.wait_log(r"published v2")
    wait_until(lambda: stored_from(net, 2, a.name), 20, "the coordinator to store alice's v2")
    bob_data = random_bytes(27_000)
    vb = b.write(FID, bob_data)  # edited on bob's disk while his agent is stopped
    b.start()
    wait_synced(b, FID, va)
    wait_until(lambda: conflict_copies(b), 10, "a conflict copy on bob")
    copies = conflict_copies(b)
    assert len(copies) == 1 and copies[0].name.startswith(f"scene.conflict-{b.name}-"), copies
    assert copies[0].read_bytes() == bob_data
    assert content_hash(a.path(FID)) == va and not conflict_copies(a)

    def bob_conflict() -> list[dict[str, object]]:
        return [v for v in versions(a) if v.get("kind") == "conflict"]

    wait_until(bob_conflict, 20, "bob's edit reported as a conflict", interval=0.3)
    [entry] = bob_conflict()
    assert entry["author"] == b.name and entry["hash"] == vb and entry["size"] == len(bob_data)
    edits = [(v["version"], v["author"], v["hash"]) for v in versions(b) if v.get("kind") != "conflict"]
    assert edits == [(2, a.name, va), (1, a.name, v1)]
    wait_until(lambda: re.search(rf"stored game/{re.escape(FID)} v\d+ from {b.name} ", net.log_text()), 20,
               "the coordinator to store bob's conflicting edit")
    time.sleep(0.5)
    assert content_hash(a.path(FID)) == va and content_hash(b.path(FID)) == va


