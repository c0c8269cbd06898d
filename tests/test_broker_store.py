"""The coordinator's blob store on disk and the retention policy that sweeps it: verify, corrupt, full disk, GC."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import small_disk

from broker.coordinator import Coordinator, Retention, RetentionPolicy
from broker.history import Record
from broker.store import ChunkStore, StoreError
from schemas.manifest import ChunkRef, blob_hash, encode_pages, inline_page
from schemas.messages import Head, VersionEntry, VersionKind
from schemas.mqtt import BrokerUrl

SPACE = "game"
FID = "art/hero.png"
HOUR = 3600.0
DAY = 86400.0


def blob(tag: str, size: int = 1000) -> bytes:
    seed = tag.encode()
    return (seed * (size // len(seed) + 1))[:size]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def backdate(root: Path, seconds: float, coord: Coordinator | None = None) -> None:
    """Make every blob look written ``seconds`` ago (sweep only deletes blobs older than the mark phase).

    With ``coord``, its history is flushed first, as the timer would have done long since.
    """
    if coord is not None:
        coord.history.flush()
    old = time.time() - seconds
    for p in files_under(root):
        os.utime(p, (old, old))


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path)


# -- put / get / has -----------------------------------------------------------------------------------


def test_put_get_has(store: ChunkStore) -> None:
    data = blob("hello", 5000)
    d = blob_hash(data)
    assert not store.has(d)
    assert store.get(d) is None
    assert store.put(d, data)
    assert store.has(d)
    assert store.get(d) == data
    assert store.put(blob_hash(b"x"), memoryview(b"x"))  # memoryviews are accepted as sent by the exchange
    assert store.get(blob_hash(b"x")) == b"x"


def test_layout_is_two_level_fan_out(store: ChunkStore, tmp_path: Path) -> None:
    data = blob("layout")
    d = blob_hash(data)
    store.put(d, data)
    assert store.path(d) == tmp_path / "chunks" / d[:2] / d[2:4] / d
    assert files_under(tmp_path / "chunks") == [tmp_path / "chunks" / d[:2] / d[2:4] / d]
    assert store.path(d).read_bytes() == data


def test_put_twice_returns_false(store: ChunkStore) -> None:
    data = blob("twice")
    d = blob_hash(data)
    assert store.put(d, data) is True
    assert store.put(d, data) is False
    assert store.get(d) == data


def test_put_refuses_data_that_does_not_match_its_hash(store: ChunkStore, tmp_path: Path) -> None:
    good, evil = blob("good"), blob("evil")
    d = blob_hash(good)
    with pytest.raises(StoreError, match=f"refusing blob {d[:12]}.*does not match its hash"):
        store.put(d, evil)
    assert not store.has(d)
    assert store.get(d) is None
    assert files_under(tmp_path / "chunks") == []


def test_corrupt_blob_is_moved_aside_and_never_served(store: ChunkStore, caplog: pytest.LogCaptureFixture) -> None:
    data = blob("rotten", 4096)
    d = blob_hash(data)
    store.put(d, data)
    p = store.path(d)
    rotted = bytearray(data)
    rotted[100] ^= 0xFF
    p.write_bytes(bytes(rotted))
    assert store.get(d) is None
    assert store.corrupt_found == 1
    assert "corrupt" in caplog.text and d[:12] in caplog.text
    assert not p.exists()
    assert p.with_name(d + ".corrupt").read_bytes() == bytes(rotted)
    assert not store.has(d)
    assert store.get(d) is None  # still not served, and not counted twice
    assert store.corrupt_found == 1
    # a good copy can be stored again (the coordinator re-fetches it from devices)
    assert store.put(d, data) is True
    assert store.get(d) == data
    assert store.corrupt_found == 1


def test_truncated_blob_is_corrupt(store: ChunkStore) -> None:
    data = blob("truncated", 4096)
    d = blob_hash(data)
    store.put(d, data)
    store.path(d).write_bytes(data[:-1])
    assert store.get(d) is None
    assert store.corrupt_found == 1


# -- full disk ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (fails in CI, skips elsewhere, when this process may not mount one)."""
    with small_disk(tmp_path / "tiny", "1m") as mnt:
        yield mnt


def test_full_disk_raises_store_error_and_keeps_earlier_blobs(tiny_disk: Path) -> None:
    store = ChunkStore(tiny_disk)
    stored: dict[str, bytes] = {}
    with pytest.raises(StoreError) as err:
        for _ in range(100):  # 100 x 64 KiB is far more than 1 MiB
            data = os.urandom(64 * 1024)
            d = blob_hash(data)
            store.put(d, data)
            stored[d] = data
    assert 1 <= len(stored) <= 16
    msg = str(err.value)
    assert msg.startswith("writing blob ") and "No space left on device" in msg
    assert str(tiny_disk / "chunks") in msg
    assert isinstance(err.value.__cause__, OSError)
    for d, data in stored.items():
        assert store.get(d) == data
    assert store.corrupt_found == 0
    leftovers = [p for p in files_under(tiny_disk) if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []
    assert {p.name for p in files_under(tiny_disk)} == set(stored)
    # once space is freed, storing works again
    first = next(iter(stored))
    store.path(first).unlink()
    small = b"fits now"
    assert store.put(blob_hash(small), small)


# -- sweep ---------------------------------------------------------------------------------------------


def test_sweep_deletes_unreferenced_old_blobs_only(store: ChunkStore, tmp_path: Path) -> None:
    old_kept, old_orphan, new_orphan = blob("kept"), blob("orphan"), blob("fresh")
    for data in (old_kept, old_orphan):
        store.put(blob_hash(data), data)
    backdate(tmp_path / "chunks", HOUR)
    store.put(blob_hash(new_orphan), new_orphan)
    removed = store.sweep({blob_hash(old_kept)}, older_than=time.time() - 60)
    assert removed == 1
    assert store.get(blob_hash(old_kept)) == old_kept
    assert not store.has(blob_hash(old_orphan))
    assert store.get(blob_hash(new_orphan)) == new_orphan  # newer than older_than: may belong to a new version


def test_sweep_skips_temp_files(store: ChunkStore) -> None:
    data = blob("kept")
    d = blob_hash(data)
    store.put(d, data)
    tmp = store.path(d).with_name(f".{d}.123.tmp")
    tmp.write_bytes(b"half")
    old = time.time() - HOUR
    os.utime(tmp, (old, old))
    assert store.sweep({d}, older_than=time.time()) == 0
    assert tmp.exists()


# -- Retention.keep -------------------------------------------------------------------------------------


def rec(version: int, when: float) -> Record:
    digest = f"{version:064x}"
    entry = VersionEntry(version=version, hash=digest, size=0, author="alice-pc", time=when)
    return Record(entry, Head(file_id=FID, hash=digest, size=0, version=version, author="alice-pc", time=when))


NOW = 1_700_000_000.0


def newest_first(n: int, spacing: float = DAY) -> list[Record]:
    return [rec(v, NOW - (n - v) * spacing) for v in range(n, 0, -1)]


def versions(records: list[Record]) -> list[int]:
    return [r.version for r in records]


def test_retention_keep_versions() -> None:
    records = newest_first(5)
    assert versions(Retention(keep_versions=2).keep(records, NOW)) == [5, 4]
    assert versions(Retention(keep_versions=10).keep(records, NOW)) == [5, 4, 3, 2, 1]
    assert versions(Retention(keep_versions=1).keep(records, NOW)) == [5]
    assert versions(Retention(keep_versions=0).keep(records, NOW)) == [5]  # the newest always stays


def test_retention_keep_days_uses_injected_now() -> None:
    records = newest_first(5)  # v5 now, v4 one day old, ... v1 four days old
    assert versions(Retention(keep_days=2).keep(records, NOW)) == [5, 4, 3]
    assert versions(Retention(keep_days=2).keep(records, NOW + DAY)) == [5, 4]
    assert versions(Retention(keep_days=0.5).keep(records, NOW)) == [5]


def test_retention_newest_kept_however_old() -> None:
    records = newest_first(3)
    assert versions(Retention(keep_days=1).keep(records, NOW + 365 * DAY)) == [3]


def test_retention_keeps_the_current_version_not_a_newer_conflict() -> None:
    """A conflict notice recorded as v4 (an offline edit that lost) is newer than the current v3."""
    records = newest_first(3)
    lost = rec(4, NOW)
    lost = Record(lost.entry.model_copy(update={"kind": VersionKind.CONFLICT}), lost.head)
    kept = Retention(keep_versions=1).keep([lost, *records], NOW + DAY)
    assert versions(kept) == [4, 3]  # the newest record fills the one slot; the current v3 stays anyway
    assert versions(Retention(keep_days=0.5).keep([lost, *records], NOW + DAY)) == [3]


def test_retention_both_limits_and_keep_all() -> None:
    records = newest_first(6)
    assert versions(Retention(keep_versions=4, keep_days=2).keep(records, NOW)) == [6, 5, 4]
    assert versions(Retention(keep_versions=2, keep_days=30).keep(records, NOW)) == [6, 5]
    assert Retention().keeps_all and not Retention(keep_versions=3).keeps_all
    assert versions(Retention().keep(records, NOW)) == [6, 5, 4, 3, 2, 1]
    assert Retention().keep([], NOW) == []


# -- collect_garbage end to end -----------------------------------------------------------------------


def coordinator(data_dir: Path, retention: Retention | RetentionPolicy) -> Coordinator:
    return Coordinator(BrokerUrl("127.0.0.1", 1, False), data_dir, retention=retention)


def store_version(coord: Coordinator, version: int, chunks: list[bytes], *, file_id: str = FID,
                  inline: bool = True, when: float | None = None) -> Head:
    """Put a version's chunks and manifest page in the store and record its head; returns the head."""
    entries = [ChunkRef(blob_hash(c), len(c)) for c in chunks]
    pages = encode_pages(entries)
    for c in chunks:
        coord.store.put(blob_hash(c), c)
    for page in pages:
        coord.store.put(blob_hash(page), page)
    content = b"".join(chunks)
    head = Head(file_id=file_id, hash=blob_hash(content), size=len(content), version=version, author="alice-pc",
                time=time.time() if when is None else when, chunks=len(chunks), manifest=[blob_hash(p) for p in pages],
                inline_manifest=inline_page(pages, len(chunks)) if inline else None)
    assert coord.history.record(SPACE, head)
    return head


def blobs_of(head: Head, chunks: list[bytes]) -> set[str]:
    return set(head.manifest) | {blob_hash(c) for c in chunks}


def test_collect_garbage_prunes_old_versions_and_their_unshared_blobs(tmp_path: Path) -> None:
    coord = coordinator(tmp_path, Retention(keep_versions=2))
    shared = blob("shared by v1 and v5", 3000)  # in a pruned and a kept version: must stay
    old_pair = blob("shared by v1 and v2 only", 2000)  # only in pruned versions: must go
    chunks = {
        1: [blob("v1-a"), shared, old_pair],
        2: [old_pair, blob("v2-a"), blob("v2-b")],
        3: [blob("v3-a")],
        4: [blob("v4-a"), blob("v4-b")],
        5: [blob("v5-a"), shared],
    }
    heads = {v: store_version(coord, v, c, inline=v % 2 == 1) for v, c in chunks.items()}
    other = store_version(coord, 1, [blob("other file")], file_id="levels/one.umap")
    backdate(tmp_path / "chunks", HOUR, coord)
    orphan_new = blob("written during the mark phase")
    coord.store.put(blob_hash(orphan_new), orphan_new)  # not backdated: too young to sweep

    kept = blobs_of(heads[4], chunks[4]) | blobs_of(heads[5], chunks[5])
    doomed = set().union(*(blobs_of(heads[v], chunks[v]) for v in (1, 2, 3))) - kept
    assert blob_hash(shared) in kept and blob_hash(old_pair) in doomed
    removed = asyncio.run(coord.collect_garbage())
    assert removed == len(doomed)
    for d in doomed:
        assert not coord.store.has(d)
    for d in kept | set(other.manifest) | {blob_hash(blob("other file")), blob_hash(orphan_new)}:
        assert coord.store.get(d) is not None, d
    for v in (4, 5):
        assert coord.entries_of(heads[v]) == [ChunkRef(blob_hash(c), len(c)) for c in chunks[v]]
    assert coord.store.corrupt_found == 0

    flags = {r.version: r.entry.pruned for r in coord.history.records(SPACE, FID)}
    assert flags == {5: False, 4: False, 3: True, 2: True, 1: True}
    assert not coord.history.records(SPACE, "levels/one.umap")[0].entry.pruned
    coord.history.close()
    reopened = coordinator(tmp_path, Retention(keep_versions=2))  # the pruned marks were flushed
    assert {r.version for r in reopened.history.records(SPACE, FID) if r.entry.pruned} == {1, 2, 3}
    assert asyncio.run(reopened.collect_garbage()) == 0  # a second pass finds nothing more
    reopened.history.close()


def test_collect_garbage_keeps_everything_without_a_policy(tmp_path: Path) -> None:
    coord = coordinator(tmp_path, Retention())
    for v in range(1, 4):
        store_version(coord, v, [blob(f"v{v}")])
    backdate(tmp_path / "chunks", HOUR, coord)
    before = files_under(tmp_path / "chunks")
    assert asyncio.run(coord.collect_garbage()) == 0
    assert files_under(tmp_path / "chunks") == before
    assert not any(r.entry.pruned for r in coord.history.records(SPACE, FID))
    coord.history.close()


def test_collect_garbage_by_age_keeps_a_deleted_newest_version(tmp_path: Path) -> None:
    coord = coordinator(tmp_path, Retention(keep_days=1))
    now = time.time()
    old = store_version(coord, 1, [blob("ancient")], when=now - 10 * DAY)
    recent = store_version(coord, 2, [blob("recent")], when=now - HOUR)
    gone = Head(file_id=FID, hash=recent.hash, size=0, version=3, author="bob-laptop", deleted=True, time=now)
    coord.history.record(SPACE, gone)
    backdate(tmp_path / "chunks", HOUR, coord)
    assert asyncio.run(coord.collect_garbage()) == len(blobs_of(old, [blob("ancient")]))
    assert all(coord.store.get(d) is not None for d in blobs_of(recent, [blob("recent")]))
    assert {r.version: r.entry.pruned for r in coord.history.records(SPACE, FID)} == {3: False, 2: False, 1: True}
    coord.history.close()


def test_collect_garbage_keeps_chunks_of_a_kept_version_whose_manifest_page_is_unreadable(tmp_path: Path) -> None:
    """A kept version whose manifest page is missing or corrupt still owns its chunks.

    Its chunks cannot be listed (``entries_of`` is None: the page was just moved aside by ``store.get``),
    so they must not be swept: the page alone can be re-fetched, the newest content perhaps not.
    """
    coord = coordinator(tmp_path, Retention(keep_versions=1))
    store_version(coord, 1, [blob("old")])
    chunks = [blob("newest-a", 5000), blob("newest-b", 5000)]
    newest = store_version(coord, 2, chunks, inline=False)
    backdate(tmp_path / "chunks", HOUR, coord)
    page = coord.store.path(newest.manifest[0])
    page.write_bytes(b"\0" * page.stat().st_size)  # bit rot in the page
    old = time.time() - HOUR
    os.utime(page, (old, old))
    asyncio.run(coord.collect_garbage())
    for c in chunks:
        assert coord.store.get(blob_hash(c)) == c
    coord.history.close()


@pytest.mark.parametrize("inline", [True, False], ids=["inline-manifest", "stored-manifest"])
def test_collect_garbage_keeps_old_blob_reused_by_a_head_recorded_during_the_sweep(tmp_path: Path,
                                                                                   inline: bool) -> None:
    """The sweep runs in a worker thread while the loop records and pulls new heads.

    A head that reuses old, unreferenced blobs (a revert to pruned content) finds them in the store and
    fetches nothing; those blobs must not then be deleted by the sweep already under way.
    """
    coord = coordinator(tmp_path, Retention(keep_versions=1))
    reverted = [blob("content of v1", 3000), blob("more of v1", 2000)]
    v1 = store_version(coord, 1, reverted, inline=inline)
    store_version(coord, 2, [blob("v2")])
    backdate(tmp_path / "chunks", HOUR, coord)
    real_sweep = coord.store.sweep
    head3 = v1.model_copy(update={"version": 3, "time": time.time(), "parent": None})

    def sweep_while_a_revert_arrives(keep: set[str], older_than: float) -> int:
        # what _on_head and the pull do for the new head, on the loop, while this thread sweeps
        coord.history.record(SPACE, head3)
        assert asyncio.run(coord._pull_once(SPACE, head3)) == 0  # every blob is there: nothing fetched
        return real_sweep(keep, older_than)

    coord.store.sweep = sweep_while_a_revert_arrives  # type: ignore[method-assign]
    asyncio.run(coord.collect_garbage())
    latest = coord.history.latest(SPACE, FID)
    assert latest is not None and latest.version == 3
    entries = coord.entries_of(latest.head)
    assert entries is not None
    assert all(coord.store.get(e.hash) is not None for e in entries)
    assert {r.version: r.entry.pruned for r in coord.history.records(SPACE, FID)} == {3: False, 2: False, 1: True}
    coord.history.close()


def test_collect_garbage_keeps_blobs_of_a_new_file_not_yet_flushed(tmp_path: Path) -> None:
    """A file recorded less than a flush interval ago is part of the history too.

    Here a brand-new file (a copy of an asset, all of whose chunks are old blobs already in the store)
    appears after the original was deleted; its blobs must be marked although its block is not flushed.
    """
    coord = coordinator(tmp_path, Retention(keep_versions=1))
    content = [blob("asset", 4000)]
    store_version(coord, 1, content, file_id="art/hero.png")
    backdate(tmp_path / "chunks", HOUR, coord)
    coord.history.flush_interval = 3600  # the next timed flush is still to come
    gone = Head(file_id="art/hero.png", hash=blob_hash(content[0]), size=0, version=2, author="alice-pc",
                deleted=True, time=time.time())
    coord.history.record(SPACE, gone)  # the original is deleted (its content now only in pruned v1) ...
    store_version(coord, 1, content, file_id="art/hero copy.png")  # ... and a copy appears, not yet flushed
    asyncio.run(coord.collect_garbage())
    copy = coord.history.latest(SPACE, "art/hero copy.png")
    assert copy is not None
    entries = coord.entries_of(copy.head)
    assert entries is not None
    assert all(coord.store.get(e.hash) is not None for e in entries)
    coord.history.close()


@pytest.mark.parametrize("inline", [True, False], ids=["inline-manifest", "stored-manifest"])
def test_collect_garbage_still_sweeps_when_a_kept_version_was_never_fetched(tmp_path: Path, inline: bool) -> None:
    """A version superseded before the coordinator pulled it is recorded but its content never stored.

    It is still listed and, while young enough, kept by the policy; it must not stop every later pass
    from deleting the blobs of versions that really were pruned (else one quick double save disables
    retention for as long as that version stays within ``--keep-versions`` / ``--keep-days``).
    """
    coord = coordinator(tmp_path, Retention(keep_versions=3))
    v1_chunks = [blob("v1 only", 8000)]
    v1 = store_version(coord, 1, v1_chunks)
    store_version(coord, 2, [blob("v2")])
    never = [blob("v3, replaced within a second")]
    pages = encode_pages([ChunkRef(blob_hash(c), len(c)) for c in never])
    v3 = Head(file_id=FID, hash=blob_hash(never[0]), size=len(never[0]), version=3, author="alice-pc",
              time=time.time(), chunks=1, manifest=[blob_hash(pages[0])],
              inline_manifest=inline_page(pages, 1) if inline else None)
    coord.history.record(SPACE, v3)  # recorded; the pull found it superseded and stored nothing
    store_version(coord, 4, [blob("v4")])
    backdate(tmp_path / "chunks", HOUR, coord)
    removed = asyncio.run(coord.collect_garbage())
    assert {r.version for r in coord.history.records(SPACE, FID) if r.entry.pruned} == {1}
    assert removed == len(blobs_of(v1, v1_chunks))
    assert not any(coord.store.has(d) for d in blobs_of(v1, v1_chunks))
    coord.history.close()


def test_pull_delay_grows_with_size_and_is_capped() -> None:
    from broker.coordinator import MAX_PULL_DELAY, PULL_DELAY, pull_delay

    assert pull_delay(0) == PULL_DELAY
    assert PULL_DELAY < pull_delay(10 << 20) < pull_delay(256 << 20) < MAX_PULL_DELAY
    assert pull_delay(1 << 40) == MAX_PULL_DELAY


def test_retention_policy_parse_defaults_and_per_space_overrides() -> None:
    p = RetentionPolicy.parse(["50", "big-game=10"], ["big-game=7", "30"])
    assert p.for_space("big-game") == Retention(keep_versions=10, keep_days=7.0)
    assert p.for_space("other") == Retention(keep_versions=50, keep_days=30.0)
    only_space = RetentionPolicy.parse(["art=3"], [])
    assert only_space.for_space("art") == Retention(keep_versions=3) and only_space.for_space("x").keeps_all
    assert not only_space.keeps_all and RetentionPolicy.parse([], []).keeps_all
    for bad, why in ((["x"], "not a number"), (["0"], "must be positive"), (["a b=3"], "not a valid name")):
        with pytest.raises(ValueError, match=why):
            RetentionPolicy.parse(bad, [])


def test_collect_garbage_applies_each_space_its_own_policy(tmp_path: Path) -> None:
    coord = coordinator(tmp_path, RetentionPolicy.parse([f"{SPACE}=1"], []))
    mine = [store_version(coord, v, [blob(f"{SPACE} v{v}")]) for v in (1, 2)]
    head_other = []
    for v in (1, 2):  # another space with no override keeps everything
        chunk = blob(f"other v{v}")
        coord.store.put(blob_hash(chunk), chunk)
        pages = encode_pages([ChunkRef(blob_hash(chunk), len(chunk))])
        for page in pages:
            coord.store.put(blob_hash(page), page)
        head = Head(file_id=FID, hash=blob_hash(chunk), size=len(chunk), version=v, author="bob-laptop",
                    time=time.time(), chunks=1, manifest=[blob_hash(p) for p in pages])
        assert coord.history.record("other-space", head)
        head_other.append((head, chunk))
    backdate(tmp_path / "chunks", HOUR, coord)
    asyncio.run(coord.collect_garbage())
    assert coord.store.get(blob_hash(blob(f"{SPACE} v1"))) is None  # pruned in the space with a policy
    assert coord.store.get(blob_hash(blob(f"{SPACE} v2"))) is not None
    for _head, chunk in head_other:
        assert coord.store.get(blob_hash(chunk)) is not None
    assert [r.entry.pruned for r in coord.history.records(SPACE, FID)] == [False, True]
    assert [r.entry.pruned for r in coord.history.records("other-space", FID)] == [False, False]
    assert coord.store.get(mine[1].manifest[0]) is not None
