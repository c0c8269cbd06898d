"""Unit tests for schemas/rules.py: the total order on heads, remote-head and start-up decisions, presence."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.messages import Head, Presence, PresenceState
from schemas.rules import (
    RemoteAction,
    Startup,
    at_startup,
    head_key,
    next_version,
    on_remote_head,
    presence_is_current,
    supersedes,
)

A = "a" * 64
B = "b" * 64
C = "c" * 64
L = "1" * 64  # some local content
PAGE = "f" * 64


def mk(version: int, hash_: str, author: str = "alice", *, deleted: bool = False) -> Head:
    if deleted:
        return Head(file_id="art/hero.png", hash=hash_, size=0, version=version, author=author, deleted=True)
    return Head(file_id="art/hero.png", hash=hash_, size=10, version=version, author=author, chunks=1, manifest=[PAGE])


# -- total order --------------------------------------------------------------------------------------


def test_head_key_is_version_then_hash() -> None:
    assert head_key(mk(3, B)) == (3, B)


def test_higher_version_wins_whatever_the_hash() -> None:
    assert supersedes(mk(2, A), mk(1, C))
    assert not supersedes(mk(1, C), mk(2, A))


def test_equal_versions_tie_break_on_hash() -> None:
    assert supersedes(mk(2, B, "bob"), mk(2, A, "alice"))
    assert not supersedes(mk(2, A, "alice"), mk(2, B, "bob"))


def test_supersedes_is_strict() -> None:
    assert not supersedes(mk(2, A), mk(2, A))
    assert not supersedes(mk(2, A, "bob"), mk(2, A, "alice"))


def test_anything_supersedes_nothing() -> None:
    assert supersedes(mk(1, A), None)


def test_next_version() -> None:
    assert next_version() == 1
    assert next_version(None, None) == 1
    assert next_version(mk(3, A), None, mk(5, B)) == 6


_keys = st.sets(st.tuples(st.integers(1, 6), st.sampled_from([A, B, C, L])), min_size=1, max_size=12)


@given(keys=_keys, seed=st.integers(0, 2**32 - 1))
def test_all_devices_pick_the_same_winner_in_any_arrival_order(keys: set[tuple[int, str]], seed: int) -> None:
    """Each device keeps a head only if it supersedes what it knows: the result never depends on order."""
    heads = [mk(v, h, author=f"dev{i}") for i, (v, h) in enumerate(sorted(keys))]
    expected = max(heads, key=head_key)
    rng = random.Random(seed)
    for _device in range(5):
        order = heads[:]
        rng.shuffle(order)
        known: Head | None = None
        for h in order:
            if supersedes(h, known):
                known = h
        assert known == expected


@given(keys=_keys)
def test_supersedes_is_a_strict_total_order(keys: set[tuple[int, str]]) -> None:
    heads = [mk(v, h) for v, h in keys]
    for a, b in itertools.product(heads, repeat=2):
        if a is b:
            assert not supersedes(a, b)
        else:
            assert supersedes(a, b) != supersedes(b, a)
    for a, b, c in itertools.product(heads, repeat=3):
        if supersedes(a, b) and supersedes(b, c):
            assert supersedes(a, c)


# -- on_remote_head --------------------------------------------------------------------------------------


def test_remote_with_known_hash_is_ignored() -> None:
    assert on_remote_head(mk(2, A, "bob"), mk(2, A, "bob"), "me") is RemoteAction.IGNORE
    assert on_remote_head(mk(1, A, "bob"), mk(3, A, "me"), "me") is RemoteAction.IGNORE
    assert on_remote_head(mk(5, A, "bob"), mk(3, A, "me"), "me") is RemoteAction.IGNORE


def test_first_remote_head_is_applied() -> None:
    assert on_remote_head(mk(1, A, "bob"), None, "me") is RemoteAction.APPLY


@pytest.mark.parametrize("known_author", ["me", "bob", "carol"])
def test_newer_remote_is_applied(known_author: str) -> None:
    assert on_remote_head(mk(3, B, "bob"), mk(2, A, known_author), "me") is RemoteAction.APPLY
    assert on_remote_head(mk(2, B, "bob"), mk(2, A, known_author), "me") is RemoteAction.APPLY  # tie-break


def test_our_head_beating_the_retained_one_is_reasserted() -> None:
    assert on_remote_head(mk(2, B, "bob"), mk(3, A, "me"), "me") is RemoteAction.REASSERT
    assert on_remote_head(mk(3, A, "bob"), mk(3, B, "me"), "me") is RemoteAction.REASSERT  # tie-break


def test_someone_elses_head_beating_the_retained_one_is_ignored() -> None:
    assert on_remote_head(mk(2, B, "bob"), mk(3, A, "carol"), "me") is RemoteAction.IGNORE
    assert on_remote_head(mk(3, A, "bob"), mk(3, B, "carol"), "me") is RemoteAction.IGNORE


def test_our_head_losing_to_the_retained_one_is_not_reasserted() -> None:
    assert on_remote_head(mk(3, B, "bob"), mk(3, A, "me"), "me") is RemoteAction.APPLY


def test_remote_delete_of_known_content_is_applied() -> None:
    assert on_remote_head(mk(3, A, "bob", deleted=True), mk(2, A, "bob"), "me") is RemoteAction.APPLY


# -- at_startup --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "synced", "remote", "expected"),
    [
        pytest.param(None, None, None, Startup.NOTHING, id="no-remote-no-local"),
        pytest.param(L, None, None, Startup.PUBLISH_LOCAL, id="no-remote-local"),
        pytest.param(L, mk(1, L), None, Startup.PUBLISH_LOCAL, id="no-remote-synced-local"),
        pytest.param(None, None, mk(2, A, deleted=True), Startup.NOTHING, id="remote-deleted-no-local"),
        pytest.param(L, None, mk(2, A, deleted=True), Startup.PUBLISH_LOCAL, id="remote-deleted-local"),
        pytest.param(None, None, mk(2, A), Startup.APPLY_REMOTE, id="no-local"),
        pytest.param(None, mk(1, B), mk(2, A), Startup.APPLY_REMOTE, id="no-local-synced-before"),
        pytest.param(A, None, mk(2, A), Startup.IN_SYNC, id="equal-first-run"),
        pytest.param(A, mk(1, B), mk(2, A), Startup.IN_SYNC, id="equal-after-both-changed-alike"),
        pytest.param(L, None, mk(2, A), Startup.CONFLICT, id="first-run-differing"),
        pytest.param(L, mk(1, L), mk(2, A), Startup.APPLY_REMOTE, id="unchanged-local-newer-remote"),
        pytest.param(L, mk(3, L), mk(2, A), Startup.PUBLISH_LOCAL, id="unchanged-local-older-remote"),
        pytest.param(L, mk(2, L), mk(2, B), Startup.APPLY_REMOTE, id="unchanged-local-remote-wins-tie"),
        pytest.param(B, mk(2, B), mk(2, A), Startup.PUBLISH_LOCAL, id="unchanged-local-remote-loses-tie"),
        pytest.param(L, mk(2, A), mk(2, A), Startup.PUBLISH_LOCAL, id="local-edit-remote-unchanged"),
        pytest.param(L, mk(2, A), mk(3, B), Startup.CONFLICT, id="both-changed"),
        pytest.param(L, mk(2, A), mk(1, C), Startup.CONFLICT, id="both-changed-remote-older"),
    ],
)
def test_at_startup(local: str | None, synced: Head | None, remote: Head | None, expected: Startup) -> None:
    assert at_startup(local, synced, remote) is expected


# -- presence ------------------------------------------------------------------------------------------------


def pres(epoch: int, state: PresenceState) -> Presence:
    return Presence(device="bob", state=state, epoch=epoch)


ON, OFF = PresenceState.ONLINE, PresenceState.OFFLINE


@pytest.mark.parametrize("state", [ON, OFF])
def test_first_presence_is_current(state: PresenceState) -> None:
    assert presence_is_current(pres(1, state), None)


def test_late_last_will_after_reconnect_is_ignored() -> None:
    assert not presence_is_current(pres(4, OFF), pres(5, ON))


@pytest.mark.parametrize(("new", "current"), [(ON, ON), (ON, OFF), (OFF, ON), (OFF, OFF)])
def test_newer_epoch_is_accepted(new: PresenceState, current: PresenceState) -> None:
    assert presence_is_current(pres(6, new), pres(5, current))


@pytest.mark.parametrize(("new", "current"), [(ON, ON), (ON, OFF), (OFF, ON), (OFF, OFF)])
def test_older_epoch_is_ignored(new: PresenceState, current: PresenceState) -> None:
    assert not presence_is_current(pres(4, new), pres(5, current))


def test_same_epoch_offline_wins() -> None:
    assert presence_is_current(pres(5, OFF), pres(5, ON))
    assert presence_is_current(pres(5, OFF), pres(5, OFF))
    assert not presence_is_current(pres(5, ON), pres(5, OFF))  # a duplicate "online" after the Will
    assert presence_is_current(pres(5, ON), pres(5, ON))
