"""Which devices an agent asks for a version's blobs, and in which order (pure, no I/O)."""

from __future__ import annotations

from pathlib import Path

from agent.config import AgentConfig, FileEntry
from agent.sync import Engine
from schemas.messages import Presence, PresenceState
from schemas.mqtt import BrokerUrl


def engine(tmp_path: Path, online: dict[str, bool]) -> Engine:
    cfg = AgentConfig(source=tmp_path / "agent.yaml", device="me", space="game", broker=BrokerUrl("h", 1, False),
                      username=None, password=None, ca_file=None, state_dir=tmp_path / "state",
                      files=(FileEntry("x.png", tmp_path / "x.png"),), folders=(), keep_snapshots=1, settle_ms=300,
                      rescan_seconds=30)
    e = Engine(cfg)
    for name, up in online.items():
        e.presence[name] = Presence(device=name, state=PresenceState.ONLINE if up else PresenceState.OFFLINE, epoch=1)
    return e


def test_author_online_first_then_hub_then_other_online_devices(tmp_path: Path) -> None:
    e = engine(tmp_path, {"alice": True, "bob": True, "carol": False, "me": True})
    assert e.providers("alice") == ["dev:alice", "hub", "dev:bob"]


def test_offline_author_is_asked_last(tmp_path: Path) -> None:
    e = engine(tmp_path, {"alice": False, "bob": True})
    assert e.providers("alice") == ["hub", "dev:bob", "dev:alice"]


def test_restored_version_asks_the_coordinator_first(tmp_path: Path) -> None:
    e = engine(tmp_path, {"alice": True, "bob": True})
    assert e.providers("alice", hub_first=True) == ["hub", "dev:bob", "dev:alice"]


def test_never_asks_itself(tmp_path: Path) -> None:
    e = engine(tmp_path, {"me": True, "bob": True})
    assert "dev:me" not in e.providers("me") and "dev:me" not in e.providers("me", hub_first=True)
