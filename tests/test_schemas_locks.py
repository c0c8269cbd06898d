"""Unit tests for schemas/locks.py: lock grant, renewal, refusal, release, forced release and expiry (time injected)."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.locks import EXIT_LOCKED_OUTCOMES, LockDecision, decide_lock, decide_unlock, describe, expire, is_expired
from schemas.messages import Head, LockEvent, LockEventKind, LockOutcome, LockState

FID = "art/hero.png"
H = "a" * 64  # the current head's content
OLD = "b" * 64
PAGE = "f" * 64
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
NOW = T0 + 3600.0


def mk_head(version: int = 6, hash_: str = H, author: str = "carol", *, deleted: bool = False) -> Head:
    if deleted:
        return Head(file_id=FID, hash=hash_, size=0, version=version, author=author, deleted=True)
    return Head(file_id=FID, hash=hash_, size=10, version=version, author=author, chunks=1, manifest=[PAGE])


def mk_lock(holder: str = "bob", **over: Any) -> LockState:
    fields: dict[str, Any] = {"file_id": FID, "holder": holder, "acquired_at": T0, "note": "painting the cape"}
    fields.update(over)
    return LockState(**fields)


def lock(current: LockState | None = None, **over: Any) -> LockDecision:
    """decide_lock for alice, who holds the current head, at NOW; ``over`` changes any argument."""
    args: dict[str, Any] = {"file_id": FID, "requester": "alice", "local_hash": H, "head": mk_head(),
                            "ttl": None, "note": "", "now": NOW}
    args.update(over)
    return decide_lock(current, **args)


def unlock(current: LockState | None, requester: str = "alice", *, force: bool = False) -> LockDecision:
    return decide_unlock(current, file_id=FID, requester=requester, force=force, now=NOW)


# -- grant and renew -------------------------------------------------------------------------------


def test_grant() -> None:
    d = lock(note="retopology")
    assert d.outcome is LockOutcome.GRANTED
    assert d.ok and d.changed
    assert d.lock == LockState(file_id=FID, holder="alice", acquired_at=NOW, expires_at=None, note="retopology",
                               version=6)
    assert d.event == LockEvent(file_id=FID, kind=LockEventKind.TAKEN, holder="alice", by="alice", time=NOW,
                                note="retopology")
    assert FID in d.message and "alice" in d.message and "retopology" in d.message


def test_grant_with_ttl_sets_expires_at() -> None:
    d = lock(ttl=900.0)
    assert d.lock is not None
    assert d.lock.acquired_at == NOW
    assert d.lock.expires_at == NOW + 900.0


def test_renew_by_the_holder_keeps_acquired_at_and_updates_ttl_and_note() -> None:
    mine = mk_lock("alice", expires_at=T0 + 7200.0, note="old note", version=5)
    d = lock(mine, ttl=60.0, note="new note")
    assert d.outcome is LockOutcome.RENEWED
    assert d.ok and d.changed
    assert d.lock == LockState(file_id=FID, holder="alice", acquired_at=T0, expires_at=NOW + 60.0, note="new note",
                               version=6)
    assert d.event == LockEvent(file_id=FID, kind=LockEventKind.RENEWED, holder="alice", by="alice", time=NOW,
                                note="new note")


def test_renew_without_ttl_drops_the_expiry() -> None:
    d = lock(mk_lock("alice", expires_at=NOW + 5.0), ttl=None)
    assert d.outcome is LockOutcome.RENEWED
    assert d.lock is not None and d.lock.expires_at is None


# -- refusals --------------------------------------------------------------------------------------


def test_held_by_another_device() -> None:
    bobs = mk_lock("bob", expires_at=T0 + 86400.0)
    d = lock(bobs)
    assert d.outcome is LockOutcome.HELD
    assert d.outcome in EXIT_LOCKED_OUTCOMES
    assert not d.ok and not d.changed
    assert d.lock is bobs
    assert d.event is None
    assert "bob" in d.message
    assert "2023-11-14 22:13:20 UTC" in d.message
    assert "2023-11-15 22:13:20 UTC" in d.message
    assert "painting the cape" in d.message
    assert d.message == f"{FID} is locked by {describe(bobs)}"


@pytest.mark.parametrize(
    "over",
    [
        pytest.param({"local_hash": OLD}, id="stale-copy"),
        pytest.param({"local_hash": None}, id="no-copy"),
        pytest.param({"head": None}, id="unknown"),
        pytest.param({"head": mk_head(deleted=True)}, id="deleted"),
    ],
)
def test_held_takes_precedence_over_every_other_refusal(over: dict[str, Any]) -> None:
    bobs = mk_lock("bob")
    d = lock(bobs, **over)
    assert d.outcome is LockOutcome.HELD
    assert d.lock is bobs
    assert d.event is None


@pytest.mark.parametrize(("local_hash", "have"), [(OLD, "differs"), (None, "no local copy")])
def test_stale_copy_is_refused(local_hash: str | None, have: str) -> None:
    d = lock(local_hash=local_hash, head=mk_head(7, author="carol"))
    assert d.outcome is LockOutcome.STALE
    assert d.outcome not in EXIT_LOCKED_OUTCOMES
    assert not d.ok and not d.changed
    assert d.lock is None and d.event is None
    assert "v7" in d.message and "carol" in d.message and have in d.message


def test_stale_renewal_keeps_the_holders_lock_unchanged() -> None:
    mine = mk_lock("alice", expires_at=NOW + 10.0)
    d = lock(mine, local_hash=OLD, ttl=999.0)
    assert d.outcome is LockOutcome.STALE
    assert d.lock is mine
    assert d.event is None


def test_unknown_file_is_refused() -> None:
    d = lock(head=None)
    assert d.outcome is LockOutcome.UNKNOWN
    assert not d.ok and not d.changed
    assert d.lock is None and d.event is None
    assert FID in d.message
    assert lock(head=None, local_hash=None).outcome is LockOutcome.UNKNOWN


@pytest.mark.parametrize("local_hash", [H, None, OLD])
def test_deleted_head_is_stale(local_hash: str | None) -> None:
    d = lock(local_hash=local_hash, head=mk_head(8, deleted=True))
    assert d.outcome is LockOutcome.STALE
    assert d.lock is None and d.event is None
    assert "deleted" in d.message and "v8" in d.message


# -- TTL and expiry --------------------------------------------------------------------------------


def test_expire_exactly_when_now_reaches_expires_at() -> None:
    lk = lock(ttl=30.0, note="n").lock
    assert lk is not None and lk.expires_at == NOW + 30.0
    assert not is_expired(lk, NOW)
    assert not is_expired(lk, NOW + 29.999)
    assert expire(lk, NOW + 29.999) is None
    assert is_expired(lk, NOW + 30.0)
    assert expire(lk, NOW + 30.0) == LockEvent(file_id=FID, kind=LockEventKind.EXPIRED, holder="alice", by=None,
                                               time=NOW + 30.0, note="n")
    later = expire(lk, NOW + 1000.0)
    assert later is not None and later.time == NOW + 1000.0


def test_a_lock_without_ttl_never_expires() -> None:
    lk = lock(ttl=None).lock
    assert lk is not None and lk.expires_at is None
    for now in (NOW, NOW + 1e9, float("inf")):
        assert not is_expired(lk, now)
        assert expire(lk, now) is None


def test_expire_nothing() -> None:
    assert expire(None, NOW) is None


def test_expired_lock_can_be_taken_by_another_device() -> None:
    bobs = mk_lock("bob", expires_at=NOW)
    event = expire(bobs, NOW)
    assert event is not None and event.holder == "bob"
    assert lock(None).outcome is LockOutcome.GRANTED  # the caller drops the expired lock first


# -- unlock ----------------------------------------------------------------------------------------


def test_unlock_by_the_holder() -> None:
    d = unlock(mk_lock("alice"), "alice")
    assert d.outcome is LockOutcome.RELEASED
    assert d.ok and d.changed
    assert d.lock is None
    assert d.event == LockEvent(file_id=FID, kind=LockEventKind.RELEASED, holder="alice", by="alice", time=NOW)


def test_unlock_by_the_holder_with_force_is_a_plain_release() -> None:
    d = unlock(mk_lock("alice"), "alice", force=True)
    assert d.outcome is LockOutcome.RELEASED
    assert d.event is not None and d.event.kind is LockEventKind.RELEASED


def test_unlock_by_another_device_is_refused() -> None:
    bobs = mk_lock("bob")
    d = unlock(bobs, "alice")
    assert d.outcome is LockOutcome.NOT_HOLDER
    assert d.outcome in EXIT_LOCKED_OUTCOMES
    assert not d.ok and not d.changed
    assert d.lock is bobs
    assert d.event is None
    assert "bob" in d.message and "alice" in d.message and "--force" in d.message
    assert describe(bobs) in d.message


def test_forced_unlock_records_who_broke_whose_lock() -> None:
    d = unlock(mk_lock("bob"), "alice", force=True)
    assert d.outcome is LockOutcome.FORCED
    assert d.outcome not in EXIT_LOCKED_OUTCOMES
    assert d.ok and d.changed
    assert d.lock is None
    assert d.event == LockEvent(file_id=FID, kind=LockEventKind.FORCED, holder="bob", by="alice", time=NOW,
                                note="painting the cape")
    assert "bob" in d.message and "alice" in d.message


@pytest.mark.parametrize("force", [False, True])
def test_unlock_when_not_locked(force: bool) -> None:
    d = unlock(None, "alice", force=force)
    assert d.outcome is LockOutcome.NOT_LOCKED
    assert d.ok and not d.changed
    assert d.lock is None and d.event is None
    assert FID in d.message


# -- outcomes and messages -------------------------------------------------------------------------


def test_exit_locked_outcomes() -> None:
    assert frozenset({LockOutcome.HELD, LockOutcome.NOT_HOLDER}) == EXIT_LOCKED_OUTCOMES


@pytest.mark.parametrize(
    ("outcome", "ok"),
    [
        (LockOutcome.GRANTED, True),
        (LockOutcome.RENEWED, True),
        (LockOutcome.RELEASED, True),
        (LockOutcome.FORCED, True),
        (LockOutcome.NOT_LOCKED, True),
        (LockOutcome.HELD, False),
        (LockOutcome.STALE, False),
        (LockOutcome.UNKNOWN, False),
        (LockOutcome.NOT_HOLDER, False),
    ],
)
def test_ok_per_outcome(outcome: LockOutcome, ok: bool) -> None:
    assert LockDecision(outcome, None, None, "").ok is ok


def test_describe() -> None:
    assert describe(mk_lock("bob", note="")) == "bob since 2023-11-14 22:13:20 UTC"
    assert describe(mk_lock("bob", expires_at=T0 + 90.0, note="cape")) == (
        'bob since 2023-11-14 22:13:20 UTC, until 2023-11-14 22:14:50 UTC ("cape")')
