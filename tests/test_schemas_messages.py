"""Unit tests for schemas/messages.py and schemas/names.py: frozen strict models and name rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from schemas.messages import (
    MAX_HASHES_PER_REQUEST,
    ChunkRequest,
    Head,
    LockState,
    Presence,
    PresenceState,
    encode,
)
from schemas.names import MAX_FILE_ID, check_file_id, check_hash, check_name

H1 = "1" * 64
H2 = "2" * 64
H3 = "a" * 64


def head(**over: Any) -> Head:
    fields: dict[str, Any] = {
        "file_id": "art/hero.png",
        "hash": H1,
        "size": 100,
        "version": 1,
        "author": "alice-pc",
        "chunks": 1,
        "manifest": [H2],
    }
    fields.update(over)
    return Head(**fields)


def presence(**over: Any) -> Presence:
    fields: dict[str, Any] = {"device": "alice-pc", "state": "online", "epoch": 1}
    fields.update(over)
    return Presence(**fields)


def lock(**over: Any) -> LockState:
    fields: dict[str, Any] = {"file_id": "art/hero.png", "holder": "bob", "acquired_at": 10.0}
    fields.update(over)
    return LockState(**fields)


def request(**over: Any) -> ChunkRequest:
    fields: dict[str, Any] = {"req_id": "r1", "requester": "bob", "file_id": "art/hero.png", "hashes": [H1]}
    fields.update(over)
    return ChunkRequest(**fields)


ALL_FACTORIES = [head, presence, lock, request]

# -- frozen, extra="forbid" ---------------------------------------------------------------------


@pytest.mark.parametrize("make", ALL_FACTORIES)
def test_models_are_frozen(make: Any) -> None:
    msg = make()
    field = next(iter(type(msg).model_fields))
    with pytest.raises(ValidationError):
        setattr(msg, field, getattr(msg, field))


@pytest.mark.parametrize("make", ALL_FACTORIES)
def test_models_reject_unknown_fields(make: Any) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        make(surprise=1)


@pytest.mark.parametrize("make", ALL_FACTORIES)
def test_models_reject_unknown_fields_in_json(make: Any) -> None:
    data = json.loads(make().model_dump_json())
    data["surprise"] = True
    with pytest.raises(ValidationError):
        type(make()).model_validate_json(json.dumps(data))


# -- JSON round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        head(),
        head(size=0, chunks=0, manifest=[]),
        head(inline_manifest="AAAA", parent=H3, time=123.5, version=7),
        head(deleted=True, size=0, chunks=0, manifest=[]),
        presence(),
        presence(state="offline", epoch=0, since=1.5, host="box", agent_version="0.1.0"),
        lock(),
        lock(expires_at=20.0, note="editing"),
        request(),
        request(requester=None, hashes=[H1, H2, H3]),
    ],
)
def test_json_round_trip(msg: BaseModel) -> None:
    again = type(msg).model_validate_json(msg.model_dump_json())
    assert again == msg
    assert type(msg).model_validate_json(encode(msg)) == msg  # type: ignore[arg-type]


def test_head_json_has_the_public_fields() -> None:
    data = json.loads(encode(head()))
    for key in ("file_id", "hash", "size", "version", "author", "deleted"):
        assert key in data
    assert data["deleted"] is False


def test_presence_json_has_the_public_fields() -> None:
    data = json.loads(encode(presence()))
    assert data["device"] == "alice-pc"
    assert data["state"] == "online"
    assert data["epoch"] == 1


def test_lock_json_has_the_public_fields() -> None:
    data = json.loads(encode(lock(expires_at=None)))
    assert set(data) >= {"file_id", "holder", "acquired_at", "expires_at"}
    assert data["expires_at"] is None


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b'{"file_id": 1}'])
def test_malformed_json_is_a_validation_error(payload: bytes) -> None:
    with pytest.raises(ValidationError):
        Head.model_validate_json(payload)


# -- Head rules ------------------------------------------------------------------------------------


def test_inline_manifest_needs_exactly_one_page() -> None:
    head(inline_manifest="AAAA", manifest=[H2])
    with pytest.raises(ValidationError, match="exactly one manifest page"):
        head(inline_manifest="AAAA", manifest=[H2, H3], chunks=7001)
    with pytest.raises(ValidationError, match="exactly one manifest page"):
        head(inline_manifest="", manifest=[], size=0, chunks=0)


def test_inline_manifest_length_cap() -> None:
    head(inline_manifest="A" * 8192)
    with pytest.raises(ValidationError):
        head(inline_manifest="A" * 8193)


@pytest.mark.parametrize(
    "over",
    [
        {"chunks": 1, "manifest": [H2]},
        {"chunks": 0, "manifest": [H2]},
        {"chunks": 2, "manifest": []},
    ],
)
def test_deleted_head_carries_no_chunks(over: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="deleted head carries no chunks"):
        head(deleted=True, size=0, **over)


def test_deleted_head_without_chunks_is_valid() -> None:
    h = head(deleted=True, size=0, chunks=0, manifest=[])
    assert h.deleted


@pytest.mark.parametrize(("size", "chunks"), [(0, 1), (100, 0)])
def test_chunks_and_size_must_agree(size: int, chunks: int) -> None:
    with pytest.raises(ValidationError, match="chunks and size disagree"):
        head(size=size, chunks=chunks, manifest=[H2] if chunks else [])


def test_head_with_chunks_needs_a_manifest() -> None:
    with pytest.raises(ValidationError, match="needs a manifest"):
        head(chunks=1, manifest=[])


def test_empty_file_head() -> None:
    h = head(size=0, chunks=0, manifest=[])
    assert h.size == 0


@pytest.mark.parametrize(
    "bad",
    ["", "1" * 63, "1" * 65, "A" * 64, "g" * 64, " " + "1" * 63, "1" * 63 + "\n", "1" * 64 + "\n", 123],
)
@pytest.mark.parametrize("field", ["hash", "parent"])
def test_hash_format(field: str, bad: Any) -> None:
    with pytest.raises(ValidationError):
        head(**{field: bad})


def test_manifest_hashes_are_checked() -> None:
    with pytest.raises(ValidationError):
        head(manifest=["nothex"])


@pytest.mark.parametrize("version", [0, -1])
def test_version_at_least_one(version: int) -> None:
    with pytest.raises(ValidationError):
        head(version=version)


def test_size_and_chunks_not_negative() -> None:
    with pytest.raises(ValidationError):
        head(size=-1)
    with pytest.raises(ValidationError):
        head(chunks=-1)


def test_head_author_must_be_a_device_name() -> None:
    with pytest.raises(ValidationError):
        head(author="alice pc")


def test_head_rejects_hostile_file_id() -> None:
    with pytest.raises(ValidationError):
        head(file_id="../etc/passwd")


# -- Presence, LockState, ChunkRequest -------------------------------------------------------------


def test_presence_state_is_an_enum() -> None:
    p = presence(state="offline")
    assert p.state is PresenceState.OFFLINE
    with pytest.raises(ValidationError):
        presence(state="away")


def test_presence_epoch_not_negative() -> None:
    presence(epoch=0)
    with pytest.raises(ValidationError):
        presence(epoch=-1)


@pytest.mark.parametrize("device", ["", "a b", "a/b", "+", "#", "..", ".", "x" * 65, "ü", "bob\n"])
def test_presence_device_name(device: str) -> None:
    with pytest.raises(ValidationError):
        presence(device=device)


def test_presence_host_length_cap() -> None:
    presence(host="h" * 255)
    with pytest.raises(ValidationError):
        presence(host="h" * 256)


def test_lock_state() -> None:
    lk = lock(expires_at=99.0)
    assert lk.holder == "bob"
    assert lk.expires_at == 99.0
    assert lock().expires_at is None
    with pytest.raises(ValidationError):
        lock(holder="not a name")
    with pytest.raises(ValidationError):
        lock(note="n" * 501)
    with pytest.raises(ValidationError):
        LockState(file_id="a", holder="b")  # type: ignore[call-arg]


def test_chunk_request_hash_count_limits() -> None:
    assert MAX_HASHES_PER_REQUEST == 64
    assert len(request(hashes=[H1] * 64).hashes) == 64
    with pytest.raises(ValidationError):
        request(hashes=[])
    with pytest.raises(ValidationError):
        request(hashes=[H1] * 65)


def test_chunk_request_fields() -> None:
    assert request().kind == "get"
    assert request(requester=None).requester is None
    with pytest.raises(ValidationError):
        request(kind="put")
    with pytest.raises(ValidationError):
        request(req_id="")
    with pytest.raises(ValidationError):
        request(req_id="x" * 65)
    with pytest.raises(ValidationError):
        request(hashes=["zz"])
    with pytest.raises(ValidationError):
        request(requester="../hub")


# -- names.py ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "alice-pc", "A.b_c-9", "x" * 64, "..a", "a.."])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "x" * 65, "a b", "a/b", "a+b", "a#b", "ü", "a\x00", "alice\n", "\nalice", "a\tb"]
)
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(ValueError):
        check_name(name)


def test_check_hash() -> None:
    assert check_hash(H3) == H3
    for bad in ["", "A" * 64, "a" * 63, "a" * 65, "0x" + "a" * 62]:
        with pytest.raises(ValueError):
            check_hash(bad)


def test_check_hash_rejects_a_trailing_newline() -> None:
    with pytest.raises(ValueError):
        check_hash("a" * 64 + "\n")


@pytest.mark.parametrize(
    "file_id", ["hero.png", "art/hero.png", "a/b/c/d.e", "..a", "a..", "Ünï/ß.png", "a b/c", "x" * MAX_FILE_ID]
)
def test_check_file_id_accepts(file_id: str) -> None:
    assert check_file_id(file_id) == file_id


@pytest.mark.parametrize(
    "file_id",
    [
        "",
        "/etc/passwd",
        "/",
        "..",
        "../x",
        "a/../b",
        "a/..",
        ".",
        "./a",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "a\x00b",
        "a\nb",
        "a\rb",
        "a\tb",
        "a\x1fb",
        "a\x7fb",
        "x" * (MAX_FILE_ID + 1),
    ],
)
def test_check_file_id_rejects(file_id: str) -> None:
    with pytest.raises(ValueError):
        check_file_id(file_id)


def test_file_id_length_cap_in_models() -> None:
    head(file_id="x" * MAX_FILE_ID)
    with pytest.raises(ValidationError):
        head(file_id="x" * (MAX_FILE_ID + 1))
