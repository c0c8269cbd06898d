"""Shared fixtures: real brokers on free ports (helpers live in tests/brokers.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
for _path in (str(_TESTS.parent), str(_TESTS)):  # the repo root (for schemas, agent, broker) and tests/
    if _path not in sys.path:
        sys.path.insert(0, _path)

from brokers import MosquittoProc, ServerProc, broker_proc, free_port, require_mosquitto  # noqa: E402
from e2e import Device, HubNet, MosquittoNet  # noqa: E402


@pytest.fixture(params=["hub", "mosquitto"])
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubNet | MosquittoNet]:
    """A space's broker and coordinator: ``atrius hub``, or a private Mosquitto + ``atrius coordinator``."""
    n: HubNet | MosquittoNet
    n = HubNet(tmp_path) if request.param == "hub" else MosquittoNet(tmp_path, require_mosquitto())
    n.start()
    try:
        yield n
    finally:
        if isinstance(n, MosquittoNet):
            n.close()
        else:
            n.stop()


@pytest.fixture
def devices() -> Iterator[list[Device]]:
    """Agent devices a test makes; every one still running is stopped afterwards."""
    made: list[Device] = []
    yield made
    for d in made:
        if d.proc.running:
            d.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProc]:
    """A private Mosquitto (no persistence); fails in CI and skips elsewhere when it is not installed."""
    proc = MosquittoProc(tmp_path / "mosquitto", binary=require_mosquitto()).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[ServerProc]:
    """`atrius broker` (embedded amqtt) as a subprocess on a free port, listening."""
    proc = broker_proc(free_port(), log_path=tmp_path / "broker.log").start()
    try:
        yield proc
    finally:
        proc.stop()
