"""End-to-end helpers: a space of real agent processes in their own folders over a real broker."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import blake3
from brokers import AtriusProc, MosquittoProc, ServerProc, agent_proc, free_port, hub_proc


def content_hash(path: Path) -> str | None:
    try:
        return blake3.blake3(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Net(Protocol):
    kind: str

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...


class HubNet:
    """`atrius hub`: embedded amqtt broker + coordinator in one process."""

    kind = "hub"

    def __init__(self, root: Path) -> None:
        self.proc: ServerProc = hub_proc(free_port(), root / "hub-data", log_path=root / "hub.log")

    @property
    def url(self) -> str:
        return self.proc.url

    def start(self) -> None:
        self.proc.start()

    def stop(self) -> None:
        self.proc.stop()

    def kill(self) -> None:
        self.proc.kill()

    def log_text(self) -> str:
        return self.proc.log_text()


class MosquittoNet:
    """A private Mosquitto plus `atrius coordinator` against it."""

    kind = "mosquitto"

    def __init__(self, root: Path, binary: str) -> None:
        self.broker = MosquittoProc(root / "mosquitto", binary=binary)
        self.coord = AtriusProc(
            ["coordinator", "--broker", self.broker.url, "--data", str(root / "coord-data")],
            log_path=root / "coordinator.log", name="coordinator",
        )

    @property
    def url(self) -> str:
        return self.broker.url

    def start(self) -> None:
        self.broker.start()
        if not self.coord.running:
            self.coord.start()

    def stop(self) -> None:
        self.broker.stop()

    def kill(self) -> None:
        self.broker.kill()

    def close(self) -> None:
        if self.coord.running:
            self.coord.stop()
        self.broker.stop()

    def log_text(self) -> str:
        return self.coord.log_text()


class Device:
    """One agent process with its own folder and config."""

    def __init__(self, root: Path, name: str, url: str, files: dict[str, str], *, space: str = "game",
                 extra: str = "") -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        entries = "".join(f"  - path: {rel}\n    id: {fid}\n" for fid, rel in files.items())
        self.config = self.dir / "agent.yaml"
        self.config.write_text(
            f"device: {name}\nspace: {space}\nbroker:\n  url: {url}\n{extra}files:\n{entries}"
        )
        self.files = files
        self.proc: AtriusProc = agent_proc(self.config, log_path=root / f"{name}.log")
        self._starts = 0

    def path(self, file_id: str) -> Path:
        return self.dir / self.files[file_id]

    def write(self, file_id: str, data: bytes) -> str:
        p = self.path(file_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(data)
        return blake3.blake3(data).hexdigest()

    def start(self, wait: bool = True) -> Device:
        self.proc.start()
        self._starts += 1
        if wait:
            self.wait_log(r"connected to", count=self._starts, timeout=20)
            time.sleep(1.0)  # retained grace: let the start-up reconcile run
        return self

    def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 20) -> None:
        import re

        rx = re.compile(pattern)
        wait_until(lambda: len(rx.findall(self.proc.log_text())) >= count, timeout,
                   f"{count}x {pattern!r} in {self.name}'s log:\n{self.proc.log_text()[-3000:]}")

    def log(self) -> str:
        return self.proc.log_text()

    def stop(self) -> int:
        return self.proc.stop()

    def kill(self) -> int:
        return self.proc.kill()

    def temp_files(self) -> list[str]:
        return [p.name for p in self.dir.rglob("*") if ".atrius-" in p.name and p.name.endswith(".tmp")]


def wait_synced(dev: Device, file_id: str, digest: str, timeout: float = 30) -> None:
    wait_until(lambda: content_hash(dev.path(file_id)) == digest, timeout,
               f"{file_id} on {dev.name} to have {digest[:12]}\n--- log ---\n{dev.log()[-3000:]}")


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
