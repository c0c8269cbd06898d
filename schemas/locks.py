"""Pure lock arbitration rules: who gets a lock, who may release it, when it expires (time injected)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from schemas.messages import Head, LockEvent, LockEventKind, LockOutcome, LockState

EXIT_LOCKED_OUTCOMES = frozenset({LockOutcome.HELD, LockOutcome.NOT_HOLDER})
"""Outcomes a command reports with exit code 3 (the lock is held by someone else)."""


@dataclass(frozen=True)
class LockDecision:
    outcome: LockOutcome
    lock: LockState | None
    """The lock after the decision (for HELD / NOT_HOLDER: the other device's lock)."""
    event: LockEvent | None
    """What to record in the lock history; None when nothing changed."""
    message: str

    @property
    def ok(self) -> bool:
        return self.outcome in {LockOutcome.GRANTED, LockOutcome.RENEWED, LockOutcome.RELEASED,
                                LockOutcome.FORCED, LockOutcome.NOT_LOCKED}

    @property
    def changed(self) -> bool:
        return self.event is not None


def is_expired(lock: LockState, now: float) -> bool:
    return lock.expires_at is not None and lock.expires_at <= now


def expire(lock: LockState | None, now: float) -> LockEvent | None:
    """The expiry event of ``lock`` if its TTL has run out at ``now``."""
    if lock is None or not is_expired(lock, now):
        return None
    return LockEvent(file_id=lock.file_id, kind=LockEventKind.EXPIRED, holder=lock.holder, time=now, note=lock.note)


def describe(lock: LockState) -> str:
    """``bob-laptop since 2026-11-23 14:02:11 UTC (until ...) "note"`` for messages."""
    def fmt(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))

    text = f"{lock.holder} since {fmt(lock.acquired_at)}"
    if lock.expires_at is not None:
        text += f", until {fmt(lock.expires_at)}"
    if lock.note:
        text += f' ("{lock.note}")'
    return text


def decide_lock(
    current: LockState | None, *, file_id: str, requester: str, local_hash: str | None, head: Head | None,
    ttl: float | None, note: str, now: float,
) -> LockDecision:
    """Grant, renew or refuse a lock.  ``current`` must already have been expired by the caller.

    Refused when another device holds it (HELD), when the file has no version (UNKNOWN), and when
    the requester's copy is not the current head (STALE): a lock on a stale copy would let its
    holder overwrite a newer version.
    """
    if current is not None and current.holder != requester:
        return LockDecision(LockOutcome.HELD, current, None, f"{file_id} is locked by {describe(current)}")
    if head is None:
        return LockDecision(LockOutcome.UNKNOWN, current, None, f"{file_id} has no versions in this space")
    if head.deleted:
        return LockDecision(LockOutcome.STALE, current, None, f"{file_id} is deleted (v{head.version})")
    if local_hash != head.hash:
        have = "no local copy" if local_hash is None else "a local copy that differs from it"
        return LockDecision(
            LockOutcome.STALE, current, None,
            f"the current version of {file_id} is v{head.version} by {head.author} and this device has {have}; "
            "let the agent bring the file up to date (or publish your edit) and lock again")
    lock = LockState(file_id=file_id, holder=requester, acquired_at=current.acquired_at if current else now,
                     expires_at=None if ttl is None else now + ttl, note=note, version=head.version)
    kind = LockEventKind.RENEWED if current is not None else LockEventKind.TAKEN
    outcome = LockOutcome.RENEWED if current is not None else LockOutcome.GRANTED
    event = LockEvent(file_id=file_id, kind=kind, holder=requester, by=requester, time=now, note=note)
    return LockDecision(outcome, lock, event, f"{file_id} locked by {describe(lock)}")


def decide_unlock(current: LockState | None, *, file_id: str, requester: str, force: bool,
                  now: float) -> LockDecision:
    if current is None:
        return LockDecision(LockOutcome.NOT_LOCKED, None, None, f"{file_id} is not locked")
    if current.holder == requester:
        event = LockEvent(file_id=file_id, kind=LockEventKind.RELEASED, holder=requester, by=requester, time=now)
        return LockDecision(LockOutcome.RELEASED, None, event, f"{file_id} unlocked")
    if not force:
        return LockDecision(LockOutcome.NOT_HOLDER, current, None,
                            f"{file_id} is locked by {describe(current)}, not by {requester}; "
                            "use --force to break the lock")
    event = LockEvent(file_id=file_id, kind=LockEventKind.FORCED, holder=current.holder, by=requester, time=now,
                      note=current.note)
    return LockDecision(LockOutcome.FORCED, None, event,
                        f"{file_id}: lock of {current.holder} broken by {requester}")
