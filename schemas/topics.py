"""Topic builders and the topic parser: every MQTT topic Atrius uses is spelled here and nowhere else."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from schemas.names import check_file_id, check_name

ROOT = "atrius/v1"


def file_key(file_id: str) -> str:
    """The topic segment for a file id: percent-encoded with no safe characters."""
    return quote(file_id, safe="")


def space_root(space: str) -> str:
    return f"{ROOT}/{space}"


def presence_topic(space: str, device: str) -> str:
    return f"{ROOT}/{space}/presence/{device}"


def head_topic(space: str, file_id: str) -> str:
    return f"{ROOT}/{space}/files/{file_key(file_id)}/head"


def lock_topic(space: str, file_id: str) -> str:
    return f"{ROOT}/{space}/files/{file_key(file_id)}/lock"


def conflict_topic(space: str, file_id: str) -> str:
    """Not retained: an author's losing concurrent edit, kept as a conflict copy, for the history."""
    return f"{ROOT}/{space}/files/{file_key(file_id)}/conflict"


def device_request_topic(space: str, device: str) -> str:
    """Chunk requests addressed to one device (it serves what it holds)."""
    return f"{ROOT}/{space}/dev/{device}/req"


def device_data_topic(space: str, device: str) -> str:
    """Binary chunk frames addressed to one device (replies to its requests)."""
    return f"{ROOT}/{space}/dev/{device}/data"


def hub_request_topic(space: str) -> str:
    """Chunk requests addressed to the coordinator."""
    return f"{ROOT}/{space}/hub/req"


def hub_data_topic(space: str) -> str:
    """Binary chunk frames addressed to the coordinator (replies to its own fetches)."""
    return f"{ROOT}/{space}/hub/data"


def hub_rpc_topic(space: str) -> str:
    """Requests to the coordinator (versions, restore); JSON, answered on ``reply/{token}``."""
    return f"{ROOT}/{space}/hub/rpc"


def rpc_reply_topic(space: str, token: str) -> str:
    return f"{ROOT}/{space}/reply/{token}"


def reply_topic(space: str, requester: str | None) -> str:
    """Where a provider sends chunk frames for a request; ``None`` names the coordinator."""
    return hub_data_topic(space) if requester is None else device_data_topic(space, requester)


# Subscription filters.
def all_heads_filter(space: str = "+") -> str:
    return f"{ROOT}/{space}/files/+/head"


def all_locks_filter(space: str = "+") -> str:
    return f"{ROOT}/{space}/files/+/lock"


def all_conflicts_filter(space: str = "+") -> str:
    return f"{ROOT}/{space}/files/+/conflict"


def all_presence_filter(space: str = "+") -> str:
    return f"{ROOT}/{space}/presence/+"


class TopicKind(enum.Enum):
    PRESENCE = "presence"
    HEAD = "head"
    LOCK = "lock"
    CONFLICT = "conflict"
    DEVICE_REQUEST = "device_request"
    DEVICE_DATA = "device_data"
    HUB_REQUEST = "hub_request"
    HUB_DATA = "hub_data"
    HUB_RPC = "hub_rpc"
    RPC_REPLY = "rpc_reply"


_FILE_KINDS = {"head": TopicKind.HEAD, "lock": TopicKind.LOCK, "conflict": TopicKind.CONFLICT}
_HUB_KINDS = {"req": TopicKind.HUB_REQUEST, "data": TopicKind.HUB_DATA, "rpc": TopicKind.HUB_RPC}
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")


@dataclass(frozen=True)
class ParsedTopic:
    kind: TopicKind
    space: str
    device: str | None = None
    file_id: str | None = None
    token: str | None = None


class TopicError(ValueError):
    """A topic that is not one of ours or carries an invalid name."""


def parse_topic(topic: str) -> ParsedTopic:
    """Parse an Atrius topic; raise TopicError for anything else."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "atrius" or parts[1] != "v1":
        raise TopicError(f"not an atrius/v1 topic: {topic!r}")
    space = parts[2]
    rest = parts[3:]
    try:
        check_name(space)
        if rest[0] == "presence" and len(rest) == 2:
            return ParsedTopic(TopicKind.PRESENCE, space, device=check_name(rest[1]))
        if rest[0] == "files" and len(rest) == 3 and rest[2] in _FILE_KINDS:
            file_id = check_file_id(unquote(rest[1], errors="strict"))
            if file_key(file_id) != rest[1]:
                raise TopicError(f"file key {rest[1]!r} is not canonically encoded")
            return ParsedTopic(_FILE_KINDS[rest[2]], space, file_id=file_id)
        if rest[0] == "dev" and len(rest) == 3 and rest[2] in {"req", "data"}:
            kind = TopicKind.DEVICE_REQUEST if rest[2] == "req" else TopicKind.DEVICE_DATA
            return ParsedTopic(kind, space, device=check_name(rest[1]))
        if rest[0] == "hub" and len(rest) == 2 and rest[1] in _HUB_KINDS:
            return ParsedTopic(_HUB_KINDS[rest[1]], space)
        if rest[0] == "reply" and len(rest) == 2 and _TOKEN_RE.fullmatch(rest[1]):
            return ParsedTopic(TopicKind.RPC_REPLY, space, token=rest[1])
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, TopicError):
            raise
        raise TopicError(f"bad name in topic {topic!r}: {exc}") from exc
    raise TopicError(f"unknown atrius topic: {topic!r}")
