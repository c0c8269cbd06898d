"""Binary framing of one blob (chunk or manifest page) on a data topic, and the chunk size limits."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MIN_CHUNK = 64 * 1024
AVG_CHUNK = 64 * 1024  # pyfastcdc target; measured average ~100 KiB on random data with these bounds
MAX_CHUNK = 512 * 1024
"""Hard cap on a blob: far below the 1 MB packet limits of EMQX and amqtt's WebSocket listener."""

MAGIC = b"AT"
FRAME_VERSION = 1
_HEADER = struct.Struct("!2sBB32s")
HEADER_SIZE = _HEADER.size
MAX_FRAME = HEADER_SIZE + MAX_CHUNK


class FrameStatus(enum.IntEnum):
    OK = 0
    MISSING = 1


class FrameError(ValueError):
    """A data frame that is truncated, oversized or not ours."""


@dataclass(frozen=True)
class Frame:
    status: FrameStatus
    hash: str
    data: memoryview


def encode_frame(status: FrameStatus, hash_hex: str, data: bytes | memoryview = b"") -> bytes:
    if len(data) > MAX_CHUNK:
        raise FrameError(f"blob of {len(data)} bytes exceeds the {MAX_CHUNK} cap")
    try:
        digest = bytes.fromhex(hash_hex)
    except ValueError as exc:
        raise FrameError("frame hash is not hex") from exc
    if len(digest) != 32:
        raise FrameError(f"frame hash must be 32 bytes, got {len(digest)}")
    return _HEADER.pack(MAGIC, FRAME_VERSION, status, digest) + bytes(data)


def decode_frame(payload: bytes) -> Frame:
    if len(payload) < HEADER_SIZE:
        raise FrameError(f"frame of {len(payload)} bytes is shorter than its header")
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the cap")
    magic, version, status, digest = _HEADER.unpack_from(payload)
    if magic != MAGIC or version != FRAME_VERSION:
        raise FrameError("not an Atrius v1 frame")
    try:
        st = FrameStatus(status)
    except ValueError as exc:
        raise FrameError(f"unknown frame status {status}") from exc
    data = memoryview(payload)[HEADER_SIZE:]
    if st is FrameStatus.MISSING and len(data):
        raise FrameError("a missing-frame carries no data")
    return Frame(st, digest.hex(), data)
