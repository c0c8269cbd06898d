"""Deleting a listed single file (not in a folder): synced as a deletion, kept in snapshots, blocked by a lock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from brokers import REPO_ROOT, atrius_env
from e2e import Device, HubNet, MosquittoNet, content_hash, random_bytes, wait_synced, wait_until

FID = "art/hero.png"
FILES = {FID: "Art/hero.png"}


def run(dev: Device, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "atrius_cli", *args, "--config", str(dev.config)], cwd=REPO_ROOT,
                          env=atrius_env(), capture_output=True, text=True, timeout=30)


def snapshots(dev: Device) -> list[Path]:
    return sorted(p for p in (dev.dir / ".atrius" / dev.name / "snapshots").rglob("*.png") if p.is_file())


def test_a_deleted_listed_file_is_deleted_everywhere_and_kept(
        tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]) -> None:
    a = Device(tmp_path, "alice-pc", net.url, FILES)
    b = Device(tmp_path, "bob-laptop", net.url, FILES)
    devices += [a, b]
    v1 = a.write(FID, random_bytes(150_000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)

    a.path(FID).unlink()
    wait_until(lambda: not b.path(FID).exists(), 15, f"the deletion on bob\n{a.log()[-2000:]}\n{b.log()[-2000:]}")
    assert [content_hash(p) for p in snapshots(b)] == [v1]  # bob's copy is kept, not destroyed
    b.wait_log(r"deleted by alice-pc \(v2\); the local copy is kept in the snapshots")
    versions = json.loads(run(a, "versions", FID, "--json").stdout)
    assert [(v["version"], v["deleted"]) for v in versions] == [(2, True), (1, False)]

    # Written again on bob: a new version that brings it back on alice.
    v3 = b.write(FID, random_bytes(90_000))
    wait_synced(a, FID, v3)
    assert json.loads(run(a, "versions", FID, "--json").stdout)[0]["version"] == 3


def test_a_deletion_under_someone_elses_lock_is_undone(
        tmp_path: Path, net: HubNet | MosquittoNet, devices: list[Device]) -> None:
    a = Device(tmp_path, "alice-pc", net.url, FILES)
    b = Device(tmp_path, "bob-laptop", net.url, FILES)
    devices += [a, b]
    v1 = a.write(FID, random_bytes(120_000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    wait_until(lambda: "stored game/art/hero.png v1" in net.log_text(), 20, "the coordinator to store v1")
    r = run(a, "lock", FID)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not (b.path(FID).stat().st_mode & 0o222), 10, "read-only on bob")

    b.path(FID).unlink()  # (deleting needs only the folder's write permission)
    b.wait_log(r"deleted while alice-pc holds the lock; the deletion is not published", timeout=15)
    wait_synced(b, FID, v1)  # it comes back
    wait_until(lambda: not (b.path(FID).stat().st_mode & 0o222), 10, "read-only again on bob")
    assert a.path(FID).exists() and content_hash(a.path(FID)) == v1
    versions = json.loads(run(a, "versions", FID, "--json").stdout)
    assert [v["version"] for v in versions] == [1]
