"""The terminal UI without a network: SpaceView folded from scripted state events (injected times),
the screen rendered headlessly by rich, the plain (non-terminal) mode of Screen, SVG export and the
logging bridge."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import re
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from agent.events import (
    ConflictSeen,
    Connection,
    DevicesKnown,
    Direction,
    Event,
    HeadSeen,
    Level,
    LocalChanged,
    LocalState,
    LockHistory,
    LockSeen,
    LogBridge,
    LogLine,
    PresenceSeen,
    QueueSink,
    TransferProgress,
)
from agent.ui import Screen, export_svg, plain_snapshot, render
from agent.view import LINGER, SpaceView
from schemas.messages import (
    EMPTY_HASH,
    DeviceRecord,
    EntryKind,
    Head,
    LockEvent,
    LockEventKind,
    LockState,
    Presence,
    PresenceState,
)

ME, BOB, CAROL = "alice-pc", "bob-laptop", "carol-mac"
HERO, ROCK, LEVEL = "art/hero.png", "textures/env/rock.png", "scenes/level1.scn"
BROKER = "mqtt://127.0.0.1:1883"
MIB = 1 << 20
T0 = 1000.0
"""Monotonic time the scripted streams start at."""
NOW = 1_800_000_000.0
"""Wall-clock time the scripted screens are drawn at."""


# -- building events -------------------------------------------------------------------------------------
def digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def head(file_id: str, version: int, author: str = BOB, size: int = 100, **kw: object) -> Head:
    if kw.get("deleted"):
        return Head(file_id=file_id, hash=EMPTY_HASH, size=0, version=version, author=author, **kw)
    h = digest(file_id, version, author, size)
    return Head(file_id=file_id, hash=h, size=size, version=version, author=author,
                chunks=1 if size else 0, manifest=[h] if size else [], **kw)


def presence(device: str, online: bool = True, epoch: int = 1, host: str = "", **kw: object) -> Presence:
    return Presence(device=device, state=PresenceState.ONLINE if online else PresenceState.OFFLINE, epoch=epoch,
                    host=host, **kw)


def lock(file_id: str, holder: str, **kw: object) -> LockState:
    return LockState(file_id=file_id, holder=holder, acquired_at=NOW - 60, **kw)


def lock_event(file_id: str, kind: LockEventKind, holder: str, t: float, by: str | None = None) -> LockEvent:
    return LockEvent(file_id=file_id, kind=kind, holder=holder, by=by, time=t)


def feed(view: SpaceView, events: list[Event], now: float = T0) -> None:
    for ev in events:
        view.apply(ev, now=now)


def texts(view: SpaceView) -> list[str]:
    return [line.text for line in view.log]


def screen_text(view: SpaceView, *, width: int = 120, height: int = 40, mono: float = T0 + 2) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO())
    console.print(render(view, height, now=NOW, mono=mono))
    return console.export_text()


def line_with(text: str, *needles: str) -> str:
    found = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
    assert found, f"no line with {needles!r} in:\n{text}"
    return found[0]


def studio(*, agent: bool = False) -> SpaceView:
    """Three devices (one offline), three files (one in a folder, one locked by bob), and this
    device (alice) receiving rock.png from bob (two progress samples) and sending level1.scn."""
    view = SpaceView("game", ME, broker=BROKER, agent=agent)
    feed(view, [
        Connection(True, BROKER),
        PresenceSeen(presence(ME, epoch=7, host="ws-alice", since=NOW - 3600), initial=True),
        PresenceSeen(presence(BOB, epoch=3, host="ws-bob", since=NOW - 600), initial=True),
        PresenceSeen(presence(CAROL, online=False, epoch=2, host="ws-carol"), initial=True),
        DevicesKnown((DeviceRecord(device=CAROL, state=PresenceState.OFFLINE, last_seen=NOW - 300, host="ws-carol"),)),
        HeadSeen(head(HERO, 3, BOB, 2048), initial=True),
        HeadSeen(head(ROCK, 7, ME, 5 * MIB), initial=True),
        HeadSeen(head(LEVEL, 1, CAROL, 300), initial=True),
        HeadSeen(Head(file_id="textures/env", hash=EMPTY_HASH, size=0, version=1, author=ME, kind=EntryKind.DIR),
                 initial=True),
        LockSeen(HERO, lock(HERO, BOB), initial=True),
        LocalChanged(HERO, LocalState.IN_SYNC, "/w/Art/hero.png"),
        LocalChanged(ROCK, LocalState.BEHIND, "/w/Tex/env/rock.png"),
        LocalChanged(LEVEL, LocalState.IN_SYNC, "/w/Scenes/level1.scn"),
    ])
    view.apply(TransferProgress(ROCK, Direction.IN, 1 * MIB, 5 * MIB, peer=BOB), now=T0)
    view.apply(TransferProgress(ROCK, Direction.IN, 3 * MIB, 5 * MIB, peer=BOB), now=T0 + 2)
    view.apply(TransferProgress(LEVEL, Direction.OUT, 100, 300), now=T0 + 2)
    return view


# -- (a) the screen, rendered headlessly ------------------------------------------------------------------
def test_render_shows_devices_files_locks_and_transfers() -> None:
    view = studio()
    out = screen_text(view)

    top = out.splitlines()[0]
    assert re.search(r"Atrius\s+game\b", top) and BROKER in top and f"on {ME}" in top and "● connected" in top, top
    assert "2/3 online" in top and "3 files" in top and "2 transfers" in top, top
    # devices: online ones with ●, the offline one with ○ and the last-seen time from the registry
    assert re.search(rf"●\s+{ME}\s+ws-alice\s+on since", out), out
    assert re.search(rf"●\s+{BOB}\s+ws-bob\s+on since", out), out
    assert re.search(rf"○\s+{CAROL}\s+ws-carol\s+off, seen 5 min ago", out), out
    assert not re.search(rf"●\s+{CAROL}", out) and not re.search(rf"○\s+{BOB}", out)
    # files: id, version, size, author, lock and the local state; the folder entry is not a row
    hero = line_with(out, HERO, "v3")
    assert "2.0 KiB" in hero and f"🔒 {BOB}" in hero and "read-only" in hero, hero
    rock = line_with(out, ROCK, "v7")
    assert "5.0 MiB" in rock and ME in rock and "receiving" in rock and "🔒" not in rock, rock
    level = line_with(out, LEVEL, "v1")
    assert "300 B" in level and CAROL in level and "sending" in level, level
    assert not re.search(r"textures/env\s+v1", out)
    # live transfers: 3 of 5 MiB, 2 MiB in the last 2 s: 60 %, 1 MiB/s, 2 s to go
    incoming = line_with(out, f"↓ {ME}", "60%")
    assert "1.0 MiB/s" in incoming and "0:02" in incoming, incoming
    outgoing = line_with(out, f"↑ {ME}", "33%")
    assert "--:--" in outgoing, outgoing  # one sample: no rate, no ETA yet
    assert "connected to " + BROKER in out  # the event log


def test_render_local_states_follow_transfers_and_locks() -> None:
    view = studio()
    rows = {r.file_id: r for r in view.file_rows()}
    assert view.local_of(rows[HERO]) is LocalState.READ_ONLY
    assert view.local_of(rows[ROCK]) is LocalState.RECEIVING
    assert view.local_of(rows[LEVEL]) is LocalState.SENDING

    view.apply(TransferProgress(ROCK, Direction.IN, 5 * MIB, 5 * MIB, peer=BOB, finished=True), now=T0 + 3)
    view.apply(LocalChanged(ROCK, LocalState.IN_SYNC), now=T0 + 3)
    view.apply(LockSeen(HERO, lock(HERO, ME)), now=T0 + 3)  # my own lock: writable here
    view.apply(LockSeen(LEVEL, lock(LEVEL, BOB)), now=T0 + 4)  # locked while sending: still "sending"
    assert view.local_of(rows[ROCK]) is LocalState.IN_SYNC
    assert view.local_of(rows[HERO]) is LocalState.IN_SYNC
    assert view.local_of(rows[LEVEL]) is LocalState.SENDING

    out = screen_text(view, mono=T0 + 4)
    assert "done" in line_with(out, f"↓ {ME}", "100%")
    assert f"🔒 {ME}" in line_with(out, HERO, "v3")
    # a file touched last comes first in the files panel
    assert [r.file_id for r in view.file_rows()][:2] == [LEVEL, HERO]


def test_render_failed_and_unknown_size_transfers() -> None:
    view = studio()
    view.apply(TransferProgress(ROCK, Direction.IN, 4 * MIB, 5 * MIB, peer=BOB, finished=True, ok=False), now=T0 + 3)
    # bob's own transfers are known only from his presence: no bytes (no percentage, rate or ETA)
    view.apply(PresenceSeen(presence(BOB, epoch=3, host="ws-bob", since=NOW - 600, sending=[HERO],
                                     receiving=["audio/new.ogg"])), now=T0 + 3)
    out = screen_text(view, mono=T0 + 3)
    assert "failed" in line_with(out, f"↓ {ME}", ROCK[:10])
    for row in (line_with(out, f"↑ {BOB}", HERO), line_with(out, f"↓ {BOB}", "audio/new.ogg")):
        assert "%" not in row.split("│")[-2] and "/s" not in row, row
    assert view.devices[BOB].sending == (HERO,) and view.devices[BOB].receiving == ("audio/new.ogg",)
    wide = screen_text(view, width=180, mono=T0 + 3)  # (at 120 columns the status column cuts the marks)
    assert re.search(rf"●\s+{BOB}\s+ws-bob\s+on since \S+ ↑1 ↓1", wide), wide


# -- (b) narration (watch-only view) -------------------------------------------------------------------------
def test_initial_state_is_not_news() -> None:
    view = SpaceView("game", ME, broker=BROKER)
    feed(view, [
        PresenceSeen(presence(BOB, epoch=3), initial=True),
        PresenceSeen(presence(CAROL, online=False, epoch=2), initial=True),
        HeadSeen(head(HERO, 2), initial=True),
        LockSeen(HERO, lock(HERO, BOB), initial=True),
        LockHistory((lock_event(HERO, LockEventKind.FORCED, CAROL, 50.0, by=BOB),)),
    ])
    assert texts(view) == []
    assert view.totals.versions == 0 and view.totals.locks == 0
    hero = view.files[HERO]
    assert hero.head is not None and hero.head.version == 2
    assert hero.lock is not None and hero.changed == 0.0
    assert view.devices[BOB].online and not view.devices[CAROL].online
    assert view.devices[CAROL].last_seen is None  # offline before the view opened: not "seen just now"


def test_narrates_versions_deletions_restores_and_moves() -> None:
    view = SpaceView("game", ME, broker=BROKER)
    view.apply(HeadSeen(head(HERO, 1), initial=True), now=T0)
    view.apply(HeadSeen(head(HERO, 2, size=3 * MIB)), now=T0 + 1)
    assert texts(view)[-1] == f"{HERO}: new version v2 from {BOB} (3.0 MiB)"
    assert view.files[HERO].changed == T0 + 1

    # older and repeated heads are ignored (the broker may send a retained head twice)
    view.apply(HeadSeen(head(HERO, 1)), now=T0 + 2)
    view.apply(HeadSeen(head(HERO, 2, size=3 * MIB)), now=T0 + 2)
    shown = view.files[HERO].head
    assert shown is not None and shown.version == 2
    assert len(view.log) == 1 and view.totals.versions == 1

    feed(view, [
        HeadSeen(head(LEVEL, 1, CAROL, 300)),
        HeadSeen(head(HERO, 3, CAROL, deleted=True)),
        HeadSeen(head(HERO, 4, ME, size=3 * MIB, restored_from=2)),
        # a rename: the old id's deletion says moved_to (not told), the new id's head moved_from
        HeadSeen(head("art/old.png", 2, BOB, deleted=True, moved_to="art/new.png")),
        HeadSeen(head("art/new.png", 1, BOB, 700, moved_from="art/old.png")),
        HeadSeen(Head(file_id="textures", hash=EMPTY_HASH, size=0, version=1, author=BOB, kind=EntryKind.DIR)),
    ], now=T0 + 3)
    assert texts(view)[1:] == [
        f"{LEVEL}: new file v1 from {CAROL} (300 B)",
        f"{HERO}: deleted by {CAROL} (v3)",
        f"{HERO}: v2 restored by {ME} as v4",
        f"art/new.png: moved from art/old.png by {BOB} (v1)",
    ]
    assert "textures" not in view.files  # folder entries are not rows
    assert view.totals.versions == 6


def test_narrates_locks_and_conflicts() -> None:
    view = SpaceView("game", ME, broker=BROKER)
    view.apply(HeadSeen(head(HERO, 1), initial=True), now=T0)
    expires = time.time() + 3600
    view.apply(LockSeen(HERO, lock(HERO, BOB, note="retopo", expires_at=expires)), now=T0 + 1)
    until = time.strftime("%H:%M:%S", time.localtime(expires))
    assert texts(view) == [f'{HERO}: locked by {BOB} until {until} ("retopo")']
    view.apply(LockSeen(HERO, lock(HERO, BOB, note="retopo", expires_at=expires)), now=T0 + 2)  # the same again
    view.apply(LockSeen(HERO, None), now=T0 + 3)
    view.apply(LockSeen(HERO, None), now=T0 + 4)
    view.apply(LockSeen(LEVEL, lock(LEVEL, CAROL)), now=T0 + 5)
    assert texts(view)[1:] == [f"{HERO}: unlocked (was {BOB}'s)", f"{LEVEL}: locked by {CAROL}"]
    assert view.totals.locks == 2

    view.apply(ConflictSeen(head(HERO, 2, CAROL)), now=T0 + 6)
    last = view.log[-1]
    assert last.level is Level.WARNING and view.totals.conflicts == 1
    assert last.text == (f"{HERO}: conflict: {CAROL}'s edit lost to a concurrent version; "
                         f"kept as a conflict copy on {CAROL}")

    # this device's own copy turns into a conflict (a copy was kept beside it): told once, as news only
    view.apply(LocalChanged(LEVEL, LocalState.CONFLICT), now=T0 + 7)  # found so on opening: not news
    view.apply(LocalChanged(HERO, LocalState.IN_SYNC), now=T0 + 7)
    view.apply(LocalChanged(HERO, LocalState.CONFLICT), now=T0 + 8)
    view.apply(LocalChanged(HERO, LocalState.CONFLICT), now=T0 + 9)
    assert texts(view)[4:] == [f"{HERO}: a conflict copy is beside {ME}'s file"]
    assert view.log[-1].level is Level.WARNING and view.totals.conflicts == 2
    assert view.files[HERO].changed == T0 + 8 and view.local_of(view.files[HERO]) is LocalState.CONFLICT

    agent = SpaceView("game", ME, agent=True)  # the agent counts it; its own log tells where the copy is
    feed(agent, [LocalChanged(HERO, LocalState.IN_SYNC), LocalChanged(HERO, LocalState.CONFLICT)])
    assert agent.totals.conflicts == 1 and texts(agent) == []


def test_lock_history_first_batch_is_history_later_forced_and_expired_are_told() -> None:
    view = SpaceView("game", ME, broker=BROKER)
    old = (lock_event(HERO, LockEventKind.FORCED, BOB, 90.0, by=CAROL),
           lock_event(HERO, LockEventKind.TAKEN, BOB, 80.0))
    view.apply(LockHistory(old), now=T0)
    assert texts(view) == []

    newer = (lock_event(LEVEL, LockEventKind.EXPIRED, CAROL, 201.0),
             lock_event(HERO, LockEventKind.FORCED, BOB, 200.0, by=CAROL),
             lock_event(HERO, LockEventKind.TAKEN, BOB, 150.0),
             *old)
    view.apply(LockHistory(newer), now=T0 + 5)
    assert texts(view) == [f"{HERO}: {CAROL} forced {BOB}'s lock open", f"{LEVEL}: {CAROL}'s lock expired"]
    assert view.log[0].level is Level.WARNING
    view.apply(LockHistory(newer), now=T0 + 10)  # asked again: nothing new
    assert len(view.log) == 2


def test_lock_history_after_an_empty_first_batch_tells_a_forced_unlock() -> None:
    view = SpaceView("game", ME, broker=BROKER)
    view.apply(LockHistory(()), now=T0)  # the coordinator's first answer: no lock events yet
    view.apply(LockHistory((lock_event(HERO, LockEventKind.FORCED, BOB, 200.0, by=CAROL),
                            lock_event(HERO, LockEventKind.TAKEN, BOB, 199.0))), now=T0 + 5)
    assert texts(view) == [f"{HERO}: {CAROL} forced {BOB}'s lock open"]


def test_narrates_presence_transitions_and_ignores_older_epochs() -> None:
    view = SpaceView("game", ME, broker=BROKER)
    view.apply(PresenceSeen(presence(BOB, epoch=3, host="ws-bob"), initial=True), now=T0)
    view.apply(PresenceSeen(presence(BOB, epoch=3, host="ws-bob")), now=T0 + 1)  # the same session again
    assert texts(view) == []

    before = time.time()
    view.apply(PresenceSeen(presence(BOB, online=False, epoch=3, host="ws-bob")), now=T0 + 2)
    assert texts(view) == [f"{BOB} is offline"]
    bob = view.devices[BOB]
    assert not bob.online and bob.last_seen is not None and bob.last_seen >= before

    view.apply(PresenceSeen(presence(BOB, epoch=4, host="ws-bob2")), now=T0 + 3)
    assert texts(view)[-1] == f"{BOB} is online" and view.devices[BOB].host == "ws-bob2"
    # the will of the older session arrives late: ignored
    view.apply(PresenceSeen(presence(BOB, online=False, epoch=3, host="ws-bob")), now=T0 + 4)
    assert view.devices[BOB].online and view.devices[BOB].epoch == 4 and len(view.log) == 2

    view.apply(PresenceSeen(presence("dave-pc", epoch=1)), now=T0 + 5)  # a new device comes online
    view.apply(PresenceSeen(presence("erin-pc", online=False, epoch=1), initial=True), now=T0 + 5)
    assert texts(view)[2:] == ["dave-pc is online"]

    view.apply(Connection(True, BROKER), now=T0 + 6)
    view.apply(Connection(True, BROKER), now=T0 + 6)
    view.apply(Connection(False, BROKER), now=T0 + 7)
    assert texts(view)[3:] == [f"connected to {BROKER}", f"lost the broker {BROKER}; reconnecting"]
    assert view.log[-1].level is Level.WARNING and not view.connected


# -- (c) transfers: rate, ETA, fraction, linger; the agent's own view ------------------------------------------
def test_transfer_rate_eta_fraction_and_linger() -> None:
    view = SpaceView("game", ME, agent=True)
    view.apply(TransferProgress(HERO, Direction.IN, 0, 1000, peer=BOB), now=10.0)
    [tr] = view.transfer_rows()
    assert (tr.device, tr.peer, tr.started) == (ME, BOB, 10.0)
    assert tr.fraction() == 0.0 and tr.rate() is None and tr.eta() is None  # one sample
    view.apply(TransferProgress(HERO, Direction.IN, 250, 1000), now=11.0)
    assert tr.fraction() == 0.25 and tr.rate() == 250.0 and tr.eta() == 3.0
    assert tr.peer == BOB  # a later event without a peer keeps it
    view.apply(TransferProgress(HERO, Direction.IN, 700, 1000), now=12.0)
    assert tr.rate() == 350.0 and tr.eta() == pytest.approx(300 / 350)  # 700 bytes over the 2 s since t=10
    view.apply(TransferProgress(HERO, Direction.IN, 850, None), now=13.5)  # no total: the known one stays
    assert tr.total == 1000 and tr.fraction() == 0.85
    assert tr.rate() == pytest.approx((850 - 250) / 2.5)  # the samples of the last 3 s only
    assert view.active_transfers() == 1

    view.apply(TransferProgress(HERO, Direction.IN, 1000, 1000, finished=True), now=14.0)
    assert tr.finished_at == 14.0 and tr.ok and tr.fraction() == 1.0
    assert view.active_transfers() == 0 and view.totals.bytes_in == 1000
    assert not view.expire(14.0 + LINGER - 0.1) and view.transfer_rows() == [tr]
    assert view.expire(14.0 + LINGER + 0.1) and view.transfer_rows() == []
    # a late "finished" for a transfer already gone does not bring it back
    view.apply(TransferProgress(HERO, Direction.IN, 1000, 1000, finished=True), now=17.0)
    assert view.transfer_rows() == []

    # sending: bytes out counted; a new transfer of the same file after a finished one starts afresh
    view.apply(TransferProgress(HERO, Direction.OUT, 400, 1000), now=20.0)
    view.apply(TransferProgress(HERO, Direction.OUT, 1000, 1000, finished=True), now=21.0)
    view.apply(TransferProgress(HERO, Direction.OUT, 10, 1000), now=22.0)
    [out] = view.transfer_rows()
    assert out.started == 22.0 and out.finished_at is None and view.totals.bytes_out == 1000
    # a failed fetch is not complete
    view.apply(TransferProgress(LEVEL, Direction.IN, 5, 10, finished=True), now=23.0)  # unknown: ignored
    view.apply(TransferProgress(LEVEL, Direction.IN, 5, 10), now=23.0)
    view.apply(TransferProgress(LEVEL, Direction.IN, 5, 10, finished=True, ok=False), now=24.0)
    failed = view.transfers[(LEVEL, Direction.IN, ME)]
    assert not failed.ok and failed.fraction() == 0.5


def test_agent_view_logs_its_own_lines_and_skips_its_own_presence() -> None:
    view = SpaceView("game", ME, broker=BROKER, agent=True)
    feed(view, [
        Connection(True, BROKER),
        PresenceSeen(presence(BOB, epoch=1)),
        HeadSeen(head(HERO, 1, BOB)),
        HeadSeen(head(HERO, 2, BOB)),
        LockSeen(HERO, lock(HERO, BOB)),
        LockHistory((lock_event(HERO, LockEventKind.TAKEN, BOB, 1.0),)),
        LockHistory((lock_event(HERO, LockEventKind.FORCED, BOB, 2.0, by=CAROL),)),
        HeadSeen(head(HERO, 3, BOB, deleted=True)),
    ])
    assert texts(view) == [] and view.connected  # the agent's own log says what happened
    assert view.totals.versions == 3 and view.totals.locks == 1  # (counted for the closing summary)

    view.apply(LogLine(f"{HERO}: applied v2 from {BOB} (100 B)", at=NOW), now=T0)
    view.apply(LogLine("disk nearly full", Level.WARNING, at=NOW), now=T0)
    view.apply(LogLine("replacing x failed", Level.ERROR, at=NOW), now=T0)
    assert texts(view) == [f"{HERO}: applied v2 from {BOB} (100 B)", "disk nearly full", "replacing x failed"]
    assert [ln.level for ln in view.log] == [Level.INFO, Level.WARNING, Level.ERROR]
    assert view.totals.errors == 1

    # its own presence lists what it sends/receives: the agent reports those itself (with bytes)
    view.apply(PresenceSeen(presence(ME, epoch=9, sending=[HERO], receiving=[LEVEL])), now=T0 + 1)
    assert view.transfers == {}
    # another device's presence does make (size-less) transfer rows; they end when its presence says so
    view.apply(PresenceSeen(presence(BOB, epoch=1, receiving=[LEVEL])), now=T0 + 1)
    [tr] = view.transfer_rows()
    assert (tr.file_id, tr.direction, tr.device, tr.done) == (LEVEL, Direction.IN, BOB, None)
    assert tr.fraction() is None and view.active_transfers() == 1
    view.apply(PresenceSeen(presence(BOB, epoch=1)), now=T0 + 2)
    assert tr.finished_at == T0 + 2 and view.active_transfers() == 0
    assert view.expire(T0 + 2 + LINGER + 0.01) and view.transfers == {}

    # the log keeps the last max_log lines, counting all
    small = SpaceView("game", ME, agent=True, max_log=3)
    feed(small, [LogLine(f"line {i}") for i in range(5)])
    assert texts(small) == ["line 2", "line 3", "line 4"] and small.logged == 5


def test_watch_view_takes_its_own_transfers_from_its_presence() -> None:
    view = SpaceView("game", ME, broker=BROKER)  # atrius tui: no engine here, only presences
    view.apply(HeadSeen(head(ROCK, 2, BOB, 4 * MIB), initial=True), now=T0)
    view.apply(LocalChanged(ROCK, LocalState.BEHIND), now=T0)
    view.apply(PresenceSeen(presence(ME, epoch=2, receiving=[ROCK]), initial=True), now=T0)
    [tr] = view.transfer_rows()
    assert (tr.device, tr.direction, tr.total) == (ME, Direction.IN, 4 * MIB)
    assert view.local_of(view.files[ROCK]) is LocalState.RECEIVING
    view.apply(PresenceSeen(presence(ME, epoch=2)), now=T0 + 1)
    assert view.local_of(view.files[ROCK]) is LocalState.BEHIND
    # going offline ends everything it was doing
    view.apply(PresenceSeen(presence(BOB, epoch=5, sending=[ROCK])), now=T0 + 1)
    view.apply(PresenceSeen(presence(BOB, online=False, epoch=5, sending=[ROCK])), now=T0 + 2)
    assert view.active_transfers() == 0 and view.devices[BOB].sending == ()


# -- (d) small terminals, big spaces -------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "height"), [(60, 12), (40, 8), (120, 12), (60, 40)])
def test_render_in_small_terminals(width: int, height: int) -> None:
    for view in (studio(), SpaceView("game")):
        out = screen_text(view, width=width, height=height)
        lines = out.splitlines()
        assert lines and all(len(ln) <= width for ln in lines), out
        assert "Atrius" in lines[0]


@pytest.mark.parametrize("height", [12, 13, 14])
def test_render_fits_short_terminals(height: int) -> None:
    view = studio()
    view.apply(LogLine("the newest event"), now=T0 + 2)
    lines = screen_text(view, width=100, height=height).splitlines()
    assert len(lines) == height
    assert lines[-1].startswith("╰") and lines[-1].endswith("╯"), "\n".join(lines)  # the events panel is whole
    assert any("the newest event" in ln for ln in lines), "\n".join(lines)


def test_render_many_files_shows_how_many_more() -> None:
    view = studio()
    feed(view, [HeadSeen(head(f"assets/file{i:04d}.bin", 1, BOB, i + 1), initial=True) for i in range(2000)])
    t0 = time.perf_counter()
    out = screen_text(view, height=40)
    took = time.perf_counter() - t0
    more = re.search(r"… and (\d+) more", out)
    assert more, out
    shown = sum(1 for ln in out.splitlines() if re.search(r"assets/file\d{4}\.bin|" + re.escape(HERO)
                                                          + "|" + re.escape(ROCK) + "|" + re.escape(LEVEL), ln)
                and "↓" not in ln and "↑" not in ln)
    assert shown >= 5 and shown + int(more.group(1)) == 2003, (shown, more.group(1))
    assert "2003 files" in out.splitlines()[0]
    print(f"rendering 2,003 files took {took:.3f} s")  # (a figure, not a limit: bench/ measures speed)
    small = screen_text(view, width=60, height=12)
    assert re.search(r"… and \d+ more", small) and all(len(ln) <= 60 for ln in small.splitlines())


# -- (e) plain mode: log lines and a snapshot for a stdout that is not a terminal -----------------------------
def test_screen_plain_mode_prints_log_lines_and_a_snapshot() -> None:
    out = io.StringIO()

    async def main() -> SpaceView:
        loop = asyncio.get_running_loop()
        sink = QueueSink(loop)
        view = SpaceView("game", ME, broker=BROKER)
        screen = Screen(view, sink, interactive=False, out=out)
        assert not screen.interactive
        stop = asyncio.Event()
        task = asyncio.create_task(screen.run(stop))
        sink.emit(Connection(True, BROKER))
        state: list[Event] = [
            PresenceSeen(presence(ME, epoch=7, host="ws-alice", since=time.time() - 60), initial=True),
            PresenceSeen(presence(BOB, epoch=3, host="ws-bob", since=time.time() - 60), initial=True),
            PresenceSeen(presence(CAROL, online=False, epoch=2, host="ws-carol"), initial=True),
            HeadSeen(head(HERO, 3, BOB, 2048), initial=True),
            HeadSeen(head(ROCK, 7, ME, 5 * MIB), initial=True),
            LockSeen(HERO, lock(HERO, BOB), initial=True),
            LocalChanged(HERO, LocalState.IN_SYNC),
            LocalChanged(ROCK, LocalState.IN_SYNC),
        ]
        def produce() -> None:  # from another thread
            for ev in state:
                sink.emit(ev)

        producer = threading.Thread(target=produce)
        producer.start()
        await asyncio.sleep(0.3)
        producer.join()
        sink.emit(HeadSeen(head(LEVEL, 1, CAROL, 300)))
        sink.emit(LogLine("disk nearly full", Level.WARNING))
        await asyncio.sleep(1.9)
        sink.emit(LogLine("the last words"))  # queued just before stop: still printed
        stop.set()
        await asyncio.wait_for(task, 5)
        return view

    asyncio.run(main())
    text = out.getvalue()
    lines = text.splitlines()
    assert "\x1b[" not in text
    assert re.fullmatch(rf"\d\d:\d\d:\d\d connected to {re.escape(BROKER)}", lines[0]), text
    assert re.search(rf"^\d\d:\d\d:\d\d {LEVEL}: new file v1 from {CAROL} \(300 B\)$", text, re.M), text
    assert re.search(r"^\d\d:\d\d:\d\d WARNING disk nearly full$", text, re.M), text
    assert lines[-1].endswith(" the last words"), text
    assert text.count("space game:") == 1, text  # the snapshot, once
    assert "space game: 2 of 3 device(s) online, 3 file(s)" in text
    assert re.search(rf"^  device {ME} \(ws-alice\): online since \d\d:\d\d:\d\d$", text, re.M), text
    assert re.search(rf"^  device {BOB} \(ws-bob\): online since", text, re.M), text
    assert f"  device {CAROL} (ws-carol): offline" in text
    assert f"  file {HERO}: v3 2.0 KiB by {BOB}, locked by {BOB}, read-only" in text
    assert f"  file {ROCK}: v7 5.0 MiB by {ME}, in sync" in text
    assert f"  file {LEVEL}: v1 300 B by {CAROL}" in text
    assert text.index("space game:") > text.index("disk nearly full")  # printed SNAPSHOT_AFTER after connecting
    assert "locked by" not in lines[0] and f"{HERO}: locked" not in text  # initial state: not narrated


def test_plain_snapshot_of_an_empty_space() -> None:
    out = io.StringIO()
    plain_snapshot(SpaceView("game"), out)
    assert out.getvalue() == "space game: 0 of 0 device(s) online, 0 file(s)\n"


def test_queue_sink_drops_progress_first_when_full() -> None:
    async def main() -> list[Event]:
        sink = QueueSink(asyncio.get_running_loop(), limit=2)
        sink.emit(LogLine("a"))
        sink.emit(LogLine("b"))
        sink.emit(TransferProgress(HERO, Direction.IN, 1, 10))  # superseded by the next anyway: dropped
        sink.emit(TransferProgress(HERO, Direction.IN, 10, 10, finished=True))
        sink.emit(LogLine("c"))
        assert sink.dropped == 1
        return [sink.queue.get_nowait() for _ in range(sink.queue.qsize())]

    got = asyncio.run(main())
    assert [type(e).__name__ for e in got] == ["LogLine", "LogLine", "TransferProgress", "LogLine"]

    loop = asyncio.new_event_loop()
    sink = QueueSink(loop)
    loop.close()
    sink.emit(LogLine("after the loop closed"))  # nothing to deliver to; no error


# -- (f) SVG export --------------------------------------------------------------------------------------------
def test_export_svg_writes_a_valid_svg(tmp_path: Path) -> None:
    path = tmp_path / "screen.svg"
    export_svg(studio(), str(path), width=120, height=36, title="atrius tui")
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = "".join(root.itertext()).replace("\xa0", " ")
    for name in (HERO, ROCK, LEVEL, ME, BOB, CAROL, "atrius tui"):
        assert name in text, name


# -- (g) the logging bridge -------------------------------------------------------------------------------------
class ListSink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)


def test_log_bridge_turns_records_into_log_lines() -> None:
    sink = ListSink()
    logger = logging.getLogger("atrius.test_ui.bridge")
    bridge = LogBridge(sink)
    logger.addHandler(bridge)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.debug("not shown")
        logger.info("%s: applied v%d", HERO, 2)
        logger.warning("dropped %s", "a bad head")
        logger.error("replacing %s", "x")
        logger.critical("giving up")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("apply failed")
            logger.warning("retrying", exc_info=True)
        logger.info("%d files", "not a number")  # a bad format string: the message as written
        t0 = time.time()
        logger.info("timed")
    finally:
        logger.removeHandler(bridge)
        logger.propagate = True
    lines = [e for e in sink.events if isinstance(e, LogLine)]
    assert len(lines) == len(sink.events)
    assert [(ln.text, ln.level) for ln in lines] == [
        (f"{HERO}: applied v2", Level.INFO),
        ("dropped a bad head", Level.WARNING),
        ("replacing x", Level.ERROR),
        ("giving up", Level.ERROR),
        ("apply failed (ValueError)", Level.ERROR),
        ("retrying", Level.WARNING),
        ("%d files", Level.INFO),
        ("timed", Level.INFO),
    ]
    assert abs(lines[-1].at - t0) < 1.0

    warn_only = ListSink()
    bridge = LogBridge(warn_only, logging.WARNING)
    logger.addHandler(bridge)
    logger.propagate = False
    try:
        logger.info("quiet")
        logger.warning("loud")
    finally:
        logger.removeHandler(bridge)
        logger.propagate = True
    assert [e.text for e in warn_only.events if isinstance(e, LogLine)] == ["loud"]


def test_state_event_decodes_the_state_topics_of_one_space() -> None:
    """The one decoder behind `atrius tui` and `atrius status`: state topics of the space become
    events; other spaces, other topics and cleared retained messages become nothing."""
    from agent.events import state_event
    from schemas.messages import MessageError, encode
    from schemas.topics import TopicError, conflict_topic, head_topic, lock_topic, presence_topic

    p = Presence(device=BOB, state=PresenceState.ONLINE, epoch=7, host="ws-bob")
    ev = state_event("game", presence_topic("game", BOB), encode(p), initial=True)
    assert isinstance(ev, PresenceSeen) and ev.presence == p and ev.initial
    h = head(HERO, 3, BOB, 1)
    ev = state_event("game", head_topic("game", HERO), encode(h))
    assert isinstance(ev, HeadSeen) and ev.head == h and not ev.initial
    lk = LockState(file_id=HERO, holder=BOB, acquired_at=T0)
    ev = state_event("game", lock_topic("game", HERO), encode(lk))
    assert isinstance(ev, LockSeen) and ev.lock == lk
    ev = state_event("game", lock_topic("game", HERO), b"")
    assert isinstance(ev, LockSeen) and ev.file_id == HERO and ev.lock is None  # unlocked
    ev = state_event("game", conflict_topic("game", HERO), encode(h))
    assert isinstance(ev, ConflictSeen) and ev.head == h
    assert state_event("other", head_topic("game", HERO), encode(h)) is None  # another space
    assert state_event("game", head_topic("game", HERO), b"") is None  # a cleared retained head
    with pytest.raises(MessageError):
        state_event("game", head_topic("game", HERO), b"{not json")
    with pytest.raises(MessageError):  # the payload names another file than its topic
        state_event("game", head_topic("game", ROCK), encode(h))
    with pytest.raises(TopicError):
        state_event("game", "atrius/v1/game/nonsense/x", b"{}")
