"""Local-side behaviour of a real agent: writes that are still going on, files that cannot be read."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from e2e import Device, HubNet, content_hash, random_bytes, wait_synced, wait_until

FID = "scene/level1.scene"
OTHER = "art/other.png"
FILES = {FID: "Levels/level1.scene", OTHER: "Art/other.png"}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubNet]:
    n = HubNet(tmp_path)
    n.start()
    yield n
    n.stop()


@pytest.fixture
def pair(tmp_path: Path, hub: HubNet) -> Iterator[tuple[Device, Device]]:
    a = Device(tmp_path, "alice-pc", hub.url, FILES, extra="settle_ms: 400\n")
    b = Device(tmp_path, "bob-laptop", hub.url, FILES)
    yield a, b
    for d in (a, b):
        if d.proc.running:
            d.stop()


def test_file_still_being_written_is_not_sent(pair: tuple[Device, Device]) -> None:
    a, b = pair
    a.start()
    b.start()
    path = a.path(FID)
    path.parent.mkdir(parents=True, exist_ok=True)
    h = blake3.blake3()
    with open(path, "wb") as fh:  # a slow exporter: keeps the file open, writes every 100 ms
        for _ in range(15):
            block = random_bytes(64 * 1024)
            fh.write(block)
            fh.flush()
            h.update(block)
            time.sleep(0.1)
        assert "published" not in a.log(), "a version was sent while the file was still being written"
    wait_synced(b, FID, h.hexdigest())
    assert len(re.findall(r"scene/level1.scene: published", a.log())) == 1


def test_unreadable_file_reported_once_and_others_keep_syncing(pair: tuple[Device, Device]) -> None:
    a, b = pair
    v1 = a.write(FID, random_bytes(5000))
    a.start()
    b.start()
    wait_synced(b, FID, v1)
    path = a.path(FID)
    path.unlink()
    path.mkdir()  # the listed path is now a folder: it cannot be read as a file
    (path / "junk").write_bytes(b"x")
    wait_until(lambda: "is not a regular file" in a.log(), 10, "a clear error for the unreadable path")
    other = a.write(OTHER, random_bytes(3000))
    wait_synced(b, OTHER, other)
    time.sleep(3.5)  # past one retry
    assert a.log().count("is not a regular file") == 1, "the same error must be logged once, not every retry"
    assert content_hash(b.path(FID)) == v1, "nothing already on disk is damaged"
    shutil.rmtree(path)
    v2 = a.write(FID, random_bytes(6000))
    wait_synced(b, FID, v2)
    assert a.proc.running and "Traceback" not in a.log()


def test_fifo_at_listed_path_does_not_hang_the_agent(pair: tuple[Device, Device]) -> None:
    a, b = pair
    a.path(FID).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(a.path(FID))
    a.start()
    b.start()
    wait_until(lambda: "is not a regular file" in a.log(), 10, "a clear error for the FIFO")
    other = a.write(OTHER, random_bytes(3000))
    wait_synced(b, OTHER, other)
