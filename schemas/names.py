"""Validated name types shared by every message: device and space names, file ids, hashes."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_FILE_ID = 512


def check_name(value: str) -> str:
    """Return ``value`` if it is a valid device or space name, else raise ValueError."""
    if not NAME_RE.fullmatch(value) or value in {".", ".."}:
        raise ValueError(f"{value!r} is not a valid name: use 1-64 of A-Z a-z 0-9 . _ -")
    return value


def check_file_id(value: str) -> str:
    """A logical file id: posix-style relative path, no empty/dot segments, no control characters."""
    if not value or len(value) > MAX_FILE_ID:
        raise ValueError(f"file id must be 1-{MAX_FILE_ID} characters")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ValueError("file id contains a control character")
    if value.startswith("/") or "\\" in value:
        raise ValueError(f"file id {value!r} must be relative and use '/'")
    for part in value.split("/"):
        if part in {"", ".", ".."}:
            raise ValueError(f"file id {value!r} has an empty, '.' or '..' segment")
    return value


def check_hash(value: str) -> str:
    if not HASH_RE.fullmatch(value):
        raise ValueError("hash must be 64 lowercase hex characters (BLAKE3-256)")
    return value


DeviceName = Annotated[str, StringConstraints(max_length=64), AfterValidator(check_name)]
SpaceName = DeviceName
FileId = Annotated[str, StringConstraints(max_length=MAX_FILE_ID), AfterValidator(check_file_id)]
HashHex = Annotated[str, StringConstraints(min_length=64, max_length=64), AfterValidator(check_hash)]


MAX_NAME_ON_DISK = 160


def disk_name(file_id: str) -> str:
    """A file or folder name that stands for ``file_id`` on any disk: the percent-encoded id when it
    fits comfortably in NAME_MAX (255 bytes, with room for suffixes), else a BLAKE3 digest of it."""
    from urllib.parse import quote

    import blake3

    key = quote(file_id, safe="")
    if len(key) <= MAX_NAME_ON_DISK:
        return key
    return "h-" + blake3.blake3(file_id.encode()).hexdigest()[:40]
