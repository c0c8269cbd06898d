"""The state of a space as the terminal UI shows it, built only by applying state events in order.

No I/O and no rich here: ``SpaceView.apply`` folds events (agent/events.py) into devices, files,
transfers and an event log; the UI module draws it.  Time is injected (``now`` arguments), so a
scripted event stream gives the same view every run.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from agent.commands import human_size
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
    LogLine,
    PresenceSeen,
    TransferProgress,
)
from schemas.messages import EntryKind, Head, LockEventKind, LockState, Presence, PresenceState
from schemas.rules import presence_is_current, supersedes

LINGER = 2.0
"""Seconds a finished transfer stays on screen (at 100 % or marked failed)."""
RATE_WINDOW = 3.0
"""Seconds of progress samples behind a transfer's bytes/s."""
MAX_LOG = 500


@dataclass
class DeviceRow:
    name: str
    online: bool = False
    host: str = ""
    since: float = 0.0
    last_seen: float | None = None
    epoch: int = -1
    sending: tuple[str, ...] = ()
    receiving: tuple[str, ...] = ()
    presence: Presence | None = None


@dataclass
class FileRow:
    file_id: str
    head: Head | None = None
    lock: LockState | None = None
    local: LocalState | None = None
    path: str | None = None
    changed: float = 0.0
    """Monotonic time of the last change shown (0 for state found on connecting)."""


@dataclass
class Transfer:
    file_id: str
    direction: Direction
    device: str
    """The device moving the bytes (this device for its own transfers)."""
    peer: str
    done: int | None
    total: int | None
    started: float
    updated: float
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    finished_at: float | None = None
    ok: bool = True

    def rate(self) -> float | None:
        """Bytes per second over the last few seconds; None before two samples."""
        if len(self.samples) < 2:
            return None
        t1, d1 = self.samples[-1]
        t0, d0 = next(((t, d) for t, d in self.samples if t1 - t <= RATE_WINDOW), self.samples[0])
        if t1 - t0 <= 0:
            return None
        return max(0.0, (d1 - d0) / (t1 - t0))

    def fraction(self) -> float | None:
        if self.done is None or not self.total:
            return 1.0 if self.finished_at is not None and self.ok else None
        return min(1.0, self.done / self.total)

    def eta(self) -> float | None:
        rate = self.rate()
        if self.done is None or self.total is None or not rate:
            return None
        return max(0.0, (self.total - self.done) / rate)


@dataclass
class Totals:
    """What happened while the view was open, for summaries."""

    versions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    locks: int = 0
    conflicts: int = 0
    errors: int = 0


class SpaceView:
    """Devices, files, live transfers and an event log of one space, seen from device ``me`` (None:
    from no device).

    ``agent``: this process runs ``me``'s agent, which reports its own transfers with progress
    and its own log (LogLine events).  Otherwise (the watch-only UI) the view writes the event log
    itself from state changes, and ``me``'s transfers come from its presence like everyone's."""

    def __init__(self, space: str, me: str | None = None, *, broker: str = "", agent: bool = False,
                 max_log: int = MAX_LOG) -> None:
        self.space = space
        self.me = me
        self.broker = broker
        self.agent = agent
        self.connected = False
        self.devices: dict[str, DeviceRow] = {}
        self.files: dict[str, FileRow] = {}
        self.transfers: dict[tuple[str, Direction, str], Transfer] = {}
        self.log: deque[LogLine] = deque(maxlen=max_log)
        self.logged = 0
        """Lines ever appended to the log (the deque keeps the last ``max_log``)."""
        self.totals = Totals()
        self._lock_event_seen = 0.0
        self._lock_history_seen = False

    # -- applying events ------------------------------------------------------------------------
    def apply(self, ev: Event, now: float | None = None) -> None:
        """Fold one event in.  ``now``: monotonic time (default: the event's, or the clock's)."""
        t = time.monotonic() if now is None else now
        if isinstance(ev, PresenceSeen):
            self._presence(ev, t)
        elif isinstance(ev, DevicesKnown):
            for rec in ev.devices:
                row = self.devices.setdefault(rec.device, DeviceRow(rec.device))
                row.last_seen = rec.last_seen
                if row.epoch < 0:  # no presence message seen: the registry is all we know
                    row.online, row.host, row.since = rec.state is PresenceState.ONLINE, rec.host, rec.since
        elif isinstance(ev, HeadSeen):
            self._head(ev, t)
        elif isinstance(ev, LockSeen):
            self._lock(ev, t)
        elif isinstance(ev, LockHistory):
            self._lock_history(ev)
        elif isinstance(ev, ConflictSeen):
            self.totals.conflicts += 1
            h = ev.head
            self._say(f"{h.file_id}: conflict: {h.author}'s edit lost to a concurrent version; "
                      f"kept as a conflict copy on {h.author}", Level.WARNING)
        elif isinstance(ev, LocalChanged):
            row = self._file(ev.file_id)
            was, row.local = row.local, ev.state
            if ev.path is not None:
                row.path = ev.path
            if ev.state is LocalState.CONFLICT and was is not LocalState.CONFLICT:
                row.changed = t
                if self.agent:  # (the agent's own log says where the copy is)
                    self.totals.conflicts += 1
                elif was is not None:
                    self.totals.conflicts += 1
                    self._say(f"{ev.file_id}: a conflict copy is beside {self.me}'s file", Level.WARNING)
        elif isinstance(ev, TransferProgress):
            self._transfer(ev, ev.at if now is None else now)
        elif isinstance(ev, LogLine):
            if ev.level >= Level.ERROR:
                self.totals.errors += 1
            self._append(ev)
        elif isinstance(ev, Connection):
            if ev.connected != self.connected:
                self._say(f"connected to {ev.broker or self.broker}" if ev.connected else
                          f"lost the broker {ev.broker or self.broker}; reconnecting",
                          Level.INFO if ev.connected else Level.WARNING)
            self.connected = ev.connected

    @property
    def narrate(self) -> bool:
        """Whether the view writes the event log itself (not when the agent's own log is it)."""
        return not self.agent

    def _say(self, text: str, level: Level = Level.INFO) -> None:
        if self.narrate:
            self._append(LogLine(text, level))

    def _append(self, line: LogLine) -> None:
        self.log.append(line)
        self.logged += 1

    def _file(self, file_id: str) -> FileRow:
        row = self.files.get(file_id)
        if row is None:
            row = self.files[file_id] = FileRow(file_id)
        return row

    def _presence(self, ev: PresenceSeen, t: float) -> None:
        p = ev.presence
        row = self.devices.get(p.device)
        if row is not None and row.presence is not None and not presence_is_current(p, row.presence):
            return
        was_online = row.online if row is not None and row.epoch >= 0 else None
        if row is None:
            row = self.devices[p.device] = DeviceRow(p.device)
        online = p.state is PresenceState.ONLINE
        row.online, row.host, row.since, row.epoch, row.presence = online, p.host, p.since, p.epoch, p
        row.sending, row.receiving = (tuple(p.sending), tuple(p.receiving)) if online else ((), ())
        if not online and (was_online or not ev.initial):
            row.last_seen = time.time()
        news = (was_online != online) if was_online is not None else (online and not ev.initial)
        if news:
            self._say(f"{p.device} is {'online' if online else 'offline'}", Level.INFO)
        if not (self.agent and p.device == self.me):
            self._remote_activity(p.device, Direction.OUT, row.sending, t)
            self._remote_activity(p.device, Direction.IN, row.receiving, t)

    def _remote_activity(self, device: str, direction: Direction, files: tuple[str, ...], t: float) -> None:
        """Another device's transfers, known only by name from its presence."""
        for key, tr in list(self.transfers.items()):
            if tr.device == device and tr.direction is direction and tr.file_id not in files and tr.finished_at is None:
                tr.finished_at, tr.updated = t, t
                self.transfers[key] = tr
        for fid in files:
            key = (fid, direction, device)
            tr = self.transfers.get(key)
            if tr is None or tr.finished_at is not None:
                size = self.files[fid].head.size if fid in self.files and self.files[fid].head else None
                self.transfers[key] = Transfer(fid, direction, device, "", None, size, t, t)

    def _head(self, ev: HeadSeen, t: float) -> None:
        h = ev.head
        if h.kind is EntryKind.DIR:
            return  # folders are entries of the protocol, not rows of the files panel
        row = self._file(h.file_id)
        if not supersedes(h, row.head) and row.head is not None:
            return
        first = row.head is None
        row.head = h
        if ev.initial:
            return
        row.changed = t
        self.totals.versions += 1
        if not self.narrate:
            return
        if h.deleted and h.moved_to:
            return  # the new path's head tells the move
        if h.deleted:
            self._say(f"{h.file_id}: deleted by {h.author} (v{h.version})")
        elif h.moved_from:
            self._say(f"{h.file_id}: moved from {h.moved_from} by {h.author} (v{h.version})")
        elif h.restored_from:
            self._say(f"{h.file_id}: v{h.restored_from} restored by {h.author} as v{h.version}")
        else:
            what = "new file" if first and h.version == 1 else "new version"
            self._say(f"{h.file_id}: {what} v{h.version} from {h.author} ({human_size(h.size)})")

    def _lock(self, ev: LockSeen, t: float) -> None:
        row = self._file(ev.file_id)
        old, row.lock = row.lock, ev.lock
        if ev.initial or old == ev.lock:
            return
        row.changed = t
        lock = ev.lock
        if lock is not None and (old is None or old.holder != lock.holder):
            self.totals.locks += 1
            note = f' ("{lock.note}")' if lock.note else ""
            until = f" until {time.strftime('%H:%M:%S', time.localtime(lock.expires_at))}" if lock.expires_at else ""
            self._say(f"{ev.file_id}: locked by {lock.holder}{until}{note}")
        elif lock is None and old is not None:
            self._say(f"{ev.file_id}: unlocked (was {old.holder}'s)")

    def _lock_history(self, ev: LockHistory) -> None:
        fresh = [e for e in ev.events if e.time > self._lock_event_seen]
        first_batch, self._lock_history_seen = not self._lock_history_seen, True
        if not fresh:
            return
        self._lock_event_seen = max(e.time for e in fresh)
        if first_batch:
            return  # history from before the view opened (an empty first batch: there was none)
        for e in sorted(fresh, key=lambda e: e.time):
            if e.kind is LockEventKind.FORCED:
                self._say(f"{e.file_id}: {e.by or '?'} forced {e.holder}'s lock open", Level.WARNING)
            elif e.kind is LockEventKind.EXPIRED:
                self._say(f"{e.file_id}: {e.holder}'s lock expired")

    def _transfer(self, ev: TransferProgress, t: float) -> None:
        device = self.me or ""
        key = (ev.file_id, ev.direction, device)
        tr = self.transfers.get(key)
        if tr is None or tr.finished_at is not None:
            if ev.finished:
                return
            tr = self.transfers[key] = Transfer(ev.file_id, ev.direction, device, ev.peer, ev.done, ev.total, t, t)
        tr.done, tr.total, tr.updated = ev.done, ev.total if ev.total is not None else tr.total, t
        if ev.peer:
            tr.peer = ev.peer
        if ev.done is not None:
            tr.samples.append((t, ev.done))
        if ev.finished:
            tr.finished_at, tr.ok = t, ev.ok
            moved = ev.done or 0
            if ev.direction is Direction.IN:
                self.totals.bytes_in += moved
            else:
                self.totals.bytes_out += moved

    def expire(self, now: float) -> bool:
        """Forget transfers finished more than LINGER ago; True if any went."""
        gone = [k for k, tr in self.transfers.items() if tr.finished_at is not None and now - tr.finished_at > LINGER]
        for k in gone:
            del self.transfers[k]
        return bool(gone)

    # -- what the UI draws ---------------------------------------------------------------------------
    def local_of(self, row: FileRow) -> LocalState | None:
        """The local state shown: live transfers first, then read-only under another's lock."""
        me = self.me
        if me is not None:
            for direction, state in ((Direction.IN, LocalState.RECEIVING), (Direction.OUT, LocalState.SENDING)):
                tr = self.transfers.get((row.file_id, direction, me))
                if tr is not None and tr.finished_at is None:
                    return state
        if (row.lock is not None and me is not None and row.lock.holder != me
                and row.local in (LocalState.IN_SYNC, LocalState.READ_ONLY)):
            return LocalState.READ_ONLY
        return row.local

    def device_rows(self) -> list[DeviceRow]:
        return sorted(self.devices.values(), key=lambda d: (not d.online, d.name != self.me, d.name))

    def file_rows(self) -> list[FileRow]:
        """Most recently changed first, then by id."""
        return sorted((r for r in self.files.values() if r.head is not None or r.local is not None),
                      key=lambda r: (-r.changed, r.file_id))

    def transfer_rows(self) -> list[Transfer]:
        return sorted(self.transfers.values(), key=lambda tr: (tr.finished_at is not None, tr.started, tr.file_id))

    def active_transfers(self) -> int:
        return sum(tr.finished_at is None for tr in self.transfers.values())

