"""The coordinator's lock book and device registry on disk: persistence, bounded history, bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from brokers import small_disk

from broker.locks import MAX_EVENTS, LockBook
from broker.registry import DeviceRegistry
from schemas.messages import LockEvent, LockEventKind, LockState, Presence, PresenceState

FID = "art/hero.png"


def lock(holder: str = "alice", t: float = 100.0) -> LockState:
    return LockState(file_id=FID, holder=holder, acquired_at=t, expires_at=None, note="painting", version=3)


def event(kind: LockEventKind, t: float, holder: str = "alice", by: str | None = "alice") -> LockEvent:
    return LockEvent(file_id=FID, kind=kind, holder=holder, by=by, time=t)


def test_locks_and_events_survive_a_reopen(tmp_path: Path) -> None:
    book = LockBook(tmp_path)
    book.set("game", FID, lock(), event(LockEventKind.TAKEN, 100))
    book.set("other", "a.txt", lock().model_copy(update={"file_id": "a.txt"}), None)
    again = LockBook(tmp_path)
    assert again.get("game", FID) == lock()
    assert again.get("game", "a.txt") is None  # spaces do not mix
    assert again.get("other", "a.txt") is not None
    assert [e.kind for e in again.events("game", 10)] == [LockEventKind.TAKEN]
    assert again.spaces() == ["game", "other"]


def test_release_and_force_are_recorded_newest_first(tmp_path: Path) -> None:
    book = LockBook(tmp_path)
    book.set("game", FID, lock(), event(LockEventKind.TAKEN, 1))
    book.set("game", FID, None, event(LockEventKind.FORCED, 2, holder="alice", by="bob"))
    assert book.get("game", FID) is None and book.locks("game") == []
    events = LockBook(tmp_path).events("game", 10)
    assert [(e.kind, e.by) for e in events] == [(LockEventKind.FORCED, "bob"), (LockEventKind.TAKEN, "alice")]


def test_event_history_is_bounded(tmp_path: Path) -> None:
    book = LockBook(tmp_path)
    for i in range(MAX_EVENTS + 25):
        book.set("game", FID, None, event(LockEventKind.RELEASED, float(i)))
    raw = json.loads((tmp_path / "locks" / "game.json").read_text())
    assert len(raw["events"]) == MAX_EVENTS
    assert book.events("game", 1)[0].time == float(MAX_EVENTS + 24)


def test_corrupt_lock_book_is_moved_aside_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "game.json").write_text('{"locks": {"x": {"holder": 1}}')
    book = LockBook(tmp_path)
    assert book.locks("game") == []
    assert any(p.name.startswith("game.corrupt-") for p in (tmp_path / "locks").iterdir())
    assert "unreadable" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_changes_nothing(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "64k") as disk:
        book = LockBook(disk)
        book.set("game", FID, lock(), event(LockEventKind.TAKEN, 1))
        fd = os.open(disk / "fill", os.O_WRONLY | os.O_CREAT)
        try:  # fill the rest of the disk
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        big = LockEvent(file_id=FID, kind=LockEventKind.RELEASED, holder="alice", time=2, note="n" * 500)
        with pytest.raises(OSError):
            for _ in range(200):
                book.set("game", FID, None, big)
        assert book.get("game", FID) == lock()  # the failed change left the lock as it was
        assert LockBook(disk).get("game", FID) == lock()


def presence(state: PresenceState, epoch: int, since: float = 50.0) -> Presence:
    return Presence(device="bob", state=state, epoch=epoch, since=since, host="bobs-mac", agent_version="0.1")


def test_registry_last_seen_and_stale_will(tmp_path: Path) -> None:
    reg = DeviceRegistry(tmp_path)
    assert reg.update("game", presence(PresenceState.ONLINE, 10), now=100)
    assert reg.online("game") == ["bob"]
    assert not reg.update("game", presence(PresenceState.OFFLINE, 9), now=110)  # a late Last Will
    assert reg.online("game") == ["bob"]
    assert reg.update("game", presence(PresenceState.OFFLINE, 10), now=120)
    [rec] = reg.records("game", now=200)
    assert rec.state is PresenceState.OFFLINE and rec.last_seen == 120 and rec.host == "bobs-mac"
    # A restart keeps when it was last seen; a replayed retained "offline" does not move it.
    again = DeviceRegistry(tmp_path)
    assert again.update("game", presence(PresenceState.OFFLINE, 10), now=300)
    assert again.records("game", now=400)[0].last_seen == 120
    again.update("game", presence(PresenceState.ONLINE, 11), now=500)
    assert again.records("game", now=600)[0].last_seen == 600  # online: seen now


def test_registry_forgets_a_cleared_device_and_survives_garbage(tmp_path: Path) -> None:
    reg = DeviceRegistry(tmp_path)
    reg.update("game", presence(PresenceState.ONLINE, 1), now=1)
    reg.forget("game", "bob")
    assert DeviceRegistry(tmp_path).records("game") == []
    (tmp_path / "devices.json").write_text("[not json")
    assert DeviceRegistry(tmp_path).records("game") == []
