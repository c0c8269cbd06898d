"""The stream of state events that feeds the terminal UI: typed events, the sinks that carry them
to the UI's owner on the event loop, and a logging handler that turns log records into events.

Producers (the sync engine, the watch-only source, the demo's narrator) call ``sink.emit(event)``
from the loop thread or any other thread; the UI applies them in order to a ``SpaceView``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from schemas.messages import (
    DeviceRecord,
    Head,
    LockEvent,
    LockState,
    Presence,
    decode_head,
    decode_lock,
    decode_presence,
)
from schemas.topics import TopicKind, parse_topic


class LocalState(enum.StrEnum):
    """What this device's copy of a file is, compared with the head."""

    IN_SYNC = "in sync"
    SENDING = "sending"
    RECEIVING = "receiving"
    MODIFIED = "locally modified"
    CONFLICT = "conflict"
    READ_ONLY = "read-only"
    """In sync, and read-only here because another device holds the lock."""
    BEHIND = "behind"
    """The local copy is an older version (the agent is not running, or has not caught up)."""
    MISSING = "missing"
    NOT_HERE = "not on this device"


class Direction(enum.StrEnum):
    IN = "in"
    OUT = "out"


class Level(enum.IntEnum):
    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR


@dataclass(frozen=True)
class PresenceSeen:
    """A device's presence message.  ``initial``: found on (re)connecting, not news."""

    presence: Presence
    initial: bool = False


@dataclass(frozen=True)
class DevicesKnown:
    """The coordinator's device registry (last-seen times of devices that are offline now)."""

    devices: tuple[DeviceRecord, ...]


@dataclass(frozen=True)
class HeadSeen:
    """A head of the space.  ``initial``: part of the state found on (re)connecting, not news."""

    head: Head
    initial: bool = False


@dataclass(frozen=True)
class LockSeen:
    file_id: str
    lock: LockState | None
    initial: bool = False


@dataclass(frozen=True)
class LockHistory:
    """Lock events recorded by the coordinator (newest first), e.g. to tell a forced unlock."""

    events: tuple[LockEvent, ...]


@dataclass(frozen=True)
class ConflictSeen:
    """A device reported content of its own that lost to another version (``files/{key}/conflict``)."""

    head: Head


@dataclass(frozen=True)
class LocalChanged:
    file_id: str
    state: LocalState
    path: str | None = None


@dataclass(frozen=True)
class TransferProgress:
    """Bytes of one file moving in one direction.  ``total`` None: size unknown (another device's
    transfer, seen only through its presence).  ``done`` None: progress unknown."""

    file_id: str
    direction: Direction
    done: int | None
    total: int | None
    peer: str = ""
    finished: bool = False
    ok: bool = True
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class LogLine:
    text: str
    level: Level = Level.INFO
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Connection:
    """The UI's own link to the broker went up or down."""

    connected: bool
    broker: str = ""


Event = (PresenceSeen | DevicesKnown | HeadSeen | LockSeen | LockHistory | ConflictSeen | LocalChanged
         | TransferProgress | LogLine | Connection)


StateEvent = PresenceSeen | HeadSeen | LockSeen | ConflictSeen


def state_event(space: str, topic: str, payload: bytes, *, initial: bool = False) -> StateEvent | None:
    """The event a message on one of ``space``'s state topics (presence, head, lock, conflict)
    stands for; None for another space, another kind of topic, or a cleared retained message.
    Raises TopicError for a topic that is not ours and MessageError for a bad payload."""
    parsed = parse_topic(topic)
    if parsed.space != space:
        return None
    if parsed.kind is TopicKind.PRESENCE and parsed.device and payload:
        return PresenceSeen(decode_presence(parsed.device, payload), initial)
    if parsed.kind is TopicKind.HEAD and parsed.file_id and payload:
        return HeadSeen(decode_head(parsed.file_id, payload), initial)
    if parsed.kind is TopicKind.LOCK and parsed.file_id:
        return LockSeen(parsed.file_id, decode_lock(parsed.file_id, payload), initial)
    if parsed.kind is TopicKind.CONFLICT and parsed.file_id and payload:
        return ConflictSeen(decode_head(parsed.file_id, payload))
    return None


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


class NullSink:
    """The default: an agent without a UI emits into nothing."""

    def emit(self, event: Event) -> None:
        pass


class QueueSink:
    """Carries events to one asyncio queue; safe to call from any thread.  Bounded: when the
    consumer falls far behind, progress events are dropped first (the next one supersedes them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = 20_000) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.limit = limit
        self.dropped = 0

    def emit(self, event: Event) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._put(event)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop (a thread's last log line at exit): drop it
            self.loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: Event) -> None:
        if self.queue.qsize() >= self.limit and isinstance(event, TransferProgress) and not event.finished:
            self.dropped += 1
            return
        self.queue.put_nowait(event)


class LogBridge(logging.Handler):
    """Log records of Atrius (INFO and up) as ``LogLine`` events for the UI's event log."""

    def __init__(self, sink: EventSink, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must not take the agent down
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None and record.levelno >= logging.ERROR:
            text = f"{text} ({type(record.exc_info[1]).__name__})"
        level = Level.ERROR if record.levelno >= logging.ERROR else (
            Level.WARNING if record.levelno >= logging.WARNING else Level.INFO)
        self.sink.emit(LogLine(text, level, record.created))
