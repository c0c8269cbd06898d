"""JSON message models for every Atrius topic: frozen pydantic models that reject unknown fields."""

from __future__ import annotations

import enum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, model_validator

from schemas.names import DeviceName, FileId, HashHex

MAX_JSON_MESSAGE = 64 * 1024
"""Largest JSON control message accepted.  A head with the maximum 512 manifest pages (3.5 million
chunks, some 340 GB) serialises to about 35 KB, an inline manifest adds at most 3.1 KB."""

MAX_HASHES_PER_REQUEST = 64
MAX_VERSIONS_PAGE = 200
"""History entries per reply: ~250 bytes each keeps a page far under the JSON message limit."""
MAX_REPLY_MESSAGE = 128 * 1024


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


M = TypeVar("M", bound=Model)


class PresenceState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Presence(Model):
    """Retained on ``presence/{device}``; the Last Will carries the same epoch with state offline."""

    device: DeviceName
    state: PresenceState
    epoch: Annotated[int, Field(ge=0)]
    since: float = 0.0
    host: Annotated[str, Field(max_length=255)] = ""
    agent_version: Annotated[str, Field(max_length=64)] = ""


class Head(Model):
    """Retained on ``files/{key}/head``: the current version of one file.

    ``hash`` is BLAKE3-256 of the whole content.  ``manifest`` lists the hashes of the manifest
    pages (see :mod:`schemas.manifest`); ``inline_manifest`` carries the single page base64-encoded
    when it is small, which saves small files a round trip.
    """

    file_id: FileId
    hash: HashHex
    size: Annotated[int, Field(ge=0)]
    version: Annotated[int, Field(ge=1)]
    author: DeviceName
    deleted: bool = False
    time: float = 0.0
    parent: HashHex | None = None
    chunks: Annotated[int, Field(ge=0)] = 0
    manifest: Annotated[list[HashHex], Field(max_length=512)] = []
    inline_manifest: Annotated[str | None, Field(max_length=8192)] = None
    restored_from: Annotated[int | None, Field(ge=1)] = None
    """Set when the coordinator made this head by restoring an earlier version (it holds the chunks)."""

    @model_validator(mode="after")
    def _consistent(self) -> Head:
        if self.inline_manifest is not None and len(self.manifest) != 1:
            raise ValueError("inline_manifest requires exactly one manifest page")
        if self.deleted and (self.chunks or self.manifest):
            raise ValueError("a deleted head carries no chunks")
        if not self.deleted and (self.chunks == 0) != (self.size == 0):
            raise ValueError("chunks and size disagree")
        if self.chunks and not self.manifest:
            raise ValueError("a head with chunks needs a manifest")
        return self


class LockState(Model):
    """Retained on ``files/{key}/lock`` by the coordinator; an empty retained payload = unlocked."""

    file_id: FileId
    holder: DeviceName
    acquired_at: float
    expires_at: float | None = None
    note: Annotated[str, Field(max_length=500)] = ""


class ChunkRequest(Model):
    """Sent to ``dev/{provider}/req`` or ``hub/req``: please send me these blobs by hash.

    Blobs are file chunks and manifest pages alike.  ``requester`` None means the coordinator.
    The provider answers each hash with one binary frame (:mod:`schemas.frames`) on the
    requester's data topic: the blob, or a "missing" frame.
    """

    kind: Literal["get"] = "get"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    requester: DeviceName | None
    file_id: FileId
    hashes: Annotated[list[HashHex], Field(min_length=1, max_length=MAX_HASHES_PER_REQUEST)]


class VersionKind(enum.StrEnum):
    EDIT = "edit"
    RESTORE = "restore"


class VersionEntry(Model):
    """One version in a file's history, as ``atrius versions --json`` prints it."""

    version: Annotated[int, Field(ge=1)]
    hash: HashHex
    size: Annotated[int, Field(ge=0)]
    author: DeviceName
    time: float
    parent: HashHex | None = None
    deleted: bool = False
    kind: VersionKind = VersionKind.EDIT
    restored_from: int | None = None
    pruned: bool = False
    """The content was removed by the retention policy: listed, but it cannot be restored."""


Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
"""A requester's private reply token: replies go to ``reply/{token}``."""


class VersionsRequest(Model):
    """``hub/rpc``: list a file's history, newest first, one page at a time."""

    kind: Literal["versions"] = "versions"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    reply_to: Token
    file_id: FileId
    offset: Annotated[int, Field(ge=0)] = 0
    limit: Annotated[int, Field(ge=1, le=MAX_VERSIONS_PAGE)] = MAX_VERSIONS_PAGE


class RestoreRequest(Model):
    """``hub/rpc``: make version ``version`` the new head (a new version with its content)."""

    kind: Literal["restore"] = "restore"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    reply_to: Token
    file_id: FileId
    version: Annotated[int, Field(ge=1)]
    by: DeviceName


HubRequest = Annotated[VersionsRequest | RestoreRequest, Field(discriminator="kind")]


class VersionsReply(Model):
    kind: Literal["versions"] = "versions"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    ok: bool
    error: Annotated[str, Field(max_length=500)] = ""
    total: Annotated[int, Field(ge=0)] = 0
    versions: Annotated[list[VersionEntry], Field(max_length=MAX_VERSIONS_PAGE)] = []


class RestoreReply(Model):
    kind: Literal["restore"] = "restore"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    ok: bool
    error: Annotated[str, Field(max_length=500)] = ""
    version: int | None = None


HubReply = Annotated[VersionsReply | RestoreReply, Field(discriminator="kind")]
HUB_REQUEST: TypeAdapter[VersionsRequest | RestoreRequest] = TypeAdapter(HubRequest)
HUB_REPLY: TypeAdapter[VersionsReply | RestoreReply] = TypeAdapter(HubReply)


class MessageError(ValueError):
    """A payload that is oversized, malformed, fails its schema, or disagrees with its topic."""


def first_error(exc: ValidationError) -> str:
    """The first validation problem as ``field.path: message``, for one-line logs."""
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'payload'}: {err['msg']}"


def _decode(model: type[M], what: str, name: str, payload: bytes) -> M:
    if len(payload) > MAX_JSON_MESSAGE:
        raise MessageError(f"{what} for {name} is {len(payload)} bytes, over the limit")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise MessageError(f"malformed {what} for {name}: {first_error(exc)}") from exc


def decode_head(file_id: str, payload: bytes) -> Head:
    """A head from ``files/{key}/head``; its file_id must be the one its topic names."""
    head = _decode(Head, "head", file_id, payload)
    if head.file_id != file_id:
        raise MessageError(f"head file_id {head.file_id!r} does not match its topic ({file_id!r})")
    return head


def decode_presence(device: str, payload: bytes) -> Presence:
    """A presence message from ``presence/{device}``; its device must be the one its topic names."""
    p = _decode(Presence, "presence", device, payload)
    if p.device != device:
        raise MessageError(f"presence device {p.device!r} does not match its topic ({device!r})")
    return p


def encode(msg: Model) -> bytes:
    return msg.model_dump_json(exclude_none=False).encode()
