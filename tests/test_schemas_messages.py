"""Unit tests for schemas/messages.py and schemas/names.py: frozen strict models and name rules."""

from __future__ import annotations

import json
from typing import Any

import blake3
import pytest
from pydantic import BaseModel, ValidationError

from schemas.messages import (
    EMPTY_HASH,
    HUB_REPLY,
    HUB_REQUEST,
    MAX_ACTIVE_FILES,
    MAX_HASHES_PER_REQUEST,
    MAX_JSON_MESSAGE,
    MAX_STATUS_DEVICES,
    MAX_STATUS_EVENTS,
    MAX_TTL,
    MAX_VECTOR,
    ChunkRequest,
    DeviceRecord,
    EntryKind,
    Head,
    LockEvent,
    LockEventKind,
    LockOutcome,
    LockReply,
    LockRequest,
    LockState,
    MessageError,
    Presence,
    PresenceState,
    RestoreReply,
    RestoreRequest,
    StatusReply,
    StatusRequest,
    UnlockRequest,
    VersionEntry,
    VersionKind,
    VersionsReply,
    VersionsRequest,
    decode_head,
    decode_lock,
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


TOKEN = "tok_0123456789"


def lock_event(**over: Any) -> LockEvent:
    fields: dict[str, Any] = {"file_id": "art/hero.png", "kind": "taken", "holder": "bob", "by": "bob", "time": 10.0}
    fields.update(over)
    return LockEvent(**fields)


def lock_request(**over: Any) -> LockRequest:
    fields: dict[str, Any] = {"req_id": "r1", "reply_to": TOKEN, "file_id": "art/hero.png", "by": "bob",
                              "local_hash": H1}
    fields.update(over)
    return LockRequest(**fields)


def unlock_request(**over: Any) -> UnlockRequest:
    fields: dict[str, Any] = {"req_id": "r1", "reply_to": TOKEN, "file_id": "art/hero.png", "by": "bob"}
    fields.update(over)
    return UnlockRequest(**fields)


def status_request(**over: Any) -> StatusRequest:
    fields: dict[str, Any] = {"req_id": "r1", "reply_to": TOKEN}
    fields.update(over)
    return StatusRequest(**fields)


def lock_reply(**over: Any) -> LockReply:
    fields: dict[str, Any] = {"req_id": "r1", "ok": True, "outcome": "granted"}
    fields.update(over)
    return LockReply(**fields)


def device_record(**over: Any) -> DeviceRecord:
    fields: dict[str, Any] = {"device": "bob", "state": "online", "last_seen": 10.0}
    fields.update(over)
    return DeviceRecord(**fields)


def status_reply(**over: Any) -> StatusReply:
    fields: dict[str, Any] = {"req_id": "r1", "time": 10.0}
    fields.update(over)
    return StatusReply(**fields)


ALL_FACTORIES = [head, presence, lock, request, lock_event, lock_request, unlock_request, status_request, lock_reply,
                 device_record, status_reply]

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
        head(deleted=True, hash=EMPTY_HASH, size=0, chunks=0, manifest=[], moved_to="art/renamed.png"),
        head(moved_from="art/old name.png", parent=H3),
        head(kind="dir", hash=EMPTY_HASH, size=0, chunks=0, manifest=[]),
        head(kind="dir", hash=EMPTY_HASH, size=0, chunks=0, manifest=[], deleted=True),
        presence(),
        presence(state="offline", epoch=0, since=1.5, host="box", agent_version="0.1.0"),
        lock(),
        lock(expires_at=20.0, note="editing"),
        request(),
        request(requester=None, hashes=[H1, H2, H3]),
        head(vector={"alice-pc": 3, "bob": 1}),
        head(vector={f"dev{i}": i + 1 for i in range(MAX_VECTOR)}),
        presence(sending=["art/hero.png"], receiving=["a/b.txt", "Ünï/ß.png"]),
        lock(version=4, expires_at=None),
        lock_event(),
        lock_event(kind="expired", by=None, note="gone"),
        lock_request(),
        lock_request(local_hash=None, ttl=MAX_TTL, note="n"),
        unlock_request(force=True),
        status_request(),
        lock_reply(outcome="held", ok=False, error="locked", lock=lock(), head_version=3, head_author="carol"),
        device_record(state="offline", since=1.0, host="box", agent_version="0.2", sending=["x"], receiving=["y"]),
        status_reply(devices=[device_record()], lock_events=[lock_event(), lock_event(kind="forced", by="alice")]),
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
        {"size": 0, "chunks": 1, "manifest": [H2]},
        {"size": 0, "chunks": 0, "manifest": [H2]},
        {"size": 0, "chunks": 2, "manifest": []},
        {"size": 100, "chunks": 0, "manifest": []},
        {"size": 100, "chunks": 1, "manifest": [H2]},
        {"size": 0, "chunks": 0, "manifest": [H2], "inline_manifest": "AAAA"},
    ],
)
def test_deleted_head_carries_no_content(over: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="deleted head carries no content"):
        head(deleted=True, **over)


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


# -- version vectors -------------------------------------------------------------------------------


def test_head_vector_defaults_to_empty() -> None:
    assert head().vector == {}
    assert json.loads(encode(head(vector={"bob": 2})))["vector"] == {"bob": 2}


def test_head_vector_size_cap() -> None:
    assert MAX_VECTOR == 256
    assert len(head(vector={f"d{i}": 1 for i in range(MAX_VECTOR)}).vector) == MAX_VECTOR
    with pytest.raises(ValidationError):
        head(vector={f"d{i}": 1 for i in range(MAX_VECTOR + 1)})


@pytest.mark.parametrize("device", ["", "a b", "a/b", "+", "#", "..", ".", "x" * 65, "ü", "bob\n"])
def test_head_vector_keys_are_device_names(device: str) -> None:
    with pytest.raises(ValidationError):
        head(vector={device: 1})


@pytest.mark.parametrize("version", [0, -1, "x", None, 1.5])
def test_head_vector_values_are_versions(version: Any) -> None:
    with pytest.raises(ValidationError):
        head(vector={"bob": version})


def test_head_vector_rejected_in_json_too() -> None:
    data = json.loads(encode(head()))
    data["vector"] = {"../hub": 1}
    with pytest.raises(ValidationError):
        Head.model_validate_json(json.dumps(data))
    data["vector"] = ["bob", 1]
    with pytest.raises(ValidationError):
        Head.model_validate_json(json.dumps(data))


# -- presence activity -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["sending", "receiving"])
def test_presence_activity_lists(field: str) -> None:
    assert getattr(presence(), field) == []
    assert len(getattr(presence(**{field: ["f"] * MAX_ACTIVE_FILES}), field)) == MAX_ACTIVE_FILES
    with pytest.raises(ValidationError):
        presence(**{field: ["f"] * (MAX_ACTIVE_FILES + 1)})
    with pytest.raises(ValidationError):
        presence(**{field: ["../etc/passwd"]})
    with pytest.raises(ValidationError):
        device_record(**{field: ["f"] * (MAX_ACTIVE_FILES + 1)})
    with pytest.raises(ValidationError):
        device_record(**{field: ["/abs"]})


# -- locks -----------------------------------------------------------------------------------------


def test_lock_state_version() -> None:
    assert lock().version is None
    assert lock(version=3).version == 3
    for bad in (0, -1):
        with pytest.raises(ValidationError):
            lock(version=bad)


def test_lock_event_fields() -> None:
    ev = lock_event(kind="forced", holder="bob", by="alice")
    assert ev.kind is LockEventKind.FORCED
    assert lock_event(by=None).by is None
    assert {k.value for k in LockEventKind} == {"taken", "renewed", "released", "forced", "expired"}
    with pytest.raises(ValidationError):
        lock_event(kind="stolen")
    with pytest.raises(ValidationError):
        lock_event(holder="not a name")
    with pytest.raises(ValidationError):
        lock_event(note="n" * 501)
    with pytest.raises(ValidationError):
        LockEvent(file_id="a", kind="taken", holder="bob")  # type: ignore[call-arg]


def test_decode_lock_round_trip() -> None:
    lk = lock(expires_at=20.0, note="editing", version=2)
    assert decode_lock("art/hero.png", encode(lk)) == lk


def test_decode_lock_empty_payload_is_unlocked() -> None:
    assert decode_lock("art/hero.png", b"") is None


def test_decode_lock_for_the_wrong_file_id() -> None:
    with pytest.raises(MessageError, match="does not match"):
        decode_lock("art/other.png", encode(lock()))


@pytest.mark.parametrize(
    "payload",
    [b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b"\x00", b"{}", b'{"file_id": "art/hero.png"}',
     b'{"file_id": "art/hero.png", "holder": "bob", "acquired_at": 1, "surprise": 1}',
     b'{"file_id": "art/hero.png", "holder": "b b", "acquired_at": 1}',
     b'{"file_id": "art/hero.png", "holder": "bob", "acquired_at": 1, "version": 0}'],
)
def test_decode_lock_rejects_garbage(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode_lock("art/hero.png", payload)


def test_decode_lock_rejects_oversize() -> None:
    payload = encode(lock()).replace(b'"note":""', b'"note":"' + b" " * MAX_JSON_MESSAGE + b'"')
    assert len(payload) > MAX_JSON_MESSAGE
    with pytest.raises(MessageError, match="over the limit"):
        decode_lock("art/hero.png", payload)


def test_message_error_is_a_value_error() -> None:
    assert issubclass(MessageError, ValueError)


# -- hub requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [None, 0.001, 1, 3600.0, MAX_TTL])
def test_lock_request_ttl_accepted(ttl: float | None) -> None:
    assert lock_request(ttl=ttl).ttl == ttl


@pytest.mark.parametrize("ttl", [0, 0.0, -1, -0.5, MAX_TTL + 1, float("inf"), "soon"])
def test_lock_request_ttl_rejected(ttl: Any) -> None:
    with pytest.raises(ValidationError):
        lock_request(ttl=ttl)


def test_lock_request_fields() -> None:
    assert lock_request().kind == "lock"
    assert lock_request(local_hash=None).local_hash is None
    assert lock_request().ttl is None and lock_request().note == ""
    with pytest.raises(ValidationError):
        LockRequest(req_id="r1", reply_to=TOKEN, file_id="a", by="bob")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        lock_request(local_hash="nothex")
    with pytest.raises(ValidationError):
        lock_request(by="../hub")
    with pytest.raises(ValidationError):
        lock_request(reply_to="short")
    with pytest.raises(ValidationError):
        lock_request(reply_to="tok/0123456789")
    with pytest.raises(ValidationError):
        lock_request(note="n" * 501)
    with pytest.raises(ValidationError):
        lock_request(file_id="../x")
    with pytest.raises(ValidationError):
        lock_request(kind="unlock")


def test_unlock_and_status_request_fields() -> None:
    assert unlock_request().kind == "unlock"
    assert unlock_request().force is False
    assert status_request().kind == "status"
    with pytest.raises(ValidationError):
        unlock_request(by="a b")
    with pytest.raises(ValidationError):
        status_request(reply_to="x")
    with pytest.raises(ValidationError):
        status_request(req_id="")


@pytest.mark.parametrize(
    "msg",
    [
        VersionsRequest(req_id="r1", reply_to=TOKEN, file_id="a.txt"),
        RestoreRequest(req_id="r1", reply_to=TOKEN, file_id="a.txt", version=2, by="bob"),
        lock_request(ttl=60.0, note="n"),
        lock_request(local_hash=None),
        unlock_request(force=True),
        status_request(),
    ],
)
def test_hub_request_adapter_round_trips_every_request(msg: BaseModel) -> None:
    again = HUB_REQUEST.validate_json(encode(msg))  # type: ignore[arg-type]
    assert type(again) is type(msg)
    assert again == msg


@pytest.mark.parametrize(
    "msg",
    [
        VersionsReply(req_id="r1", ok=True, total=1, versions=[
            VersionEntry(version=1, hash=H1, size=1, author="bob", time=1.0, kind=VersionKind.CONFLICT)]),
        RestoreReply(req_id="r1", ok=True, version=3),
        lock_reply(),
        lock_reply(ok=False, outcome="not_holder", error="no", lock=lock(), head_version=2, head_author="bob"),
        status_reply(devices=[device_record(sending=["a"])], lock_events=[lock_event(kind="expired", by=None)]),
        status_reply(ok=False, error="busy"),
    ],
)
def test_hub_reply_adapter_round_trips_every_reply(msg: BaseModel) -> None:
    again = HUB_REPLY.validate_json(encode(msg))  # type: ignore[arg-type]
    assert type(again) is type(msg)
    assert again == msg


@pytest.mark.parametrize(
    "data",
    [
        {"kind": "steal", "req_id": "r1", "reply_to": TOKEN},
        {"req_id": "r1", "reply_to": TOKEN},
        {"kind": "status", "req_id": "r1", "reply_to": TOKEN, "surprise": 1},
        {"kind": "lock", "req_id": "r1", "reply_to": TOKEN, "file_id": "a", "by": "bob", "local_hash": None,
         "ttl": 0},
        {"kind": "lock", "req_id": "r1", "reply_to": TOKEN, "file_id": "a", "by": "bob", "local_hash": None,
         "ttl": MAX_TTL * 2},
        {"kind": "unlock", "req_id": "r1", "reply_to": TOKEN, "file_id": "a", "by": "bob", "force": "maybe"},
    ],
)
def test_hub_request_adapter_rejects(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HUB_REQUEST.validate_json(json.dumps(data))


@pytest.mark.parametrize("payload", [b"", b"{", b"null", b"\xff", b"[]"])
def test_hub_adapters_reject_garbage_bytes(payload: bytes) -> None:
    with pytest.raises(ValidationError):
        HUB_REQUEST.validate_json(payload)
    with pytest.raises(ValidationError):
        HUB_REPLY.validate_json(payload)


def test_hub_reply_adapter_rejects() -> None:
    with pytest.raises(ValidationError):
        HUB_REPLY.validate_json(json.dumps({"kind": "lock", "req_id": "r1", "ok": True, "outcome": "stolen"}))
    with pytest.raises(ValidationError):
        HUB_REPLY.validate_json(json.dumps({"kind": "status", "req_id": "r1", "time": 1.0, "surprise": 1}))
    with pytest.raises(ValidationError):
        HUB_REPLY.validate_json(json.dumps({"kind": "status", "req_id": "r1"}))


# -- hub replies -----------------------------------------------------------------------------------


def test_lock_outcomes() -> None:
    assert {o.value for o in LockOutcome} == {
        "granted", "renewed", "held", "stale", "unknown", "released", "forced", "not_locked", "not_holder"}
    assert lock_reply(outcome="not_locked").outcome is LockOutcome.NOT_LOCKED
    with pytest.raises(ValidationError):
        lock_reply(outcome="stolen")
    with pytest.raises(ValidationError):
        lock_reply(head_author="a b")
    with pytest.raises(ValidationError):
        lock_reply(error="e" * 501)


def test_status_reply_caps() -> None:
    assert len(status_reply(devices=[device_record()] * MAX_STATUS_DEVICES).devices) == MAX_STATUS_DEVICES
    with pytest.raises(ValidationError):
        status_reply(devices=[device_record()] * (MAX_STATUS_DEVICES + 1))
    assert len(status_reply(lock_events=[lock_event()] * MAX_STATUS_EVENTS).lock_events) == MAX_STATUS_EVENTS
    with pytest.raises(ValidationError):
        status_reply(lock_events=[lock_event()] * (MAX_STATUS_EVENTS + 1))


def test_device_record_fields() -> None:
    rec = device_record(state="offline")
    assert rec.state is PresenceState.OFFLINE
    with pytest.raises(ValidationError):
        device_record(state="away")
    with pytest.raises(ValidationError):
        device_record(device="..")
    with pytest.raises(ValidationError):
        device_record(host="h" * 256)


def test_version_kind_conflict() -> None:
    assert VersionKind("conflict") is VersionKind.CONFLICT
    entry = VersionEntry(version=6, hash=H1, size=1, author="bob", time=1.0, kind="conflict")
    assert entry.kind is VersionKind.CONFLICT
    assert json.loads(encode(entry))["kind"] == "conflict"


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


# -- folders: entry kind, moves, the empty hash --------------------------------------------------------


def test_empty_hash_is_blake3_of_no_bytes() -> None:
    assert blake3.blake3(b"").hexdigest() == EMPTY_HASH
    assert check_hash(EMPTY_HASH) == EMPTY_HASH


def test_head_kind_defaults_to_file() -> None:
    h = head()
    assert h.kind is EntryKind.FILE
    assert json.loads(encode(h))["kind"] == "file"


def test_head_kind_is_an_enum() -> None:
    assert head(kind="dir", hash=EMPTY_HASH, size=0, chunks=0, manifest=[]).kind is EntryKind.DIR
    with pytest.raises(ValidationError):
        head(kind="folder")
    with pytest.raises(ValidationError):
        head(kind="symlink")


def test_older_heads_without_the_new_fields_still_decode() -> None:
    data = json.loads(encode(head()))
    for key in ("kind", "moved_from", "moved_to"):
        del data[key]
    h = decode_head("art/hero.png", json.dumps(data).encode())
    assert (h.kind, h.moved_from, h.moved_to) == (EntryKind.FILE, None, None)


def dir_head(**over: Any) -> Head:
    fields: dict[str, Any] = {"kind": "dir", "hash": EMPTY_HASH, "size": 0, "chunks": 0, "manifest": []}
    fields.update(over)
    return head(**fields)


def test_dir_head() -> None:
    h = dir_head(file_id="textures/sub")
    assert h.kind is EntryKind.DIR
    assert not h.deleted
    gone = dir_head(deleted=True, version=2, parent=EMPTY_HASH)
    assert gone.deleted


@pytest.mark.parametrize(
    "over",
    [
        pytest.param({"hash": H1}, id="other-hash"),
        pytest.param({"size": 1}, id="size"),
        pytest.param({"size": 100, "chunks": 1, "manifest": [H2]}, id="content"),
        pytest.param({"manifest": [H2]}, id="manifest"),
        pytest.param({"chunks": 1, "manifest": [H2], "size": 5, "deleted": True}, id="deleted-with-content"),
        pytest.param({"hash": H1, "deleted": True}, id="deleted-other-hash"),
    ],
)
def test_dir_head_carries_no_content(over: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="carries no content"):
        dir_head(**over)


def test_dir_head_rejected_from_json_too() -> None:
    data = json.loads(encode(dir_head()))
    data["hash"] = H1
    with pytest.raises(MessageError, match="carries no content"):
        decode_head("art/hero.png", json.dumps(data).encode())


def test_deleted_head_hash_is_free() -> None:
    """A deletion normally carries the empty hash; older agents stamped the deleted content's hash."""
    assert head(deleted=True, size=0, chunks=0, manifest=[], hash=EMPTY_HASH).deleted
    assert head(deleted=True, size=0, chunks=0, manifest=[], hash=H1).deleted


def test_empty_file_head_carries_the_empty_hash_without_being_a_deletion() -> None:
    h = head(hash=EMPTY_HASH, size=0, chunks=0, manifest=[])
    assert not h.deleted
    assert h.kind is EntryKind.FILE


def test_moved_to_only_on_a_deletion() -> None:
    h = head(deleted=True, hash=EMPTY_HASH, size=0, chunks=0, manifest=[], moved_to="art/new.png")
    assert h.moved_to == "art/new.png"
    with pytest.raises(ValidationError, match="moved_to"):
        head(moved_to="art/new.png")
    with pytest.raises(ValidationError, match="moved_to"):
        head(moved_to="art/new.png", hash=EMPTY_HASH, size=0, chunks=0, manifest=[])
    with pytest.raises(ValidationError, match="moved_to"):
        dir_head(moved_to="art/new")


def test_moved_from_on_a_file_with_content() -> None:
    h = head(moved_from="art/old.png", version=3, parent=H1)
    assert h.moved_from == "art/old.png"
    assert json.loads(encode(h))["moved_from"] == "art/old.png"


@pytest.mark.parametrize("field", ["moved_from", "moved_to"])
@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs", "a//b", "a\\b", "a\x00b", "", "x" * (MAX_FILE_ID + 1), 5])
def test_move_ids_are_checked_file_ids(field: str, bad: Any) -> None:
    with pytest.raises(ValidationError):
        head(**{field: bad, "deleted": True, "hash": EMPTY_HASH, "size": 0, "chunks": 0, "manifest": []})


def test_move_fields_in_json() -> None:
    gone = head(deleted=True, hash=EMPTY_HASH, size=0, chunks=0, manifest=[], moved_to="a/b.png")
    data = json.loads(encode(gone))
    assert data["moved_to"] == "a/b.png"
    assert data["moved_from"] is None
    assert data["deleted"] is True
    assert decode_head("art/hero.png", encode(gone)) == gone


# -- heads: catching up on a big space ------------------------------------------------------------


def test_heads_request_and_reply_round_trip() -> None:
    from schemas.messages import HUB_REPLY, HUB_REQUEST, MAX_HEADS_PAGE, HeadsReply, HeadsRequest

    req = HeadsRequest(req_id="r1", reply_to="tok12345", prefix="textures/", after="textures/a.png")
    assert HUB_REQUEST.validate_json(req.model_dump_json()) == req
    assert HeadsRequest(req_id="r1", reply_to="tok12345").prefix == ""
    head = Head(file_id="textures/a.png", hash="a" * 64, size=0, version=1, author="alice")
    reply = HeadsReply(req_id="r1", heads=[head], more=True)
    assert HUB_REPLY.validate_json(reply.model_dump_json()) == reply
    for bad in ({"limit": 0}, {"limit": MAX_HEADS_PAGE + 1}, {"after": "../x"}, {"prefix": "x" * 513}):
        with pytest.raises(ValidationError):
            HeadsRequest.model_validate({"req_id": "r1", "reply_to": "tok12345", **bad})
