"""Manifests: the ordered list of (chunk hash, length) of one version, packed into hashed binary pages."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import blake3

from schemas.frames import MAX_CHUNK

_ENTRY = struct.Struct("!32sI")
ENTRY_SIZE = _ENTRY.size
PAGE_ENTRIES = 7000
"""Entries per page: 7000 * 36 B = 252 KB, under the blob cap."""
INLINE_MAX_ENTRIES = 64
"""A manifest of at most this many entries travels inline in the head (base64, under 3.1 KB)."""


class ManifestError(ValueError):
    """A manifest page that is malformed or does not match its hash or head."""


@dataclass(frozen=True)
class ChunkRef:
    hash: str
    length: int


def blob_hash(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def encode_pages(entries: Iterable[ChunkRef]) -> list[bytes]:
    pages: list[bytes] = []
    buf = bytearray()
    n = 0
    for ref in entries:
        buf += _ENTRY.pack(bytes.fromhex(ref.hash), ref.length)
        n += 1
        if n == PAGE_ENTRIES:
            pages.append(bytes(buf))
            buf.clear()
            n = 0
    if n:
        pages.append(bytes(buf))
    return pages


def decode_page(page: bytes | memoryview) -> list[ChunkRef]:
    if len(page) == 0 or len(page) % ENTRY_SIZE or len(page) // ENTRY_SIZE > PAGE_ENTRIES:
        raise ManifestError(f"manifest page of {len(page)} bytes is malformed")
    out = []
    for digest, length in _ENTRY.iter_unpack(page):
        if not 0 < length <= MAX_CHUNK:
            raise ManifestError(f"chunk length {length} out of range")
        out.append(ChunkRef(digest.hex(), length))
    return out


def inline_page(pages: list[bytes], chunk_count: int) -> str | None:
    """The base64 text to put in ``Head.inline_manifest``, or None when the manifest is too big."""
    if len(pages) == 1 and chunk_count <= INLINE_MAX_ENTRIES:
        return base64.b64encode(pages[0]).decode()
    return None


def decode_inline(text: str, expected_hash: str) -> bytes:
    try:
        page = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ManifestError("inline manifest is not base64") from exc
    if blob_hash(page) != expected_hash:
        raise ManifestError("inline manifest does not match its hash")
    return page


@dataclass(frozen=True)
class Placement:
    """Where one chunk of a manifest goes in the assembled file."""

    hash: str
    offset: int
    length: int


def placements(entries: Iterable[ChunkRef]) -> Iterator[Placement]:
    offset = 0
    for ref in entries:
        yield Placement(ref.hash, offset, ref.length)
        offset += ref.length
