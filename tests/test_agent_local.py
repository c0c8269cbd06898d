"""Unit tests on local files only: agent/chunker.py (scan), agent/apply.py (assemble, verify, apply), agent/state.py."""

from __future__ import annotations

import json
import os
import random
import stat
import tracemalloc
from pathlib import Path
from urllib.parse import quote

import blake3
import pytest
from brokers import missing_in_ci

from agent.apply import (
    ApplyError,
    Assembly,
    ContentMismatch,
    is_temp_name,
    remove_stale_temps,
    temp_path_for,
)
from agent.chunker import FileStat, hash_file, scan_file, stat_of
from agent.state import AgentState, StateError
from schemas.frames import MAX_CHUNK, MIN_CHUNK
from schemas.manifest import ChunkRef
from schemas.messages import Head

MiB = 1024 * 1024


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_random(path: Path, size: int, seed: int, block: int = MiB) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(block, left)
            fh.write(rng.randbytes(n))
            left -= n


# -- chunker ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_16m() -> bytes:
    return random_bytes(16 * MiB, seed=1)


def test_scan_chunks_within_limits_and_hashes(tmp_path: Path, data_16m: bytes) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(data_16m)
    scan = scan_file(path)
    assert scan.size == len(data_16m)
    assert scan.hash == b3(data_16m)
    assert sum(c.length for c in scan.chunks) == len(data_16m)
    assert len(scan.chunks) > 16  # content-defined, not one big block
    for c in scan.chunks[:-1]:
        assert MIN_CHUNK <= c.length <= MAX_CHUNK
    assert 0 < scan.chunks[-1].length <= MAX_CHUNK
    offset = 0
    for c in scan.chunks:
        assert c.hash == b3(data_16m[offset : offset + c.length])
        offset += c.length
    assert scan.stat == FileStat.of(os.stat(path))


def test_scan_identical_content_gives_identical_chunks(tmp_path: Path) -> None:
    data = random_bytes(3 * MiB, seed=2)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data)
    a, b = scan_file(tmp_path / "a"), scan_file(tmp_path / "b")
    assert a.chunks == b.chunks
    assert a.hash == b.hash


@pytest.mark.parametrize("size", [0, 1, 1000, MIN_CHUNK - 1, MIN_CHUNK, MAX_CHUNK + 1])
def test_scan_small_files(tmp_path: Path, size: int) -> None:
    data = random_bytes(size, seed=size)
    path = tmp_path / "f"
    path.write_bytes(data)
    scan = scan_file(path)
    assert scan.hash == b3(data)
    assert scan.size == size
    assert sum(c.length for c in scan.chunks) == size
    assert all(0 < c.length <= MAX_CHUNK for c in scan.chunks)
    if size == 0:
        assert scan.chunks == ()


def test_scan_insertion_keeps_most_chunks(tmp_path: Path, data_16m: bytes) -> None:
    (tmp_path / "old").write_bytes(data_16m)
    mid = len(data_16m) // 2
    (tmp_path / "new").write_bytes(data_16m[:mid] + random_bytes(100, seed=9) + data_16m[mid:])
    old = {c.hash for c in scan_file(tmp_path / "old").chunks}
    new = scan_file(tmp_path / "new").chunks
    kept = sum(1 for c in new if c.hash in old)
    assert kept / len(new) >= 0.90
    assert kept < len(new)  # the chunk around the insertion did change


def test_hash_file_equals_scan_hash(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_random(path, 3 * MiB + 17, seed=3)
    digest, st = hash_file(path)
    assert digest == scan_file(path).hash == b3(path.read_bytes())
    assert st == stat_of(path)


def test_stat_of_missing_file(tmp_path: Path) -> None:
    assert stat_of(tmp_path / "nope") is None


def test_scan_memory_does_not_grow_with_file_size(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    write_random(path, 64 * MiB, seed=4)
    tracemalloc.start()
    try:
        scan = scan_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.size == 64 * MiB
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB while scanning a 64 MiB file"


# -- apply: Assembly -----------------------------------------------------------------------------------


def refs_of(*parts: bytes) -> list[ChunkRef]:
    return [ChunkRef(b3(p), len(p)) for p in parts]


@pytest.fixture
def parts() -> tuple[bytes, bytes, bytes]:
    return random_bytes(70_000, 10), random_bytes(1000, 11), random_bytes(33_333, 12)


@pytest.fixture
def sync_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sync"
    d.mkdir()
    return d


@pytest.fixture
def partial_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "partial"  # created by Assembly


def assembly(partial_dir: Path, target: Path, *chunks: bytes, file_id: str = "art/hero.png") -> Assembly:
    content = b"".join(chunks)
    return Assembly(partial_dir, target, file_id, b3(content), len(content), refs_of(*chunks))


def part_name(file_id: str, content: bytes) -> str:
    return f"{quote(file_id, safe='')}.{b3(content)[:24]}.part"


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_assembly_put_copy_local_finish_swap_in(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, c3 = parts
    target = sync_dir / "hero.png"
    old = c3 + c1  # the local (old) version holds c1 and c3 at other offsets
    target.write_bytes(old)
    new = c1 + c2 + c3 + c1  # c1 appears twice
    asm = assembly(partial_dir, target, c1, c2, c3, c1)
    assert asm.resumed == 0
    assert asm.part.parent == partial_dir
    assert asm.part.name == part_name("art/hero.png", new)
    assert asm.journal.parent == partial_dir
    assert asm.part.exists()
    assert listing(sync_dir) == ["hero.png"]  # nothing is built beside the target
    index = {b3(c3): (0, len(c3)), b3(c1): (len(c3), len(c1))}
    needed = asm.copy_local(target, index)
    assert needed == {b3(c2)}
    assert target.read_bytes() == old  # untouched until swap_in
    asm.put(b3(c2), memoryview(c2))
    asm.finish(b3(new))
    assert target.read_bytes() == old
    asm.swap_in(None)
    assert target.read_bytes() == new
    assert not asm.part.exists()
    assert not asm.journal.exists()
    assert listing(sync_dir) == ["hero.png"]
    assert listing(partial_dir) == []
    asm.abort()  # harmless after swap_in (callers abort in a finally)


def test_assembly_into_a_new_file(sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]) -> None:
    c1, c2, _ = parts
    target = sync_dir / "new.bin"
    asm = assembly(partial_dir, target, c1, c2)
    assert asm.copy_local(target, {}) == {b3(c1), b3(c2)}
    assert asm.copy_local(target, {b3(c1): (0, len(c1))}) == {b3(c1), b3(c2)}  # no local file
    asm.put(b3(c2), memoryview(c2))
    asm.put(b3(c1), memoryview(c1))
    asm.finish(b3(c1 + c2))
    asm.swap_in(None)
    assert target.read_bytes() == c1 + c2
    assert listing(sync_dir) == ["new.bin"]
    assert listing(partial_dir) == []


def test_copy_local_skips_chunks_whose_local_bytes_changed(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, _ = parts
    target = sync_dir / "f"
    target.write_bytes(b"X" * len(c1) + c2)  # the index is stale for c1
    asm = assembly(partial_dir, target, c1, c2)
    needed = asm.copy_local(target, {b3(c1): (0, len(c1)), b3(c2): (len(c1), len(c2))})
    assert needed == {b3(c1)}
    assert asm.done == {b3(c2)}
    asm.abort()


def test_put_rejects_wrong_length_or_unknown_chunk(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, _ = parts
    asm = assembly(partial_dir, sync_dir / "f", c1)
    with pytest.raises(ApplyError):
        asm.put(b3(c1), memoryview(c1[:-1]))
    with pytest.raises(ApplyError):
        asm.put(b3(c2), memoryview(c2))
    assert asm.done == set()
    asm.abort()
    assert not (sync_dir / "f").exists()
    assert listing(sync_dir) == []
    # a rejected chunk is not journalled: a resumed attempt still needs it
    again = assembly(partial_dir, sync_dir / "f", c1)
    assert again.resumed == 0
    assert again.copy_local(sync_dir / "f", {}) == {b3(c1)}
    again.discard()
    assert listing(partial_dir) == []


def test_finish_with_wrong_hash_discards_and_leaves_target(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, _ = parts
    target = sync_dir / "hero.png"
    target.write_bytes(b"old content")
    asm = assembly(partial_dir, target, c1, c2)
    asm.put(b3(c1), memoryview(c1))
    asm.put(b3(c2), memoryview(c2))
    with pytest.raises(ContentMismatch):
        asm.finish(b3(b"something else"))
    assert issubclass(ContentMismatch, ApplyError)
    assert not asm.part.exists()
    assert not asm.journal.exists()
    assert listing(partial_dir) == []
    assert target.read_bytes() == b"old content"
    assert listing(sync_dir) == ["hero.png"]


def test_finish_detects_a_missing_chunk(sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]) -> None:
    c1, c2, _ = parts
    target = sync_dir / "f"
    asm = assembly(partial_dir, target, c1, c2)
    asm.put(b3(c1), memoryview(c1))  # c2 never arrived: zeros in the part file
    with pytest.raises(ApplyError):
        asm.finish(b3(c1 + c2))
    assert not target.exists()
    assert not asm.part.exists()
    assert not asm.journal.exists()
    assert listing(sync_dir) == []


def test_swap_in_keeps_the_old_mode(sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]) -> None:
    c1, _, _ = parts
    target = sync_dir / "tool.sh"
    target.write_bytes(b"old")
    os.chmod(target, 0o751)
    mode = stat.S_IMODE(os.stat(target).st_mode)
    asm = assembly(partial_dir, target, c1)
    asm.put(b3(c1), memoryview(c1))
    asm.finish(b3(c1))
    asm.swap_in(mode)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o751
    assert target.read_bytes() == c1
    assert listing(sync_dir) == ["tool.sh"]


def test_swap_in_new_file_gets_umask_mode_not_0600(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, _, _ = parts
    target = sync_dir / "new"
    asm = assembly(partial_dir, target, c1)
    asm.put(b3(c1), memoryview(c1))
    asm.finish(b3(c1))
    asm.swap_in(None)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask


def test_empty_assembly(sync_dir: Path, partial_dir: Path) -> None:
    target = sync_dir / "empty"
    target.write_bytes(b"was not empty")
    asm = Assembly(partial_dir, target, "empty", b3(b""), 0, [])
    assert asm.copy_local(target, {}) == set()
    asm.finish(b3(b""))
    asm.swap_in(None)
    assert target.read_bytes() == b""
    assert listing(sync_dir) == ["empty"]
    assert listing(partial_dir) == []


def test_swap_in_across_file_systems(tmp_path: Path, parts: tuple[bytes, bytes, bytes]) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        missing_in_ci("needs a partial dir on another file system than the target (/dev/shm)")
    c1, c2, _ = parts
    target = tmp_path / "hero.png"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    partial = shm / f"atrius-test-{os.getpid()}-{tmp_path.name}"
    try:
        asm = assembly(partial, target, c1, c2)
        asm.put(b3(c1), memoryview(c1))
        asm.put(b3(c2), memoryview(c2))
        asm.finish(b3(c1 + c2))
        asm.swap_in(0o640)
        assert target.read_bytes() == c1 + c2
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
        assert listing(tmp_path) == ["hero.png"]  # the temp copy beside the target is gone
        assert listing(partial) == []
    finally:
        for p in partial.glob("*"):
            p.unlink()
        partial.rmdir()


# -- apply: resuming an Assembly -------------------------------------------------------------------------


def test_resume_after_abort(sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]) -> None:
    c1, c2, c3 = parts
    new = c1 + c2 + c3
    target = sync_dir / "hero.png"
    target.write_bytes(b"old")
    first = assembly(partial_dir, target, c1, c2, c3)
    first.put(b3(c1), memoryview(c1))
    first.put(b3(c2), memoryview(c2))
    first.abort()  # e.g. the transfer failed or the agent stopped
    assert first.part.exists()
    assert first.journal.stat().st_size == 2 * 32
    assert target.read_bytes() == b"old"
    assert listing(sync_dir) == ["hero.png"]

    again = assembly(partial_dir, target, c1, c2, c3)
    assert again.part == first.part
    assert again.resumed == 2
    assert again.done == {b3(c1), b3(c2)}
    assert again.copy_local(target, {}) == {b3(c3)}
    again.put(b3(c3), memoryview(c3))
    again.finish(b3(new))
    again.swap_in(None)
    assert target.read_bytes() == new
    assert not again.part.exists()
    assert not again.journal.exists()
    assert listing(partial_dir) == []
    assert listing(sync_dir) == ["hero.png"]


def test_resume_after_abort_with_a_duplicated_chunk(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, _ = parts
    new = c1 + c2 + c1
    target = sync_dir / "f"
    first = assembly(partial_dir, target, c1, c2, c1)
    first.put(b3(c1), memoryview(c1))  # written at both offsets
    first.abort()
    again = assembly(partial_dir, target, c1, c2, c1)
    assert again.resumed == 1
    assert again.copy_local(target, {}) == {b3(c2)}
    again.put(b3(c2), memoryview(c2))
    again.finish(b3(new))
    again.swap_in(None)
    assert target.read_bytes() == new


def test_resume_recounts_a_chunk_copied_locally(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, _ = parts
    target = sync_dir / "f"
    target.write_bytes(c2)
    first = assembly(partial_dir, target, c1, c2)
    assert first.copy_local(target, {b3(c2): (0, len(c2))}) == {b3(c1)}
    first.abort()
    again = assembly(partial_dir, target, c1, c2)
    assert again.resumed == 1
    assert again.copy_local(target, {b3(c2): (0, len(c2))}) == {b3(c1)}
    again.discard()
    assert listing(partial_dir) == []


def test_resume_ignores_a_journalled_chunk_whose_bytes_were_corrupted(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, c3 = parts
    new = c1 + c2 + c3
    target = sync_dir / "f"
    first = assembly(partial_dir, target, c1, c2, c3)
    first.put(b3(c1), memoryview(c1))
    first.put(b3(c2), memoryview(c2))
    first.abort()
    with open(first.part, "r+b") as fh:  # flip one byte inside c2's range
        fh.seek(len(c1) + 10)
        b = fh.read(1)
        fh.seek(len(c1) + 10)
        fh.write(bytes([b[0] ^ 0xFF]))
    again = assembly(partial_dir, target, c1, c2, c3)
    assert again.resumed == 1
    assert again.done == {b3(c1)}
    assert again.copy_local(target, {}) == {b3(c2), b3(c3)}
    again.put(b3(c2), memoryview(c2))
    again.put(b3(c3), memoryview(c3))
    again.finish(b3(new))
    again.swap_in(None)
    assert target.read_bytes() == new


def test_resume_after_the_part_file_vanished(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, _ = parts
    target = sync_dir / "f"
    first = assembly(partial_dir, target, c1, c2)
    first.put(b3(c1), memoryview(c1))
    first.abort()
    first.part.unlink()  # the journal says c1 is there, but the bytes are gone
    again = assembly(partial_dir, target, c1, c2)
    assert again.resumed == 0
    assert again.copy_local(target, {}) == {b3(c1), b3(c2)}
    again.discard()


def test_new_version_removes_the_partial_of_an_older_one(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, c3 = parts
    target = sync_dir / "hero.png"
    older = assembly(partial_dir, target, c1, c2)
    older.put(b3(c1), memoryview(c1))
    older.abort()
    other_file = assembly(partial_dir, sync_dir / "other.png", c1, file_id="art/other.png")
    other_file.put(b3(c1), memoryview(c1))
    other_file.abort()
    assert older.part.exists() and older.journal.exists()

    newer = assembly(partial_dir, target, c1, c3)
    assert newer.part != older.part
    assert not older.part.exists()
    assert not older.journal.exists()
    assert newer.resumed == 0  # the old version's progress does not count for the new one
    assert other_file.part.exists() and other_file.journal.exists()  # another file's partial stays
    assert listing(partial_dir) == sorted(
        p.name for p in (newer.part, newer.journal, other_file.part, other_file.journal)
    )
    assert newer.copy_local(target, {}) == {b3(c1), b3(c3)}
    newer.put(b3(c1), memoryview(c1))
    newer.put(b3(c3), memoryview(c3))
    newer.finish(b3(c1 + c3))
    newer.swap_in(None)
    assert target.read_bytes() == c1 + c3
    assert listing(partial_dir) == sorted(p.name for p in (other_file.part, other_file.journal))


def test_new_version_keeps_the_partial_of_a_file_whose_id_extends_this_one(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, _ = parts
    bak = assembly(partial_dir, sync_dir / "hero.png.bak", c1, file_id="hero.png.bak")
    bak.put(b3(c1), memoryview(c1))
    bak.abort()
    assembly(partial_dir, sync_dir / "hero.png", c2, file_id="hero.png").abort()
    assert bak.part.exists() and bak.journal.exists()


@pytest.mark.parametrize("tail", [8, 31])
def test_resume_tolerates_a_torn_journal_record(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes], tail: int
) -> None:
    c1, c2, c3 = parts
    new = c1 + c2 + c3
    target = sync_dir / "f"
    first = assembly(partial_dir, target, c1, c2, c3)
    first.put(b3(c1), memoryview(c1))
    first.abort()
    with open(first.journal, "ab") as fh:  # a crash in the middle of journalling c2
        fh.write(bytes.fromhex(b3(c2))[:tail])
    assert first.journal.stat().st_size == 32 + tail
    again = assembly(partial_dir, target, c1, c2, c3)
    assert again.resumed == 1
    assert again.copy_local(target, {}) == {b3(c2), b3(c3)}
    again.put(b3(c2), memoryview(c2))
    again.put(b3(c3), memoryview(c3))
    again.finish(b3(new))
    again.swap_in(None)
    assert target.read_bytes() == new
    assert listing(partial_dir) == []


def test_resume_ignores_journal_entries_for_unknown_chunks(
    sync_dir: Path, partial_dir: Path, parts: tuple[bytes, bytes, bytes]
) -> None:
    c1, c2, _ = parts
    target = sync_dir / "f"
    first = assembly(partial_dir, target, c1, c2)
    first.abort()
    first.journal.write_bytes(bytes.fromhex(b3(b"not a chunk of this version")) + b"\0" * 32)
    again = assembly(partial_dir, target, c1, c2)
    assert again.resumed == 0
    assert again.copy_local(target, {}) == {b3(c1), b3(c2)}
    again.discard()
    assert listing(partial_dir) == []


def test_remove_stale_temps_removes_only_our_temp_names(tmp_path: Path) -> None:
    target = tmp_path / "hero.png"
    ours = [temp_path_for(target), temp_path_for(target), tmp_path / ".hero.png.atrius-0.tmp"]
    others = [
        target,
        tmp_path / "hero.png.bak",
        tmp_path / ".hero.png.swp",
        tmp_path / "hero.png.atrius-1234.tmp",  # no leading dot
        tmp_path / ".hero.png.atrius-1234.tmp.keep",
        tmp_path / ".hero.atrius-1234.tmp",  # the temp of "hero", not of "hero.png"
        tmp_path / ".hero.png.old.atrius-1234.tmp",  # the temp of "hero.png.old"
        temp_path_for(tmp_path / "other.png"),
    ]
    for p in ours + others:
        p.write_bytes(b"x")
    assert remove_stale_temps(target) == len(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)


def test_remove_stale_temps_in_missing_folder(tmp_path: Path) -> None:
    assert remove_stale_temps(tmp_path / "nope" / "f") == 0


def test_temp_names() -> None:
    t = temp_path_for(Path("/x/hero.png"))
    assert t.parent == Path("/x")
    assert t.name.startswith(".hero.png.atrius-")
    assert t.name.endswith(".tmp")
    assert t != temp_path_for(Path("/x/hero.png"))
    assert is_temp_name(t.name)
    assert not is_temp_name("hero.png")
    assert not is_temp_name(".hero.png.swp")


# -- state ------------------------------------------------------------------------------------------------


def mk_head(file_id: str = "art/hero.png", version: int = 3) -> Head:
    return Head(
        file_id=file_id,
        hash="a" * 64,
        size=10,
        version=version,
        author="alice",
        chunks=1,
        manifest=["b" * 64],
        time=1.5,
    )


def test_state_save_load_round_trip(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "state")
    assert st.epoch == 0
    assert st.synced == {}
    assert st.next_epoch() == 1
    assert st.next_epoch() == 2
    st.set_synced(mk_head())
    st.set_synced(mk_head("Ünï/ß.png", version=7))
    assert st.dirty and AgentState(tmp_path / "state").synced == {}  # batched: on disk at the next save
    st.set_stat("art/hero.png", (5, 123, 42), "a" * 64)
    st.save_if_dirty()
    assert not st.dirty
    again = AgentState(tmp_path / "state")
    assert again.cached_hash("art/hero.png", (5, 123, 42)) == "a" * 64
    assert again.cached_hash("art/hero.png", (5, 124, 42)) is None  # another mtime: hash again
    assert again.epoch == 2
    assert again.synced == {"art/hero.png": mk_head(), "Ünï/ß.png": mk_head("Ünï/ß.png", version=7)}
    assert not list((tmp_path / "state").glob(".*.tmp"))


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00",
        b'{"epoch": 3, "synced": {"a": {"file_id": "a"}}}',
        b'{"epoch": "three"}',
        b"[]",
        b"null",
        b'{"epoch": null}',
        b'{"epoch": 1, "synced": []}',
        b'{"epoch": 1, "synced": {"a": 5}}',
    ],
    ids=["garbage", "binary", "bad-head", "bad-epoch", "list", "null", "null-epoch", "synced-list", "head-int"],
)
def test_corrupt_state_is_moved_aside(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "state"
    root.mkdir()
    (root / "state.json").write_bytes(content)
    st = AgentState(root)
    assert st.synced == {}
    moved = list(root.glob("state.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes() == content
    assert not (root / "state.json").exists()
    st.set_synced(mk_head())
    st.save_if_dirty()
    assert AgentState(root).synced == {"art/hero.png": mk_head()}


def test_blobs_are_hash_checked(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s")
    data = b"manifest page"
    st.put_blob(b3(data), data)
    assert st.get_blob(b3(data)) == data
    assert st.get_blob(b3(b"absent")) is None
    st.put_blob(b3(b"x"), memoryview(b"x"))
    assert st.get_blob(b3(b"x")) == b"x"


def test_get_blob_rejects_corrupt_blob(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s")
    data = b"page"
    st.put_blob(b3(data), data)
    (st.blob_dir / b3(data)).write_bytes(b"pagf")
    assert st.get_blob(b3(data)) is None


def test_put_blob_with_wrong_content_is_not_served(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s")
    with pytest.raises(StateError, match="does not match its hash"):
        st.put_blob(b3(b"right"), b"wrong")
    assert st.get_blob(b3(b"right")) is None


def test_put_blob_repairs_a_corrupt_blob(tmp_path: Path) -> None:
    """A blob that rotted on disk is replaced when it is fetched and stored again."""
    st = AgentState(tmp_path / "s")
    data = b"page"
    (st.blob_dir / b3(data)).write_bytes(b"rot!")
    assert st.get_blob(b3(data)) is None
    st.put_blob(b3(data), data)
    assert st.get_blob(b3(data)) == data


def test_snapshot_keeps_at_most_keep(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s")
    source = tmp_path / "hero.png"
    for i in range(6):
        # Replace the file like an apply does (a new inode), so hard-linked snapshots keep old content.
        fresh = tmp_path / f".new{i}"
        fresh.write_bytes(f"version {i}".encode())
        os.replace(fresh, source)
        snap = st.snapshot("art/hero.png", source, f"v{i}", keep=3)
        assert snap is not None
        assert snap.suffix == ".png"
        assert snap.read_bytes() == f"version {i}".encode()
    folder = st.snap_dir / "art%2Fhero.png"
    kept = sorted(folder.iterdir())
    assert len(kept) == 3
    assert sorted(p.read_bytes() for p in kept) == [b"version 3", b"version 4", b"version 5"]


def test_snapshot_disabled_or_missing_source(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s")
    source = tmp_path / "f"
    source.write_bytes(b"x")
    assert st.snapshot("f", source, "v1", keep=0) is None
    assert st.snapshot("f", tmp_path / "missing", "v1", keep=3) is None
    assert not any(st.snap_dir.iterdir())


def test_state_json_is_plain_json(tmp_path: Path) -> None:
    st = AgentState(tmp_path / "s")
    st.next_epoch()
    st.set_synced(mk_head())
    st.save_if_dirty()
    raw = json.loads((tmp_path / "s" / "state.json").read_text())
    assert raw["epoch"] == 1
    assert raw["synced"]["art/hero.png"]["version"] == 3
