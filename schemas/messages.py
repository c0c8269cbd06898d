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
MAX_VECTOR = 256
"""Devices in one version vector (every device that ever edited the file)."""
MAX_ACTIVE_FILES = 32
"""Files listed as sending or receiving in one presence message."""
MAX_TTL = 366 * 86400.0


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
    sending: Annotated[list[FileId], Field(max_length=MAX_ACTIVE_FILES)] = []
    """Files whose chunks this device served in the last seconds."""
    receiving: Annotated[list[FileId], Field(max_length=MAX_ACTIVE_FILES)] = []
    """Files this device is fetching a version of right now."""


EMPTY_HASH = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
"""BLAKE3 of no bytes: the hash of an empty file, a folder entry and a deletion."""


class EntryKind(enum.StrEnum):
    FILE = "file"
    DIR = "dir"
    """A folder inside a synced folder (so empty folders, and their removal, are synced too)."""


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
    vector: Annotated[dict[DeviceName, Annotated[int, Field(ge=1)]], Field(max_length=MAX_VECTOR)] = {}
    """Version vector: for each device that edited this lineage, the version number of its last edit.
    Ancestry is decided by it (:func:`schemas.rules.relation`); ``parent`` is the fallback."""
    kind: EntryKind = EntryKind.FILE
    moved_from: FileId | None = None
    """On a file that appeared by a rename: the id it had (receivers holding that content rename it)."""
    moved_to: FileId | None = None
    """On the deletion left by a rename: the id the content moved to."""

    @model_validator(mode="after")
    def _consistent(self) -> Head:
        if self.inline_manifest is not None and len(self.manifest) != 1:
            raise ValueError("inline_manifest requires exactly one manifest page")
        if self.deleted and (self.chunks or self.manifest or self.size):
            raise ValueError("a deleted head carries no content")
        if self.kind is EntryKind.DIR and (self.chunks or self.manifest or self.size or self.hash != EMPTY_HASH):
            raise ValueError("a folder entry carries no content")
        if self.moved_to is not None and not self.deleted:
            raise ValueError("moved_to is only set on the deletion a rename leaves")
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
    """None: no TTL, the lock lasts until unlocked."""
    note: Annotated[str, Field(max_length=500)] = ""
    version: Annotated[int | None, Field(ge=1)] = None
    """The head version the holder had when the lock was granted."""


class LockEventKind(enum.StrEnum):
    TAKEN = "taken"
    RENEWED = "renewed"
    RELEASED = "released"
    FORCED = "forced"
    EXPIRED = "expired"


class LockEvent(Model):
    """One line of a space's lock history, kept by the coordinator."""

    file_id: FileId
    kind: LockEventKind
    holder: DeviceName
    by: DeviceName | None = None
    """Who caused it (the unlocking device for ``forced``); None for ``expired``."""
    time: float
    note: Annotated[str, Field(max_length=500)] = ""


def decode_lock(file_id: str, payload: bytes) -> LockState | None:
    """A lock from ``files/{key}/lock``: None for the empty payload (unlocked)."""
    if not payload:
        return None
    lock = _decode(LockState, "lock", file_id, payload)
    if lock.file_id != file_id:
        raise MessageError(f"lock file_id {lock.file_id!r} does not match its topic ({file_id!r})")
    return lock


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
    CONFLICT = "conflict"
    """A concurrent edit that lost (:func:`schemas.rules.winner`); kept as a conflict copy by its author."""


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


class LockRequest(Model):
    """``hub/rpc``: lock a file for ``by``, who must hold the current head (``local_hash``)."""

    kind: Literal["lock"] = "lock"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    reply_to: Token
    file_id: FileId
    by: DeviceName
    local_hash: HashHex | None
    """BLAKE3 of the requester's local file; None when it has no copy."""
    ttl: Annotated[float | None, Field(gt=0, le=MAX_TTL)] = None
    note: Annotated[str, Field(max_length=500)] = ""


class UnlockRequest(Model):
    """``hub/rpc``: release a lock; ``force`` releases another device's lock (recorded)."""

    kind: Literal["unlock"] = "unlock"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    reply_to: Token
    file_id: FileId
    by: DeviceName
    force: bool = False


class StatusRequest(Model):
    """``hub/rpc``: the device registry and recent lock events of the space."""

    kind: Literal["status"] = "status"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    reply_to: Token


MAX_HEADS_PAGE = 500
MAX_HEADS_PAGE_BYTES = 96 * 1024


class HeadsRequest(Model):
    """``hub/rpc``: the latest head of every file whose id starts with ``prefix``, in id order, a page
    at a time after the id ``after``.  How a device catches up on a big space: retained messages
    arrive in a burst the broker may cut short (Mosquitto's per-client queue)."""

    kind: Literal["heads"] = "heads"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    reply_to: Token
    prefix: Annotated[str, Field(max_length=512)] = ""
    after: FileId | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_HEADS_PAGE)] = MAX_HEADS_PAGE


HubRequest = Annotated[
    VersionsRequest | RestoreRequest | LockRequest | UnlockRequest | StatusRequest | HeadsRequest,
    Field(discriminator="kind")]


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


class LockOutcome(enum.StrEnum):
    GRANTED = "granted"
    RENEWED = "renewed"
    """The requester already held it: TTL and note updated."""
    HELD = "held"
    """Another device holds it (exit code 3)."""
    STALE = "stale"
    """The requester's copy is not the current head."""
    UNKNOWN = "unknown"
    RELEASED = "released"
    FORCED = "forced"
    NOT_LOCKED = "not_locked"
    NOT_HOLDER = "not_holder"
    """Unlock by a device that does not hold the lock, without ``force`` (exit code 3)."""


class LockReply(Model):
    """Answer to a lock or unlock request; ``lock`` is the lock concerned (granted, held or released)."""

    kind: Literal["lock"] = "lock"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    ok: bool
    outcome: LockOutcome
    error: Annotated[str, Field(max_length=500)] = ""
    lock: LockState | None = None
    head_version: int | None = None
    head_author: DeviceName | None = None


class DeviceRecord(Model):
    """The coordinator's registry entry for one device."""

    device: DeviceName
    state: PresenceState
    last_seen: float
    """When the coordinator last heard from it (now, while online)."""
    since: float = 0.0
    host: Annotated[str, Field(max_length=255)] = ""
    agent_version: Annotated[str, Field(max_length=64)] = ""
    sending: Annotated[list[FileId], Field(max_length=MAX_ACTIVE_FILES)] = []
    receiving: Annotated[list[FileId], Field(max_length=MAX_ACTIVE_FILES)] = []


MAX_STATUS_DEVICES = 256
MAX_STATUS_EVENTS = 50


class StatusReply(Model):
    kind: Literal["status"] = "status"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    ok: bool = True
    error: Annotated[str, Field(max_length=500)] = ""
    time: float
    devices: Annotated[list[DeviceRecord], Field(max_length=MAX_STATUS_DEVICES)] = []
    lock_events: Annotated[list[LockEvent], Field(max_length=MAX_STATUS_EVENTS)] = []


class HeadsReply(Model):
    kind: Literal["heads"] = "heads"
    req_id: Annotated[str, Field(min_length=1, max_length=64)]
    ok: bool = True
    error: Annotated[str, Field(max_length=500)] = ""
    heads: Annotated[list[Head], Field(max_length=MAX_HEADS_PAGE)] = []
    more: bool = False
    """More heads follow: ask again with ``after`` = the last id of this page."""


HubReplyModel = VersionsReply | RestoreReply | LockReply | StatusReply | HeadsReply
HubRequestModel = VersionsRequest | RestoreRequest | LockRequest | UnlockRequest | StatusRequest | HeadsRequest
HubReply = Annotated[HubReplyModel, Field(discriminator="kind")]
HUB_REQUEST: TypeAdapter[HubRequestModel] = TypeAdapter(HubRequest)
HUB_REPLY: TypeAdapter[HubReplyModel] = TypeAdapter(HubReply)


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
