"""A device joining a big space gets every file even when the broker's retained heads do not reach it.

Mosquitto queues at most ``max_queued_messages`` messages per client and drops the rest of a burst
for a client that reads slower than the broker sends (seen with 10,000 files: ~1,000 heads arrive).
The agent catches up from the coordinator (the ``heads`` request, a page at a time, on a connection
of its own) and ``atrius status`` lists every file the same way.  Here the broker's retained heads are
removed outright before the device joins: only the catch-up can bring the files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from brokers import REPO_ROOT, AtriusProc, MosquittoProc, MqttProbe, atrius_env, require_mosquitto
from e2e import Device, content_hash, random_bytes, wait_until

N = 300


@pytest.fixture
def tight_broker(tmp_path: Path) -> Iterator[tuple[MosquittoProc, AtriusProc]]:
    broker = MosquittoProc(tmp_path / "mosquitto", binary=require_mosquitto()).start()
    coord = AtriusProc(["coordinator", "--broker", broker.url, "--data", str(tmp_path / "coord")],
                       log_path=tmp_path / "coordinator.log", name="coordinator").start()
    try:
        yield broker, coord
    finally:
        coord.stop()
        broker.stop()


def folder_device(root: Path, name: str, url: str) -> Device:
    dev = Device(root, name, url, {})
    dev.config.write_text(f"device: {name}\nspace: game\nbroker:\n  url: {url}\n"
                          "folders:\n  - path: Tex\n    id: tex\n")
    return dev


def test_a_late_device_gets_every_file_of_a_big_folder(
        tmp_path: Path, tight_broker: tuple[MosquittoProc, AtriusProc], devices: list[Device]) -> None:
    broker, coord = tight_broker
    a = folder_device(tmp_path, "alice-pc", broker.url)
    b = folder_device(tmp_path, "bob-laptop", broker.url)
    devices += [a, b]
    want = {}
    for i in range(N):
        rel = f"d{i % 15}/f{i}.png"
        (a.dir / "Tex" / rel).parent.mkdir(parents=True, exist_ok=True)
        data = random_bytes(1000 + i)
        (a.dir / "Tex" / rel).write_bytes(data)
        want[rel] = content_hash(a.dir / "Tex" / rel)
    a.start()
    wait_until(lambda: coord.log_text().count("recorded game/tex/") >= N + 15, 60,
               f"the coordinator to record every head\n{coord.log_text()[-2000:]}", interval=0.2)

    a.stop()
    probe = MqttProbe(broker.port, client_id="clear-heads").connect()
    try:  # the broker loses every retained head (as a cut-short burst would, for a joining device)
        for rel in want:
            probe.publish(f"atrius/v1/game/files/{quote('tex/' + rel, safe='')}/head", b"", retain=True)
        for d in range(15):
            probe.publish(f"atrius/v1/game/files/{quote(f'tex/d{d}', safe='')}/head", b"", retain=True)
    finally:
        probe.close()
    a.start()  # (the author is there to serve the chunks; its own start-up must not need the broker's heads)

    b.start(wait=False)
    got = lambda: sum(content_hash(b.dir / "Tex" / rel) == h for rel, h in want.items())  # noqa: E731
    wait_until(lambda: got() == N, 90, f"all {N} files on bob (has {got()})\n{b.log()[-3000:]}", interval=0.5)
    for dev in (a, b):  # every device learnt the heads from the coordinator: none re-published
        assert "re-publishing" not in dev.log(), dev.log()[-2000:]

    def status_files() -> dict[str, dict[str, object]]:
        r = subprocess.run([sys.executable, "-m", "atrius_cli", "status", "--json", "--config", str(b.config)],
                           cwd=REPO_ROOT, env=atrius_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return {f["file_id"]: f for f in json.loads(r.stdout)["files"]}

    files = status_files()
    assert sum(fid.startswith("tex/") for fid in files) == N
    # (right after the transfer bob may still show files as receiving or sending for a moment)
    wait_until(lambda: all(f["local"] == "in sync" for f in status_files().values()), 30,
               "status to show every file in sync", interval=1.0)
