"""Unit tests for schemas/rules.py: ancestry, the total order on heads, remote-head and start-up decisions, presence."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.messages import EMPTY_HASH, Head, Presence, PresenceState
from schemas.rules import (
    Relation,
    RemoteAction,
    Startup,
    at_startup,
    content_of,
    head_key,
    merge_same,
    next_vector,
    next_version,
    on_remote_head,
    presence_is_current,
    relation,
    supersedes,
    winner,
)

A = "a" * 64
B = "b" * 64
C = "c" * 64
D = "d" * 64
E = "e" * 64
L = "1" * 64  # some local content
PAGE = "f" * 64


def mk(
    version: int, hash_: str, author: str = "alice", *, deleted: bool = False,
    vector: dict[str, int] | None = None, parent: str | None = None,
) -> Head:
    common = {"file_id": "art/hero.png", "hash": hash_, "version": version, "author": author,
              "vector": vector or {}, "parent": parent}
    if deleted:
        return Head(size=0, deleted=True, **common)
    return Head(size=10, chunks=1, manifest=[PAGE], **common)


def edit(base: Head | None, device: str, hash_: str, *, deleted: bool = False, version: int | None = None) -> Head:
    """The head ``device`` publishes when it edits ``base`` (as an agent numbers and stamps it)."""
    version = next_version(base) if version is None else version
    return mk(version, hash_, device, deleted=deleted, vector=next_vector(base, device, version),
              parent=None if base is None else base.hash)


# -- total order --------------------------------------------------------------------------------------


def test_head_key_is_version_then_content_then_hash() -> None:
    assert head_key(mk(3, B)) == (3, True, B)
    assert head_key(mk(3, B, deleted=True)) == (3, False, B)


def test_content_beats_a_deletion_at_equal_version_whatever_the_hash() -> None:
    assert supersedes(mk(2, A), mk(2, C, deleted=True))
    assert not supersedes(mk(2, C, deleted=True), mk(2, A))
    assert supersedes(mk(3, A, deleted=True), mk(2, C))  # but a higher version still wins


def test_head_key_ignores_author_vector_and_parent() -> None:
    assert head_key(mk(2, A, "bob", vector={"bob": 2}, parent=B)) == head_key(mk(2, A, "carol"))


def test_winner() -> None:
    a, b = mk(2, A, "alice"), mk(2, B, "bob")
    assert winner(a, b) is b
    assert winner(b, a) is b
    assert winner(mk(3, A), b).version == 3
    assert winner(mk(2, C, deleted=True), a) is a
    twin = mk(2, A, "carol")  # equal keys: the first one is kept
    assert winner(a, twin) is a
    assert winner(twin, a) is twin


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


def test_next_vector() -> None:
    assert next_vector(None, "alice", 1) == {"alice": 1}
    base = mk(5, A, "bob", vector={"alice": 3, "bob": 5})
    assert next_vector(base, "alice", 6) == {"alice": 6, "bob": 5}
    assert next_vector(base, "carol", 6) == {"alice": 3, "bob": 5, "carol": 6}
    assert base.vector == {"alice": 3, "bob": 5}  # the base's vector is not modified
    assert next_vector(mk(5, A), "carol", 6) == {"carol": 6}  # a base without a vector (older agent)


# -- relation --------------------------------------------------------------------------------------


V5 = {"alice": 3, "bob": 5}


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param({"alice": 3, "bob": 5, "carol": 6}, V5, Relation.DESCENDS, id="one-edit-on-top"),
        pytest.param({"alice": 7, "bob": 5}, V5, Relation.DESCENDS, id="edit-by-an-earlier-author"),
        pytest.param({"alice": 8, "bob": 6, "carol": 7}, V5, Relation.DESCENDS, id="several-edits-on-top"),
        pytest.param(V5, {"alice": 3, "bob": 5, "carol": 6}, Relation.PRECEDES, id="older"),
        pytest.param({"alice": 3}, V5, Relation.PRECEDES, id="older-missing-an-entry"),
        pytest.param({"alice": 3, "bob": 5, "carol": 6}, {"alice": 3, "bob": 5, "dave": 6}, Relation.CONCURRENT,
                     id="two-edits-of-one-version"),
        pytest.param({"alice": 6, "bob": 5}, {"alice": 3, "bob": 6}, Relation.CONCURRENT, id="crossed"),
        pytest.param({"alice": 3, "bob": 5, "carol": 7}, {"alice": 3, "bob": 5, "dave": 6}, Relation.CONCURRENT,
                     id="different-versions-still-concurrent"),
        pytest.param(V5, V5, Relation.CONCURRENT, id="equal-vectors-different-content"),
        pytest.param({"carol": 1}, {"dave": 1}, Relation.CONCURRENT, id="two-first-versions"),
    ],
)
def test_relation_by_vectors(a: dict[str, int], b: dict[str, int], expected: Relation) -> None:
    ha, hb = mk(max(a.values()), A, vector=a), mk(max(b.values()), B, vector=b)
    assert relation(ha, hb) is expected
    mirrored = {Relation.DESCENDS: Relation.PRECEDES, Relation.PRECEDES: Relation.DESCENDS}.get(expected, expected)
    assert relation(hb, ha) is mirrored


def test_relation_vectors_beat_the_version_number_and_the_parent_link() -> None:
    # a lower version number that dominates by vector (a hand-made head) still descends
    assert relation(mk(2, A, vector={"alice": 2, "bob": 1}), mk(9, B, vector={"bob": 1})) is Relation.DESCENDS
    # a concurrent vector wins over a higher version number
    assert relation(mk(9, A, vector={"alice": 9}), mk(2, B, vector={"bob": 2})) is Relation.CONCURRENT


@pytest.mark.parametrize("vector", [{}, {"alice": 2}])
def test_relation_same_content_is_same_whatever_the_vectors(vector: dict[str, int]) -> None:
    assert relation(mk(2, A, "alice", vector=vector), mk(2, A, "bob", vector={"bob": 2})) is Relation.SAME
    assert relation(mk(2, A, "alice", vector=vector), mk(7, A, "bob")) is Relation.SAME


def test_relation_deletion_of_the_same_hash_is_not_same() -> None:
    live, gone = mk(2, A, vector={"alice": 2}), mk(3, A, "bob", deleted=True, vector={"alice": 2, "bob": 3})
    assert relation(gone, live) is Relation.DESCENDS
    assert relation(live, gone) is Relation.PRECEDES
    assert relation(gone, gone) is Relation.SAME


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param(mk(3, B, parent=A), mk(2, A), Relation.DESCENDS, id="parent-link"),
        pytest.param(mk(2, A), mk(3, B, parent=A), Relation.PRECEDES, id="child-link"),
        pytest.param(mk(2, B, parent=A), mk(2, A), Relation.DESCENDS, id="parent-link-beats-version"),
        pytest.param(mk(5, A, parent=C), mk(5, B, parent=C), Relation.CONCURRENT, id="siblings"),
        pytest.param(mk(4, A), mk(3, B), Relation.DESCENDS, id="higher-version"),
        pytest.param(mk(3, A), mk(4, B), Relation.PRECEDES, id="lower-version"),
        pytest.param(mk(3, A), mk(3, B), Relation.CONCURRENT, id="equal-version"),
        pytest.param(mk(4, A, vector={"alice": 4}), mk(3, B), Relation.DESCENDS, id="only-one-vector"),
        pytest.param(mk(3, A, vector={"alice": 3}), mk(3, B, "bob", vector={}), Relation.CONCURRENT,
                     id="only-one-vector-equal-version"),
        pytest.param(mk(4, A, parent=B, vector={"alice": 4}), mk(9, B), Relation.DESCENDS,
                     id="only-one-vector-parent-link"),
    ],
)
def test_relation_without_vectors_falls_back_on_parent_then_version(a: Head, b: Head, expected: Relation) -> None:
    assert relation(a, b) is expected


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
    base = mk(2, A, known_author, vector={known_author: 2})
    assert on_remote_head(edit(base, "bob", B), base, "me") is RemoteAction.APPLY


@pytest.mark.parametrize("known_author", ["bob", "carol"])
def test_remote_winning_a_tie_over_someone_elses_head_is_applied(known_author: str) -> None:
    assert on_remote_head(mk(2, B, "bob"), mk(2, A, known_author), "me") is RemoteAction.APPLY
    assert on_remote_head(mk(2, B, "bob", vector={"bob": 2}), mk(2, A, known_author, vector={known_author: 2}),
                          "me") is RemoteAction.APPLY


def test_remote_winning_a_tie_over_our_head_keeps_ours() -> None:
    assert on_remote_head(mk(2, B, "bob"), mk(2, A, "me"), "me") is RemoteAction.APPLY_KEEP_LOCAL
    v1 = mk(1, C, "carol", vector={"carol": 1})
    assert on_remote_head(edit(v1, "bob", B), edit(v1, "me", A), "me") is RemoteAction.APPLY_KEEP_LOCAL


def test_concurrent_remote_with_a_higher_version_over_our_head_keeps_ours() -> None:
    v1 = mk(1, C, "carol", vector={"carol": 1})
    theirs = edit(edit(v1, "bob", A), "carol", D)  # v3, built on bob's v2
    assert on_remote_head(theirs, edit(v1, "me", B), "me") is RemoteAction.APPLY_KEEP_LOCAL


def test_our_head_beating_the_retained_one_is_reasserted() -> None:
    assert on_remote_head(mk(2, B, "bob"), mk(3, A, "me"), "me") is RemoteAction.REASSERT
    assert on_remote_head(mk(3, A, "bob"), mk(3, B, "me"), "me") is RemoteAction.REASSERT  # tie-break


def test_someone_elses_head_beating_the_retained_one_is_ignored() -> None:
    assert on_remote_head(mk(2, B, "bob"), mk(3, A, "carol"), "me") is RemoteAction.IGNORE
    assert on_remote_head(mk(3, A, "bob"), mk(3, B, "carol"), "me") is RemoteAction.IGNORE


def test_our_head_losing_to_the_retained_one_is_not_reasserted_but_kept() -> None:
    assert on_remote_head(mk(3, B, "bob"), mk(3, A, "me"), "me") is RemoteAction.APPLY_KEEP_LOCAL


def test_a_descendant_of_our_head_is_applied_without_keeping_ours() -> None:
    ours = mk(3, A, "me", vector={"bob": 2, "me": 3})
    assert on_remote_head(edit(ours, "bob", B), ours, "me") is RemoteAction.APPLY
    assert on_remote_head(mk(4, B, "bob", parent=A), mk(3, A, "me"), "me") is RemoteAction.APPLY  # no vectors


def test_an_ancestor_of_our_head_is_reasserted_over() -> None:
    base = mk(3, A, "bob", vector={"bob": 3})
    assert on_remote_head(base, edit(base, "me", B), "me") is RemoteAction.REASSERT
    assert on_remote_head(base, edit(base, "carol", B), "me") is RemoteAction.IGNORE


def test_no_known_head_applies_whatever_the_remote() -> None:
    assert on_remote_head(mk(1, A, "me"), None, "me") is RemoteAction.APPLY
    assert on_remote_head(mk(4, A, "bob", deleted=True), None, "me") is RemoteAction.APPLY


def test_remote_delete_of_known_content_is_applied() -> None:
    assert on_remote_head(mk(3, A, "bob", deleted=True), mk(2, A, "bob"), "me") is RemoteAction.APPLY


def test_remote_deletions() -> None:
    base = mk(2, A, "carol", vector={"carol": 2})
    gone = edit(base, "bob", EMPTY_HASH, deleted=True)
    for me in ("me", "carol"):
        assert on_remote_head(gone, base, me) is RemoteAction.APPLY  # a deletion made from what we hold
        assert on_remote_head(gone, gone, me) is RemoteAction.IGNORE  # its echo
        assert on_remote_head(base, gone, me) is RemoteAction.IGNORE  # older content: not ours to reassert
    assert on_remote_head(base, gone, "bob") is RemoteAction.REASSERT  # our deletion stands over older content
    # two devices deleting the same version: the same absence, whatever the authors and vectors
    other = edit(base, "dave", EMPTY_HASH, deleted=True)
    assert relation(other, gone) is Relation.SAME
    assert on_remote_head(other, gone, "bob") is RemoteAction.IGNORE
    assert on_remote_head(gone, other, "dave") is RemoteAction.IGNORE
    # a file re-created after a deletion: the new content is applied
    again = edit(gone, "carol", B)
    assert on_remote_head(again, gone, "me") is RemoteAction.APPLY
    assert on_remote_head(again, gone, "bob") is RemoteAction.APPLY
    assert on_remote_head(gone, again, "carol") is RemoteAction.REASSERT


def test_a_concurrent_deletion_with_a_higher_version_over_our_edit_keeps_ours() -> None:
    v1 = mk(1, C, "carol", vector={"carol": 1})
    ours = edit(v1, "me", A)
    gone = edit(edit(v1, "bob", B), "bob", EMPTY_HASH, deleted=True)  # v3, built on bob's own v2
    assert relation(gone, ours) is Relation.CONCURRENT
    assert on_remote_head(gone, ours, "me") is RemoteAction.APPLY_KEEP_LOCAL
    assert on_remote_head(gone, ours, "carol") is RemoteAction.APPLY


def test_a_remote_edit_over_our_deletion() -> None:
    v1 = mk(1, C, "carol", vector={"carol": 1})
    ours = edit(v1, "me", EMPTY_HASH, deleted=True)
    theirs = edit(v1, "bob", B)  # concurrent, same version: content beats the deletion
    assert on_remote_head(theirs, ours, "me") is RemoteAction.APPLY_KEEP_LOCAL  # (nothing to keep: no content)
    assert on_remote_head(ours, theirs, "bob") is RemoteAction.REASSERT
    assert on_remote_head(ours, theirs, "carol") is RemoteAction.IGNORE


# -- at_startup --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "synced", "remote", "expected"),
    [
        pytest.param(None, None, None, Startup.NOTHING, id="no-remote-no-local"),
        pytest.param(L, None, None, Startup.PUBLISH_LOCAL, id="no-remote-local"),
        pytest.param(L, mk(1, L), None, Startup.PUBLISH_LOCAL, id="no-remote-synced-local"),
        # Was NOTHING: at_startup now treats a deletion as a head like any other, and no file here
        # agrees with the retained deletion, so the path is in sync (the agent records the tombstone
        # as its synced head, which it needs to tell a later local re-creation from a stale copy).
        pytest.param(None, None, mk(2, A, deleted=True), Startup.IN_SYNC, id="remote-deleted-no-local"),
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
        pytest.param(L, mk(2, A), mk(1, C), Startup.PUBLISH_LOCAL, id="local-edit-remote-older"),
        pytest.param(L, mk(2, B), mk(2, A), Startup.PUBLISH_LOCAL, id="local-edit-remote-loses-tie"),
        pytest.param(L, mk(2, A), mk(2, B), Startup.CONFLICT, id="local-edit-remote-wins-tie"),
    ],
)
def test_at_startup(local: str | None, synced: Head | None, remote: Head | None, expected: Startup) -> None:
    """Heads without vectors or parent links, none of them ours."""
    assert at_startup(local, synced, remote) is expected
    assert at_startup(local, synced, remote, "bob") is expected


GONE = EMPTY_HASH  # what agents put in a deletion's hash


@pytest.mark.parametrize(
    ("local", "synced", "remote", "expected"),
    [
        pytest.param(A, mk(2, A), mk(3, GONE, "bob", deleted=True), Startup.APPLY_REMOTE,
                     id="remote-deleted-local-unchanged"),
        pytest.param(L, mk(2, A), mk(3, GONE, "bob", deleted=True), Startup.PUBLISH_LOCAL,
                     id="remote-deleted-local-edited"),
        pytest.param(None, mk(2, A), mk(2, A), Startup.PUBLISH_LOCAL, id="local-deleted-remote-unchanged"),
        pytest.param(None, mk(2, A), mk(3, B, "bob"), Startup.APPLY_REMOTE, id="local-deleted-remote-edited"),
        pytest.param(None, mk(2, A), mk(3, GONE, "bob", deleted=True), Startup.IN_SYNC, id="both-deleted"),
        pytest.param(None, mk(3, GONE, deleted=True), mk(3, GONE, deleted=True), Startup.IN_SYNC,
                     id="deletion-synced-still-absent"),
        pytest.param(L, None, mk(2, GONE, "bob", deleted=True), Startup.PUBLISH_LOCAL,
                     id="first-run-remote-deleted-local-file"),
        pytest.param(None, None, mk(2, GONE, "bob", deleted=True), Startup.IN_SYNC, id="first-run-both-absent"),
        pytest.param(L, mk(3, GONE, deleted=True), mk(3, GONE, deleted=True), Startup.PUBLISH_LOCAL,
                     id="re-created-here-after-a-synced-deletion"),
        pytest.param(None, mk(3, GONE, deleted=True), mk(4, B, "bob"), Startup.APPLY_REMOTE,
                     id="re-created-there-after-a-synced-deletion"),
        pytest.param(L, mk(3, GONE, deleted=True), mk(4, B, "bob"), Startup.CONFLICT,
                     id="re-created-on-both-sides"),
        pytest.param(B, mk(3, GONE, deleted=True), mk(4, B, "bob"), Startup.IN_SYNC,
                     id="re-created-alike-on-both-sides"),
        pytest.param(L, mk(3, A), mk(2, GONE, "bob", deleted=True), Startup.PUBLISH_LOCAL,
                     id="edited-here-broker-holds-an-older-deletion"),
        pytest.param(A, mk(3, A), mk(3, GONE, "bob", deleted=True), Startup.PUBLISH_LOCAL,
                     id="concurrent-deletion-loses-the-tie-to-content"),
        pytest.param(None, mk(2, A), None, Startup.NOTHING, id="deleted-here-no-remote"),
        pytest.param(None, mk(2, GONE, deleted=True), None, Startup.NOTHING, id="deletion-synced-no-remote"),
    ],
)
def test_at_startup_with_deletions(local: str | None, synced: Head | None, remote: Head | None,
                                   expected: Startup) -> None:
    """A deletion is a head like any other, and local_hash None is no file; an edit beats a deletion."""
    for me in ("", "alice", "carol"):
        assert at_startup(local, synced, remote, me) is expected


def test_at_startup_with_deletions_and_vectors() -> None:
    deleted = edit(V5_HEAD, "bob", GONE, deleted=True)
    edited = edit(V5_HEAD, "bob", B)
    for me in ("alice", "carol"):
        assert at_startup(L, V5_HEAD, deleted, me) is Startup.APPLY_REMOTE  # unchanged here: follow the deletion
        assert at_startup(C, V5_HEAD, deleted, me) is Startup.PUBLISH_LOCAL  # edited here: the edit wins
        assert at_startup(None, V5_HEAD, V5_HEAD, me) is Startup.PUBLISH_LOCAL  # deleted here only
        assert at_startup(None, V5_HEAD, edited, me) is Startup.APPLY_REMOTE  # deleted here, edited there
        assert at_startup(None, V5_HEAD, deleted, me) is Startup.IN_SYNC  # deleted on both sides
    # our deletion, published and then overtaken by a later edit built on it: apply the edit
    ours = edit(V5_HEAD, "alice", GONE, deleted=True)
    assert at_startup(None, ours, edit(ours, "bob", B), "alice") is Startup.APPLY_REMOTE
    # our deletion lost to a concurrent edit with a higher version: nothing here to keep, apply it
    theirs = edit(edit(V5_HEAD, "bob", A), "carol", B)
    assert at_startup(None, ours, theirs, "alice") is Startup.APPLY_REMOTE


def test_at_startup_our_unchanged_edit_overtaken_by_a_concurrent_deletion_is_kept() -> None:
    """Our published v6 lost to a deletion (v7) built on a concurrent v6: keep our content as a copy."""
    ours = edit(V5_HEAD, "alice", A)
    theirs = edit(edit(V5_HEAD, "bob", B), "carol", GONE, deleted=True)
    assert relation(theirs, ours) is Relation.CONCURRENT
    assert at_startup(A, ours, theirs, "alice") is Startup.CONFLICT
    assert at_startup(A, ours, theirs, "carol") is Startup.APPLY_REMOTE


def test_content_of() -> None:
    assert content_of(None) is None
    assert content_of(mk(2, A)) == A
    assert content_of(mk(2, A, deleted=True)) is None
    assert content_of(mk(2, GONE, deleted=True)) is None
    empty = Head(file_id="art/e.txt", hash=EMPTY_HASH, size=0, version=1, author="alice")
    assert content_of(empty) == EMPTY_HASH  # an empty file is content, not absence


def test_at_startup_tells_an_empty_file_from_a_deletion() -> None:
    empty = Head(file_id="art/hero.png", hash=EMPTY_HASH, size=0, version=2, author="bob")
    assert at_startup(EMPTY_HASH, None, empty) is Startup.IN_SYNC
    assert at_startup(None, None, empty) is Startup.APPLY_REMOTE  # create the empty file
    gone = mk(3, GONE, "bob", deleted=True)
    assert at_startup(EMPTY_HASH, empty, gone) is Startup.APPLY_REMOTE  # delete the (unchanged) empty file
    assert at_startup(EMPTY_HASH, None, gone) is Startup.PUBLISH_LOCAL  # an empty file here, none there


def test_at_startup_our_unchanged_head_losing_a_tie_is_a_conflict() -> None:
    assert at_startup(L, mk(2, L, "alice"), mk(2, B, "bob"), "alice") is Startup.CONFLICT
    assert at_startup(L, mk(2, L, "alice"), mk(2, B, "bob"), "carol") is Startup.APPLY_REMOTE


# -- conflict scenarios: every device converges, only losing authors keep a copy -------------------


V5_HEAD = mk(5, L, "alice", vector={"alice": 5, "bob": 2})
OBSERVER = "dave"


def deliver(me: str, known: Head | None, arrivals: Sequence[Head]) -> tuple[Head | None, list[RemoteAction]]:
    """Fold the heads arriving at device ``me`` (its own echoes included) through on_remote_head."""
    actions = []
    for head in arrivals:
        action = on_remote_head(head, known, me)
        actions.append(action)
        if action in {RemoteAction.APPLY, RemoteAction.APPLY_KEEP_LOCAL}:
            known = head
    return known, actions


def fold_supersedes(arrivals: Sequence[Head]) -> Head | None:
    known: Head | None = None
    for head in arrivals:
        if supersedes(head, known):
            known = head
    return known


@pytest.mark.parametrize(
    "hashes",
    [pytest.param(p, id="-".join(h[0] for h in p)) for n in (2, 3) for p in itertools.permutations([A, B, C][:n])],
)
def test_edit_vs_edit_converges_in_any_arrival_order(hashes: tuple[str, ...]) -> None:
    """Two or three devices edit v5 concurrently: each publishes a v6, the highest hash wins everywhere."""
    devices = ["alice", "bob", "carol"][: len(hashes)]
    heads = {dev: edit(V5_HEAD, dev, h) for dev, h in zip(devices, hashes, strict=True)}
    assert all(h.version == 6 for h in heads.values())
    for a, b in itertools.permutations(heads.values(), 2):
        assert relation(a, b) is Relation.CONCURRENT
    best = max(heads.values(), key=head_key)
    assert best.hash == C if len(hashes) == 3 else best.hash == B
    for order in itertools.permutations(heads.values()):
        assert fold_supersedes(order) == best
        for dev in [*devices, OBSERVER]:
            start = heads.get(dev, V5_HEAD)
            final, actions = deliver(dev, start, order)
            assert final == best, (dev, [h.author for h in order])
            kept = actions.count(RemoteAction.APPLY_KEEP_LOCAL)
            assert kept == (1 if dev in heads and heads[dev] != best else 0), (dev, [h.author for h in order])


def test_edit_vs_edit_the_winner_reasserts_over_a_retained_loser() -> None:
    ours, theirs = edit(V5_HEAD, "alice", C), edit(V5_HEAD, "bob", A)
    assert on_remote_head(theirs, ours, "alice") is RemoteAction.REASSERT
    assert on_remote_head(ours, theirs, "bob") is RemoteAction.APPLY_KEEP_LOCAL
    assert on_remote_head(theirs, ours, "carol") is RemoteAction.IGNORE
    assert on_remote_head(ours, theirs, "carol") is RemoteAction.APPLY


def test_edit_vs_delete_a_concurrent_deletion_loses() -> None:
    edited = edit(V5_HEAD, "alice", A)
    deleted = edit(V5_HEAD, "bob", C, deleted=True)  # with the higher hash
    assert edited.version == deleted.version == 6
    assert relation(edited, deleted) is Relation.CONCURRENT
    assert winner(edited, deleted) is edited
    assert winner(deleted, edited) is edited
    assert on_remote_head(deleted, edited, "alice") is RemoteAction.REASSERT
    assert on_remote_head(deleted, edited, "carol") is RemoteAction.IGNORE
    # bob's deletion lost; there is no content to keep, the file comes back with alice's edit
    assert on_remote_head(edited, deleted, "bob") is RemoteAction.APPLY_KEEP_LOCAL
    assert on_remote_head(edited, deleted, "carol") is RemoteAction.APPLY
    for order in itertools.permutations([edited, deleted]):
        for dev in ("alice", "bob", OBSERVER):
            assert deliver(dev, V5_HEAD, order)[0] == edited


def test_edit_vs_delete_a_deletion_made_after_the_edit_wins() -> None:
    edited = edit(V5_HEAD, "alice", C)
    deleted = edit(edited, "bob", A, deleted=True)
    assert deleted.version == 7
    assert relation(deleted, edited) is Relation.DESCENDS
    assert winner(edited, deleted) is deleted
    assert on_remote_head(deleted, edited, "alice") is RemoteAction.APPLY  # not a conflict: bob saw alice's edit
    assert on_remote_head(edited, deleted, "bob") is RemoteAction.REASSERT
    assert on_remote_head(edited, deleted, "carol") is RemoteAction.IGNORE
    for order in itertools.permutations([edited, deleted]):
        for dev in ("alice", "bob", OBSERVER):
            assert deliver(dev, V5_HEAD, order)[0] == deleted


# -- edit while offline vs edit online (at_startup with vectors) -----------------------------------


def test_offline_edit_meeting_a_newer_published_version_is_a_conflict() -> None:
    online = edit(V5_HEAD, "bob", B)
    assert relation(online, V5_HEAD) is Relation.DESCENDS
    for me in ("alice", "carol"):
        assert at_startup(C, V5_HEAD, online, me) is Startup.CONFLICT
    assert at_startup(L, V5_HEAD, online, "carol") is Startup.APPLY_REMOTE  # no offline edit: fast-forward
    assert at_startup(B, V5_HEAD, online, "carol") is Startup.IN_SYNC  # the same edit made on both sides


def test_our_published_version_that_lost_a_race_while_offline_is_a_conflict() -> None:
    ours, theirs = edit(V5_HEAD, "alice", A), edit(V5_HEAD, "bob", B)  # bob's hash wins the tie
    assert at_startup(A, ours, theirs, "alice") is Startup.CONFLICT
    assert at_startup(A, ours, edit(theirs, "carol", C), "alice") is Startup.CONFLICT  # and was built on
    assert at_startup(A, ours, edit(ours, "bob", B), "alice") is Startup.APPLY_REMOTE  # built on ours: no loss
    assert at_startup(A, ours, theirs, "carol") is Startup.APPLY_REMOTE  # the synced head was not ours
    assert at_startup(D, ours, theirs, "alice") is Startup.CONFLICT  # and edited here since


def test_at_startup_remote_older_than_synced_publishes_local() -> None:
    synced = edit(V5_HEAD, "alice", A)
    assert at_startup(D, synced, V5_HEAD, "alice") is Startup.PUBLISH_LOCAL  # local edit on top of synced v6
    assert at_startup(A, synced, V5_HEAD, "alice") is Startup.PUBLISH_LOCAL  # unchanged: re-publish v6
    assert at_startup(D, synced, V5_HEAD, "carol") is Startup.PUBLISH_LOCAL


def test_at_startup_synced_head_that_won_a_race_stands() -> None:
    ours, theirs = edit(V5_HEAD, "alice", C), edit(V5_HEAD, "bob", A)  # ours wins the tie
    assert at_startup(C, ours, theirs, "alice") is Startup.PUBLISH_LOCAL  # the broker retained the loser
    assert at_startup(D, ours, theirs, "alice") is Startup.PUBLISH_LOCAL  # a local edit on top of the winner


# -- three devices ---------------------------------------------------------------------------------


def test_three_devices_build_on_a_concurrent_version() -> None:
    """A and B both edit v5; C builds v7 on B's v6.  A's v6 (which beat B's) must be kept by A in any order."""
    a6, b6 = edit(V5_HEAD, "alice", C), edit(V5_HEAD, "bob", A)
    c7 = edit(b6, "carol", B)
    assert winner(a6, b6) is a6
    assert relation(c7, b6) is Relation.DESCENDS
    assert relation(c7, a6) is Relation.CONCURRENT
    best = max([a6, b6, c7], key=head_key)
    assert best is c7
    for order in itertools.permutations([a6, b6, c7]):
        by = [h.author for h in order]
        final, actions = deliver("alice", a6, order)
        assert final == c7, by
        assert actions.count(RemoteAction.APPLY_KEEP_LOCAL) == 1, by
        assert deliver("carol", c7, order) == (c7, [RemoteAction.IGNORE if h is c7 else RemoteAction.REASSERT
                                                    for h in order])
        assert RemoteAction.APPLY_KEEP_LOCAL not in deliver(OBSERVER, V5_HEAD, order)[1], by
        assert deliver(OBSERVER, V5_HEAD, order)[0] == c7
        assert deliver("bob", b6, order)[0] == c7, by
    assert on_remote_head(c7, b6, "bob") is RemoteAction.APPLY  # bob's edit lives on in c7: nothing to keep
    assert at_startup(C, a6, c7, "alice") is Startup.CONFLICT
    assert at_startup(A, b6, c7, "bob") is Startup.APPLY_REMOTE


def test_identical_concurrent_edits_do_not_make_a_later_edit_a_conflict() -> None:
    """Alice and bob publish the same content as v6 (SAME: both keep their own head, folding in the
    other's history); alice then edits.  Her v7 descends from both v6s: bob simply applies it."""
    a6, b6 = edit(V5_HEAD, "alice", D), edit(V5_HEAD, "bob", D)
    assert on_remote_head(a6, b6, "bob") is RemoteAction.IGNORE
    a6m = merge_same(a6, b6)
    assert merge_same(b6, a6).vector == a6m.vector == {"alice": 6, "bob": 6}
    a7 = edit(a6m, "alice", A)
    assert relation(a7, b6) is Relation.DESCENDS
    assert on_remote_head(a7, b6, "bob") is RemoteAction.APPLY
    assert at_startup(D, b6, a7, "bob") is Startup.APPLY_REMOTE


def test_a_restored_old_content_is_still_concurrent_with_an_edit() -> None:
    """Alice deletes v5 and puts its content back (v7) while bob edits v5 (v6): content equal to
    bob's parent does not make alice's v7 an ancestor of bob's edit."""
    gone = edit(V5_HEAD, "alice", EMPTY_HASH).model_copy(update={"deleted": True, "size": 0})
    a7 = edit(gone, "alice", V5_HEAD.hash)
    b6 = edit(V5_HEAD, "bob", B)
    assert relation(a7, b6) is Relation.CONCURRENT
    assert on_remote_head(a7, b6, "bob") is RemoteAction.APPLY_KEEP_LOCAL


def test_merge_same_keeps_the_head_and_takes_the_max() -> None:
    a6, b6 = edit(V5_HEAD, "alice", D), edit(V5_HEAD, "bob", D)
    m = merge_same(a6, b6)
    assert (m.version, m.hash, m.author) == (a6.version, a6.hash, a6.author)
    assert merge_same(a6, a6) is a6
    assert merge_same(a6, mk(6, D)) is a6  # no vector to fold in


@st.composite
def _histories(draw: st.DrawFn) -> tuple[list[Head], dict[int, set[int]]]:
    """Heads made by random devices editing random bases (or starting afresh), each numbered one above
    every version its author has seen; with the index of each head's true ancestors."""
    n = draw(st.integers(1, 14))
    hashes = draw(st.lists(st.integers(0, 2**256 - 1), min_size=n, max_size=n, unique=True))
    seen: dict[str, list[Head]] = {}
    heads: list[Head] = []
    ancestors: dict[int, set[int]] = {}
    for i, h in enumerate(hashes):
        device = draw(st.sampled_from(["a", "b", "c", "d"]))
        base_i = draw(st.one_of(st.none(), st.integers(0, len(heads) - 1))) if heads else None
        base = None if base_i is None else heads[base_i]
        also = draw(st.lists(st.sampled_from(heads), max_size=3)) if heads else []
        known = seen.setdefault(device, [])
        known.extend(x for x in [base, *also] if x is not None)
        version = next_version(base, *known)
        head = mk(version, f"{h:064x}", device, deleted=draw(st.booleans()),
                  vector=next_vector(base, device, version), parent=None if base is None else base.hash)
        known.append(head)
        heads.append(head)
        ancestors[i] = set() if base_i is None else {base_i, *ancestors[base_i]}
    return heads, ancestors


@given(history=_histories())
def test_the_winner_is_never_an_ancestor_of_another_head(history: tuple[list[Head], dict[int, set[int]]]) -> None:
    heads, ancestors = history
    best = max(heads, key=head_key)
    for other in heads:
        assert relation(best, other) is not Relation.PRECEDES
        assert relation(other, best) is not Relation.DESCENDS
    for i, older in ancestors.items():
        for j in older:
            assert relation(heads[i], heads[j]) is Relation.DESCENDS
            assert relation(heads[j], heads[i]) is Relation.PRECEDES
            assert supersedes(heads[i], heads[j])


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
