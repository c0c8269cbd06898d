"""Unit tests for schemas/topics.py: the public topic names (DESIGN §3) and the hostile-topic parser."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.topics import (
    ROOT,
    ParsedTopic,
    TopicError,
    TopicKind,
    all_conflicts_filter,
    all_heads_filter,
    all_locks_filter,
    all_presence_filter,
    conflict_topic,
    device_data_topic,
    device_request_topic,
    file_key,
    head_topic,
    hub_data_topic,
    hub_request_topic,
    lock_topic,
    parse_topic,
    presence_topic,
    reply_topic,
)

# -- the three public topics, spelled exactly as DESIGN §3 -------------------------------------


def test_root_is_atrius_v1() -> None:
    assert ROOT == "atrius/v1"


def test_presence_topic_exact() -> None:
    assert presence_topic("my-game", "alice-pc") == "atrius/v1/my-game/presence/alice-pc"


def test_head_topic_exact() -> None:
    assert head_topic("my-game", "art/hero.png") == "atrius/v1/my-game/files/art%2Fhero.png/head"


def test_lock_topic_exact() -> None:
    assert lock_topic("my-game", "art/hero.png") == "atrius/v1/my-game/files/art%2Fhero.png/lock"


def test_conflict_topic_exact() -> None:
    assert conflict_topic("my-game", "art/hero.png") == "atrius/v1/my-game/files/art%2Fhero.png/conflict"
    assert conflict_topic("s", "a b/c+d#e.png") == "atrius/v1/s/files/a%20b%2Fc%2Bd%23e.png/conflict"


@pytest.mark.parametrize(
    ("file_id", "key"),
    [
        ("art/hero.png", "art%2Fhero.png"),
        ("hero.png", "hero.png"),
        ("a b/c+d#e.png", "a%20b%2Fc%2Bd%23e.png"),  # MQTT wildcards never appear raw in a key
        ("Ünï/ß.png", "%C3%9Cn%C3%AF%2F%C3%9F.png"),
        ("100%.txt", "100%25.txt"),
        ("a~b_c-d.e", "a~b_c-d.e"),
    ],
)
def test_file_key_is_quote_with_no_safe_characters(file_id: str, key: str) -> None:
    assert file_key(file_id) == key
    assert file_key(file_id) == quote(file_id, safe="")
    assert "/" not in file_key(file_id)


def test_subscription_filters() -> None:
    assert all_heads_filter("my-game") == "atrius/v1/my-game/files/+/head"
    assert all_heads_filter() == "atrius/v1/+/files/+/head"
    assert all_presence_filter("my-game") == "atrius/v1/my-game/presence/+"


def test_lock_and_conflict_filters() -> None:
    assert all_locks_filter("my-game") == "atrius/v1/my-game/files/+/lock"
    assert all_locks_filter() == "atrius/v1/+/files/+/lock"
    assert all_conflicts_filter("my-game") == "atrius/v1/my-game/files/+/conflict"
    assert all_conflicts_filter() == "atrius/v1/+/files/+/conflict"
    # each filter matches its own topic, level for level, and no other kind
    for make, flt in [(lock_topic, all_locks_filter), (conflict_topic, all_conflicts_filter),
                      (head_topic, all_heads_filter)]:
        topic, pattern = make("g", "art/hero.png").split("/"), flt("g").split("/")
        assert len(topic) == len(pattern)
        assert all(p in {"+", t} for t, p in zip(topic, pattern, strict=True))


def test_reply_topic_names_device_or_hub() -> None:
    assert reply_topic("s", "bob") == device_data_topic("s", "bob")
    assert reply_topic("s", None) == hub_data_topic("s")


# -- parse_topic round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (presence_topic("my-game", "alice-pc"), ParsedTopic(TopicKind.PRESENCE, "my-game", device="alice-pc")),
        (head_topic("my-game", "art/hero.png"), ParsedTopic(TopicKind.HEAD, "my-game", file_id="art/hero.png")),
        (lock_topic("my-game", "art/hero.png"), ParsedTopic(TopicKind.LOCK, "my-game", file_id="art/hero.png")),
        (conflict_topic("my-game", "art/hero.png"),
         ParsedTopic(TopicKind.CONFLICT, "my-game", file_id="art/hero.png")),
        (device_request_topic("g", "bob"), ParsedTopic(TopicKind.DEVICE_REQUEST, "g", device="bob")),
        (device_data_topic("g", "bob"), ParsedTopic(TopicKind.DEVICE_DATA, "g", device="bob")),
        (hub_request_topic("g"), ParsedTopic(TopicKind.HUB_REQUEST, "g")),
        (hub_data_topic("g"), ParsedTopic(TopicKind.HUB_DATA, "g")),
    ],
)
def test_parse_round_trips_every_builder(topic: str, expected: ParsedTopic) -> None:
    assert parse_topic(topic) == expected


@pytest.mark.parametrize(
    "file_id", ["art/hero.png", "Ünï/ß.png", "a b/c+d#e.png", "100%.txt", "x/y/z/w.bin", "..a/b.."]
)
def test_parse_head_lock_and_conflict_round_trip_file_ids(file_id: str) -> None:
    assert parse_topic(head_topic("s", file_id)).file_id == file_id
    assert parse_topic(lock_topic("s", file_id)).file_id == file_id
    assert parse_topic(conflict_topic("s", file_id)).file_id == file_id


def test_parse_conflict_topic() -> None:
    assert parse_topic("atrius/v1/s/files/art%2Fhero.png/conflict") == ParsedTopic(
        TopicKind.CONFLICT, "s", file_id="art/hero.png")
    assert TopicKind.CONFLICT.value == "conflict"


_name = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z").filter(lambda s: s not in {".", ".."})
_segment = st.text(
    alphabet=st.characters(min_codepoint=32, exclude_characters="/\\" + "".join(map(chr, range(127, 160))),
                            exclude_categories=["Cs"]),
    min_size=1,
    max_size=20,
).filter(lambda s: s not in {".", ".."})
_file_id = st.lists(_segment, min_size=1, max_size=4).map("/".join).filter(lambda s: len(s) <= 512)


@given(space=_name, device=_name, file_id=_file_id)
def test_parse_round_trip_property(space: str, device: str, file_id: str) -> None:
    assert parse_topic(presence_topic(space, device)) == ParsedTopic(TopicKind.PRESENCE, space, device=device)
    assert parse_topic(head_topic(space, file_id)) == ParsedTopic(TopicKind.HEAD, space, file_id=file_id)
    assert parse_topic(lock_topic(space, file_id)) == ParsedTopic(TopicKind.LOCK, space, file_id=file_id)
    assert parse_topic(conflict_topic(space, file_id)) == ParsedTopic(TopicKind.CONFLICT, space, file_id=file_id)


# -- hostile and invalid topics ------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        # wrong root or version
        "atrius/v2/s/presence/alice",
        "Atrius/v1/s/presence/alice",
        "other/v1/s/presence/alice",
        "/atrius/v1/s/presence/alice",
        "atrius/v1",
        "atrius/v1/s",
        "",
        # extra or missing levels
        "atrius/v1/s/presence/alice/extra",
        "atrius/v1/s/presence",
        "atrius/v1/s/files/art%2Fhero.png/head/extra",
        "atrius/v1/s/files/art%2Fhero.png",
        "atrius/v1/s/files/art/hero.png/head",  # unencoded '/' makes an extra level
        "atrius/v1/s/hub/req/extra",
        "atrius/v1/s/dev/bob/req/extra",
        "atrius/v1/s/files/x/meta",
        "atrius/v1/s/unknown/x",
        # non-canonical key encodings
        "atrius/v1/s/files/art%2fhero.png/head",  # lowercase hex
        "atrius/v1/s/files/%68ero.png/head",  # needlessly encoded 'h'
        "atrius/v1/s/files/a+b/head",  # raw wildcard character
        "atrius/v1/s/files/a b/head",  # raw space
        "atrius/v1/s/files/%FF%FE/head",  # not UTF-8
        "atrius/v1/s/files/%/head",
        # hostile file ids
        "atrius/v1/s/files/..%2Fetc%2Fpasswd/head",
        "atrius/v1/s/files/..%2F..%2Fx/lock",
        "atrius/v1/s/files/a%2F..%2Fb/head",
        "atrius/v1/s/files/../head",
        "atrius/v1/s/files/./head",
        "atrius/v1/s/files/%2Fetc%2Fpasswd/head",  # absolute
        "atrius/v1/s/files/a%5Cb/head",  # backslash
        "atrius/v1/s/files/a%2F%2Fb/head",  # empty segment
        "atrius/v1/s/files/a%2F/head",  # trailing slash
        "atrius/v1/s/files/a%00b/head",  # NUL
        "atrius/v1/s/files/a%0Ab/head",  # newline
        "atrius/v1/s/files//head",  # empty key
        "atrius/v1/s/files/" + "a" * 513 + "/head",  # over the length cap
        # bad device or space names
        "atrius/v1/s/presence/",
        "atrius/v1/s/presence/..",
        "atrius/v1/s/presence/.",
        "atrius/v1/s/presence/al ice",
        "atrius/v1/s/presence/+",
        "atrius/v1/s/presence/#",
        "atrius/v1/s/presence/" + "a" * 65,
        "atrius/v1/s/presence/al%69ce",
        "atrius/v1/s/dev/../req",
        "atrius/v1/s/dev/b%C3%B6b/data",
        "atrius/v1/+/presence/alice",
        "atrius/v1/../presence/alice",
        "atrius/v1//presence/alice",
        "atrius/v1/my game/files/a/head",
        # conflict topics
        "atrius/v1/s/files/art%2Fhero.png/conflict/extra",
        "atrius/v1/s/files/conflict",
        "atrius/v1/s/files/art/hero.png/conflict",
        "atrius/v1/s/files/art%2fhero.png/conflict",
        "atrius/v1/s/files/..%2Fetc%2Fpasswd/conflict",
        "atrius/v1/s/files/%2Fabs/conflict",
        "atrius/v1/s/files//conflict",
        "atrius/v1/s/files/+/conflict",
        "atrius/v1/+/files/a/conflict",
        "atrius/v1/s/files/a/Conflict",
        "atrius/v1/s/files/a/conflicts",
        "atrius/v1/s/conflict/a",
    ],
)
def test_parse_rejects_hostile_or_invalid_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "atrius/v1/s/presence/alice\n",  # a regex '$' also matches before a trailing newline
        "atrius/v1/s\n/presence/alice",
        "atrius/v1/s/dev/bob\n/req",
    ],
)
def test_parse_rejects_names_with_a_trailing_newline(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_topic_error_is_a_value_error() -> None:
    assert issubclass(TopicError, ValueError)
    with pytest.raises(ValueError, match="atrius"):
        parse_topic("elsewhere/v1/s/presence/a")
