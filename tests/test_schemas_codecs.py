"""Unit tests for the binary codecs: schemas/frames.py (data frames) and schemas/manifest.py (pages)."""

from __future__ import annotations

import base64
import itertools
import struct

import blake3
import pytest

from schemas.frames import (
    FRAME_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK,
    MAX_FRAME,
    MIN_CHUNK,
    FrameError,
    FrameStatus,
    decode_frame,
    encode_frame,
)
from schemas.manifest import (
    ENTRY_SIZE,
    INLINE_MAX_ENTRIES,
    PAGE_ENTRIES,
    ChunkRef,
    ManifestError,
    Placement,
    blob_hash,
    decode_inline,
    decode_page,
    encode_pages,
    inline_page,
    placements,
)


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


H = digest(b"chunk")

# -- frames ------------------------------------------------------------------------------------------


def test_chunk_limits_fit_under_broker_packet_caps() -> None:
    assert 64 * 1024 == MIN_CHUNK <= MAX_CHUNK == 512 * 1024
    assert MAX_FRAME == HEADER_SIZE + MAX_CHUNK
    assert MAX_FRAME < 1_000_000  # EMQX / amqtt WebSocket cap


@pytest.mark.parametrize("data", [b"", b"x", b"chunk" * 1000, bytes(MAX_CHUNK)])
def test_frame_round_trip_ok(data: bytes) -> None:
    h = digest(data)
    payload = encode_frame(FrameStatus.OK, h, data)
    assert len(payload) == HEADER_SIZE + len(data)
    frame = decode_frame(payload)
    assert frame.status is FrameStatus.OK
    assert frame.hash == h
    assert bytes(frame.data) == data


def test_frame_round_trip_memoryview_input() -> None:
    data = b"abc" * 10
    frame = decode_frame(encode_frame(FrameStatus.OK, H, memoryview(data)))
    assert bytes(frame.data) == data


def test_frame_round_trip_missing() -> None:
    frame = decode_frame(encode_frame(FrameStatus.MISSING, H))
    assert frame.status is FrameStatus.MISSING
    assert frame.hash == H
    assert len(frame.data) == 0


def test_frame_header_layout() -> None:
    payload = encode_frame(FrameStatus.OK, H, b"xy")
    assert payload[:2] == MAGIC == b"AT"
    assert payload[2] == FRAME_VERSION == 1
    assert payload[3] == FrameStatus.OK
    assert payload[4:36] == bytes.fromhex(H)
    assert payload[36:] == b"xy"


def test_encode_rejects_oversized_blob() -> None:
    with pytest.raises(FrameError):
        encode_frame(FrameStatus.OK, H, bytes(MAX_CHUNK + 1))


@pytest.mark.parametrize(
    "bad", ["ab", "a" * 62, "a" * 66, "zz" * 32, ""], ids=["1-byte", "31-bytes", "33-bytes", "not-hex", "empty"]
)
def test_encode_rejects_a_hash_that_is_not_32_bytes_of_hex(bad: str) -> None:
    # A short hash must not be silently zero-padded into some other 32-byte digest.
    with pytest.raises(ValueError):
        encode_frame(FrameStatus.OK, bad, b"x")


@pytest.mark.parametrize("n", [0, 1, HEADER_SIZE - 1])
def test_decode_truncated(n: int) -> None:
    payload = encode_frame(FrameStatus.OK, H, b"data")
    with pytest.raises(FrameError, match="shorter"):
        decode_frame(payload[:n])


def test_decode_oversized() -> None:
    payload = encode_frame(FrameStatus.OK, H, bytes(MAX_CHUNK)) + b"!"
    assert len(payload) == MAX_FRAME + 1
    with pytest.raises(FrameError, match="exceeds"):
        decode_frame(payload)


def test_decode_exactly_max_frame() -> None:
    payload = encode_frame(FrameStatus.OK, H, bytes(MAX_CHUNK))
    assert len(payload) == MAX_FRAME
    assert len(decode_frame(payload).data) == MAX_CHUNK


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("!2sBB", b"XX", FRAME_VERSION, 0),
        struct.pack("!2sBB", b"at", FRAME_VERSION, 0),
        struct.pack("!2sBB", MAGIC, 0, 0),
        struct.pack("!2sBB", MAGIC, 2, 0),
        struct.pack("!2sBB", MAGIC, 255, 0),
    ],
)
def test_decode_wrong_magic_or_version(header: bytes) -> None:
    with pytest.raises(FrameError, match="not an Atrius v1 frame"):
        decode_frame(header + bytes.fromhex(H) + b"data")


@pytest.mark.parametrize("status", [2, 7, 255])
def test_decode_unknown_status(status: int) -> None:
    payload = struct.pack("!2sBB", MAGIC, FRAME_VERSION, status) + bytes.fromhex(H)
    with pytest.raises(FrameError, match="unknown frame status"):
        decode_frame(payload)


def test_decode_missing_frame_with_data() -> None:
    payload = encode_frame(FrameStatus.MISSING, H) + b"x"
    with pytest.raises(FrameError, match="no data"):
        decode_frame(payload)


def test_frame_error_is_value_error() -> None:
    assert issubclass(FrameError, ValueError)


# -- manifest pages -----------------------------------------------------------------------------------


def refs(n: int, *, start: int = 0) -> list[ChunkRef]:
    return [ChunkRef(digest(i.to_bytes(4, "big")), MIN_CHUNK + (i % 1000)) for i in range(start, start + n)]


def test_entry_and_page_sizes_fit_under_the_blob_cap() -> None:
    assert ENTRY_SIZE == 36
    assert PAGE_ENTRIES * ENTRY_SIZE <= MAX_CHUNK


def test_encode_pages_empty() -> None:
    assert encode_pages([]) == []


@pytest.mark.parametrize(
    ("n", "page_counts"),
    [
        (1, [1]),
        (64, [64]),
        (PAGE_ENTRIES - 1, [PAGE_ENTRIES - 1]),
        (PAGE_ENTRIES, [PAGE_ENTRIES]),
        (PAGE_ENTRIES + 1, [PAGE_ENTRIES, 1]),
        (2 * PAGE_ENTRIES + 5, [PAGE_ENTRIES, PAGE_ENTRIES, 5]),
    ],
)
def test_pages_round_trip_across_the_page_boundary(n: int, page_counts: list[int]) -> None:
    entries = refs(n)
    pages = encode_pages(iter(entries))  # any iterable, consumed once
    assert [len(p) // ENTRY_SIZE for p in pages] == page_counts
    assert all(len(p) % ENTRY_SIZE == 0 for p in pages)
    decoded = [ref for page in pages for ref in decode_page(page)]
    assert decoded == entries


def test_decode_page_accepts_memoryview() -> None:
    entries = refs(3)
    (page,) = encode_pages(entries)
    assert decode_page(memoryview(page)) == entries


@pytest.mark.parametrize(
    "size", [0, 1, ENTRY_SIZE - 1, ENTRY_SIZE + 1, 2 * ENTRY_SIZE - 1, (PAGE_ENTRIES + 1) * ENTRY_SIZE]
)
def test_decode_page_malformed_sizes(size: int) -> None:
    with pytest.raises(ManifestError, match="malformed"):
        decode_page(bytes(size))


@pytest.mark.parametrize("length", [0, MAX_CHUNK + 1, 2**32 - 1])
def test_decode_page_rejects_chunk_lengths_out_of_range(length: int) -> None:
    page = bytes.fromhex(H) + struct.pack("!I", length)
    with pytest.raises(ManifestError, match="out of range"):
        decode_page(page)


@pytest.mark.parametrize("length", [1, MAX_CHUNK])
def test_decode_page_accepts_chunk_length_bounds(length: int) -> None:
    page = bytes.fromhex(H) + struct.pack("!I", length)
    assert decode_page(page) == [ChunkRef(H, length)]


def test_decode_page_rejects_bad_entry_after_good_ones() -> None:
    good = encode_pages(refs(5))[0]
    with pytest.raises(ManifestError):
        decode_page(good + bytes.fromhex(H) + struct.pack("!I", 0))


# -- inline manifests ----------------------------------------------------------------------------------


def test_inline_page_for_a_small_single_page() -> None:
    entries = refs(INLINE_MAX_ENTRIES)
    pages = encode_pages(entries)
    text = inline_page(pages, len(entries))
    assert text is not None
    assert base64.b64decode(text) == pages[0]
    assert len(text) < 3200


def test_inline_page_none_when_too_many_entries() -> None:
    entries = refs(INLINE_MAX_ENTRIES + 1)
    assert inline_page(encode_pages(entries), len(entries)) is None


def test_inline_page_none_for_several_pages() -> None:
    pages = encode_pages(refs(PAGE_ENTRIES + 1))
    assert inline_page(pages, 1) is None


def test_inline_page_none_for_no_pages() -> None:
    assert inline_page([], 0) is None


def test_decode_inline_round_trip() -> None:
    pages = encode_pages(refs(10))
    text = inline_page(pages, 10)
    assert text is not None
    page = decode_inline(text, blob_hash(pages[0]))
    assert page == pages[0]
    assert decode_page(page) == refs(10)


def test_decode_inline_hash_mismatch() -> None:
    pages = encode_pages(refs(10))
    text = inline_page(pages, 10)
    assert text is not None
    with pytest.raises(ManifestError, match="does not match"):
        decode_inline(text, blob_hash(b"other"))


def test_decode_inline_tampered_content() -> None:
    pages = encode_pages(refs(10))
    good_hash = blob_hash(pages[0])
    tampered = bytearray(pages[0])
    tampered[-1] ^= 1
    with pytest.raises(ManifestError, match="does not match"):
        decode_inline(base64.b64encode(bytes(tampered)).decode(), good_hash)


@pytest.mark.parametrize("text", ["not base64!", "AAA", "AA\nAA", "ÿÿÿÿ"])
def test_decode_inline_not_base64(text: str) -> None:
    with pytest.raises(ManifestError):
        decode_inline(text, H)


def test_blob_hash_is_blake3() -> None:
    assert blob_hash(b"abc") == blake3.blake3(b"abc").hexdigest()
    assert blob_hash(memoryview(b"abc")) == blob_hash(b"abc")


# -- placements ----------------------------------------------------------------------------------------


def test_placements_offsets() -> None:
    a, b, c = digest(b"a"), digest(b"b"), digest(b"c")
    entries = [ChunkRef(a, 10), ChunkRef(b, 20), ChunkRef(a, 10), ChunkRef(c, 5)]
    assert list(placements(entries)) == [
        Placement(a, 0, 10),
        Placement(b, 10, 20),
        Placement(a, 30, 10),
        Placement(c, 40, 5),
    ]


def test_placements_empty() -> None:
    assert list(placements([])) == []


def test_placements_cover_the_file_contiguously() -> None:
    entries = refs(PAGE_ENTRIES + 3)
    out = list(placements(entries))
    assert out[0].offset == 0
    for prev, nxt in itertools.pairwise(out):
        assert nxt.offset == prev.offset + prev.length
    assert out[-1].offset + out[-1].length == sum(r.length for r in entries)
