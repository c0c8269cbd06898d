"""The coordinator's version history on disk: blocks of 1,000 versions, timed flushes, atomic writes, reopen."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import small_disk

from broker.history import BLOCK, ID_FILE, AtomicJSONStorage, History
from schemas.messages import Head, VersionKind
from schemas.names import MAX_FILE_ID, disk_name

SPACE = "game"
FID = "art/hero.png"


def hx(n: int) -> str:
    """A distinct, valid 64-hex hash per integer."""
    return f"{n:064x}"


def head(version: int, digest: str | None = None, *, file_id: str = FID, restored_from: int | None = None,
         author: str = "alice-pc") -> Head:
    return Head(file_id=file_id, hash=digest or hx(version), size=10, version=version, author=author,
                time=1_700_000_000.0 + version, chunks=1, manifest=[hx(10**9 + version)],
                restored_from=restored_from)


@pytest.fixture
def hist(tmp_path: Path) -> Iterator[History]:
    h = History(tmp_path, flush_interval=3600)
    yield h
    h.close()


def fill(h: History, n: int, file_id: str = FID) -> None:
    for v in range(1, n + 1):
        assert h.record(SPACE, head(v, file_id=file_id))


def block_dir(root: Path, file_id: str = FID) -> Path:
    return root / "history" / SPACE / disk_name(file_id)


# -- record, dedupe, ties ----------------------------------------------------------------------------


def test_record_dedupes_by_version_and_hash(hist: History) -> None:
    assert hist.record(SPACE, head(1))
    assert not hist.record(SPACE, head(1))
    assert not hist.record(SPACE, head(1, author="bob-laptop"))  # same (version, hash): the same version
    assert [r.key() for r in hist.records(SPACE, FID)] == [(1, hx(1))]


def test_same_version_different_hashes_both_kept_and_higher_hash_wins(hist: History) -> None:
    low, high = "1" * 64, "f" * 64
    assert hist.record(SPACE, head(3, high))
    assert hist.record(SPACE, head(3, low))
    recs = hist.records(SPACE, FID)
    assert {r.hash for r in recs} == {low, high}
    got = hist.get(SPACE, FID, 3)
    assert got is not None and got.hash == high
    latest = hist.latest(SPACE, FID)
    assert latest is not None and latest.hash == high


def test_records_newest_first(hist: History) -> None:
    for v in (3, 1, 5, 2, 4):
        hist.record(SPACE, head(v))
    assert [r.version for r in hist.records(SPACE, FID)] == [5, 4, 3, 2, 1]


def test_get_missing_version_and_unknown_file(hist: History) -> None:
    fill(hist, 3)
    assert hist.get(SPACE, FID, 4) is None
    assert hist.get(SPACE, FID, 5000) is None
    assert hist.get(SPACE, "nope.txt", 1) is None
    assert hist.latest(SPACE, "nope.txt") is None
    assert hist.page(SPACE, "nope.txt", 0, 10) == (0, [])


# -- blocks and pages --------------------------------------------------------------------------------


def check_pages(hist: History) -> None:
    total, entries = hist.page(SPACE, FID, 0, 3)
    assert total == 2500
    assert [e.version for e in entries] == [2500, 2499, 2498]
    _, entries = hist.page(SPACE, FID, 999, 3)  # inside block 1 (1001-2000)
    assert [e.version for e in entries] == [1501, 1500, 1499]
    _, entries = hist.page(SPACE, FID, 498, 3)  # block 2 (2001-2500) into block 1
    assert [e.version for e in entries] == [2002, 2001, 2000]
    _, entries = hist.page(SPACE, FID, 1498, 4)  # block 1 into block 0 (1-1000)
    assert [e.version for e in entries] == [1002, 1001, 1000, 999]
    total, entries = hist.page(SPACE, FID, 2498, 5)  # only two left
    assert total == 2500 and [e.version for e in entries] == [2, 1]
    assert hist.page(SPACE, FID, 2500, 5) == (2500, [])
    _, entries = hist.page(SPACE, FID, 0, 2500)
    assert [e.version for e in entries] == list(range(2500, 0, -1))


def test_page_offsets_across_block_boundaries(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    fill(h, 2500)
    check_pages(h)  # from the write cache
    h.close()
    reopened = History(tmp_path)
    check_pages(reopened)  # and from disk
    reopened.close()


def test_block_files_split_at_1000(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    fill(h, 2001)
    h.close()
    d = block_dir(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["000000.json", "000001.json", "000002.json", ID_FILE]
    assert (d / ID_FILE).read_text() == FID
    counts = []
    for name in ("000000.json", "000001.json", "000002.json"):
        table = json.loads((d / name).read_text())["_default"]
        counts.append((min(doc["version"] for doc in table.values()), max(doc["version"] for doc in table.values()),
                       len(table)))
    assert counts == [(1, BLOCK, BLOCK), (BLOCK + 1, 2 * BLOCK, BLOCK), (2001, 2001, 1)]


# -- persistence -------------------------------------------------------------------------------------


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    fill(h, 1200)
    h.record(SPACE, head(1200, "f" * 64))
    before = [(r.key(), r.entry, r.head) for r in h.records(SPACE, FID)]
    h.close()
    h2 = History(tmp_path)
    after = [(r.key(), r.entry, r.head) for r in h2.records(SPACE, FID)]
    assert after == before
    assert not h2.record(SPACE, head(7))  # dedupe also holds against what is on disk
    h2.close()


def test_latest_after_reopen_from_disk(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    fill(h, 1500)
    h.close()
    h2 = History(tmp_path)
    latest = h2.latest(SPACE, FID)
    assert latest is not None and latest.version == 1500 and latest.hash == hx(1500)
    h2.close()


@pytest.mark.parametrize("late", [head(3), head(5, "0" * 64)], ids=["older-version", "losing-tie"])
def test_latest_after_reopen_when_an_older_head_arrives_first(tmp_path: Path, late: Head) -> None:
    """After a restart the first head recorded may be older than what is on disk (a late or losing head).

    ``latest`` must still be the best on disk: the coordinator re-publishes it and numbers restores from it.
    """
    h = History(tmp_path, flush_interval=3600)
    for v in (1, 2, 4, 5):
        h.record(SPACE, head(v))
    h.record(SPACE, head(5, "f" * 64))
    h.close()
    h2 = History(tmp_path)
    assert h2.record(SPACE, late)  # not on disk yet: recorded
    latest = h2.latest(SPACE, FID)
    assert latest is not None
    assert latest.key() == (5, "f" * 64)
    h2.close()


def test_json_on_disk_is_valid_after_every_flush(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    for v in range(1, 2101):
        h.record(SPACE, head(v))
        if v % 300 == 0:
            h.flush()
            for p in block_dir(tmp_path).glob("*.json"):
                doc = json.loads(p.read_text())
                assert set(doc) == {"_default"}
            on_disk = sum(len(json.loads(p.read_text())["_default"]) for p in block_dir(tmp_path).glob("*.json"))
            assert on_disk == v
    h.close()


def test_unflushed_records_are_readable_but_not_yet_on_disk(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    fill(h, 3)
    assert [r.version for r in h.records(SPACE, FID)] == [3, 2, 1]
    assert h.page(SPACE, FID, 0, 10)[0] == 3
    assert h.latest(SPACE, FID).version == 3  # type: ignore[union-attr]
    other = History(tmp_path)
    assert other.records(SPACE, FID) == []
    assert other.latest(SPACE, FID) is None
    h.flush()
    fresh = History(tmp_path)
    assert [r.version for r in fresh.records(SPACE, FID)] == [3, 2, 1]
    h.record(SPACE, head(4))
    assert [r.version for r in History(tmp_path).records(SPACE, FID)] == [3, 2, 1]
    h.close()
    assert [r.version for r in History(tmp_path).records(SPACE, FID)] == [4, 3, 2, 1]


def test_flush_interval_elapsed_flushes_on_record(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=0.0)  # every record is past the interval
    fill(h, 2)
    assert [r.version for r in History(tmp_path).records(SPACE, FID)] == [2, 1]
    h.close()


def test_maybe_flush_waits_for_the_interval(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=0.2)
    h._last_flush = float("inf")  # the interval has not elapsed
    h.record(SPACE, head(1))
    h.maybe_flush()
    assert History(tmp_path).records(SPACE, FID) == []
    h._last_flush = 0.0  # long ago
    h.maybe_flush()
    assert [r.version for r in History(tmp_path).records(SPACE, FID)] == [1]
    h.close()


# -- kinds, pruning -----------------------------------------------------------------------------------


def test_mark_pruned_sets_entry_pruned(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    fill(h, 1002)
    h.mark_pruned(SPACE, FID, {(1, hx(1)), (1001, hx(1001)), (2, "e" * 64)})  # the last one is not recorded
    h.close()
    h2 = History(tmp_path)
    pruned = {r.version for r in h2.records(SPACE, FID) if r.entry.pruned}
    assert pruned == {1, 1001}
    rec = h2.get(SPACE, FID, 1)
    assert rec is not None and rec.entry.pruned
    _, entries = h2.page(SPACE, FID, 1000, 2)
    assert [(e.version, e.pruned) for e in entries] == [(2, False), (1, True)]
    h2.close()


def test_restored_head_is_recorded_as_restore(hist: History) -> None:
    fill(hist, 2)
    hist.record(SPACE, head(3, hx(1), restored_from=1))
    rec = hist.get(SPACE, FID, 3)
    assert rec is not None
    assert rec.entry.kind is VersionKind.RESTORE and rec.entry.restored_from == 1
    assert rec.head.restored_from == 1
    assert hist.get(SPACE, FID, 2).entry.kind is VersionKind.EDIT  # type: ignore[union-attr]


# -- atomic storage ----------------------------------------------------------------------------------


def test_atomic_storage_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "000000.json"
    st = AtomicJSONStorage(str(path))
    assert st.read() is None
    st.write({"_default": {"1": {"a": 1}}})
    st.write({"_default": {"1": {"a": 2}}})
    assert st.read() == {"_default": {"1": {"a": 2}}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["000000.json"]


def test_history_leaves_no_temp_files(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=0.0)
    fill(h, 1100)
    h.close()
    leftovers = [p for p in (tmp_path / "history").rglob("*")
                 if p.is_file() and not p.name.endswith(".json") and p.name != ID_FILE]
    assert leftovers == []
    assert all(not p.name.startswith(".") for p in (tmp_path / "history").rglob("*"))


def test_crash_mid_flush_leaves_stray_temp_that_is_ignored(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    fill(h, 5)
    h.close()
    d = block_dir(tmp_path)
    (d / ".000000.json.tmp").write_text('{"_default": {"1": {"version": 1, "ha')  # a flush that never renamed
    h2 = History(tmp_path)
    assert [r.version for r in h2.records(SPACE, FID)] == [5, 4, 3, 2, 1]
    assert h2.latest(SPACE, FID).version == 5  # type: ignore[union-attr]
    assert h2.record(SPACE, head(6))
    h2.close()  # the next flush replaces the stray temp
    assert not (d / ".000000.json.tmp").exists()
    assert [r.version for r in History(tmp_path).records(SPACE, FID)] == [6, 5, 4, 3, 2, 1]


WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from broker.history import History
from schemas.messages import Head
h = History(Path(sys.argv[1]), flush_interval=0.0)  # every record is flushed at once
latest = h.latest("game", "art/hero.png")
v = latest.version if latest else 0
print("ready", flush=True)
while True:
    v += 1
    h.record("game", Head(file_id="art/hero.png", hash=f"{v:064x}", size=1, version=v, author="alice-pc",
                          chunks=1, manifest=[f"{v:064x}"], time=float(v)))
"""


def test_kill_9_mid_flush_never_leaves_a_broken_block(tmp_path: Path) -> None:
    """A real crash: a writer flushing on every record is killed at arbitrary moments, five times over."""
    repo = Path(__file__).resolve().parent.parent
    seen = 0
    for delay in (0.15, 0.4, 0.25, 0.6, 0.33):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(repo)], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
        for p in block_dir(tmp_path).glob("*.json"):
            json.loads(p.read_text())  # every block parses
        h = History(tmp_path)
        got = [r.version for r in h.records(SPACE, FID)]
        assert got == list(range(len(got), 0, -1))  # a gap-free prefix: at most the record being flushed is lost
        assert len(got) > seen  # each run got further (and kept what the last one wrote)
        seen = len(got)
        h.close()


# -- listing -----------------------------------------------------------------------------------------


def test_spaces_and_files_unquote_ids(tmp_path: Path) -> None:
    h = History(tmp_path, flush_interval=3600)
    ids = ["art/hero.png", "Levels/Level 1/map%20.umap", "readme.txt", "ü/ñ.txt"]
    for fid in ids:
        h.record(SPACE, head(1, file_id=fid))
    h.record("other-space", head(1, file_id="a/b/c.bin"))
    h.close()
    h2 = History(tmp_path)
    assert h2.spaces() == ["game", "other-space"]
    assert sorted(h2.files(SPACE)) == sorted(ids)
    assert list(h2.files("other-space")) == ["a/b/c.bin"]
    assert list(h2.files("missing")) == []
    for fid in ids:
        assert h2.latest(SPACE, fid).head.file_id == fid  # type: ignore[union-attr]
    h2.close()


def test_files_lists_a_file_recorded_but_not_yet_flushed(hist: History) -> None:
    """records() and latest() already see the write cache; the listings must too.

    spaces()/files() walk folders on disk, so a brand-new file is invisible to collect_garbage (which
    then does not mark its blobs) and to the re-publish after a broker restart until the next flush.
    """
    hist.record("new-space", head(1, file_id="new/file.txt"))
    assert hist.latest("new-space", "new/file.txt") is not None
    assert hist.spaces() == ["new-space"]
    assert list(hist.files("new-space")) == ["new/file.txt"]


def test_records_longest_valid_file_id(tmp_path: Path) -> None:
    """Any file id the schema accepts can be recorded (it is up to 512 characters, ~1,500 bytes quoted).

    The history keys its folder on ``file_key(file_id)``, one path component, which the file system
    caps at 255 bytes: a deep game-asset path fails with ENAMETOOLONG and its versions go unrecorded.
    """
    deep = "/".join(["Content", "Characters", "Heroes", "Paladin", "Textures", "Armor"] * 8) + "/albedo.png"
    assert len(deep) <= MAX_FILE_ID
    h = History(tmp_path, flush_interval=3600)
    for fid in (deep, "x" * MAX_FILE_ID):
        assert h.record(SPACE, head(1, file_id=fid))
    h.close()
    h2 = History(tmp_path)
    assert sorted(h2.files(SPACE)) == sorted([deep, "x" * MAX_FILE_ID])
    assert h2.latest(SPACE, deep) is not None
    h2.close()


def test_one_unwritable_block_does_not_stop_other_blocks_flushing(tmp_path: Path) -> None:
    """A block whose write fails must not keep every other file's versions in memory only.

    flush() stops at the first block that raises, and that block stays dirty, so with one bad block the
    others behind it in the dirty set are never written (every later timed flush fails the same way).
    """
    h = History(tmp_path, flush_interval=3600)
    bad = "broken.txt"
    others = [f"dir/file{i:02d}.txt" for i in range(20)]
    h.record(SPACE, head(1, file_id=bad))
    for fid in others:
        h.record(SPACE, head(1, file_id=fid))
    (block_dir(tmp_path, bad) / "000000.json").mkdir(parents=True)  # its block cannot be renamed into place
    for _ in range(3):  # the timer keeps trying
        with contextlib.suppress(OSError):
            h.flush()
    fresh = History(tmp_path)
    assert sorted(fid for fid in fresh.files(SPACE) if fid in others) == others
    assert all(fresh.latest(SPACE, fid) is not None for fid in others)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (fails in CI, skips elsewhere, when this process may not mount one)."""
    with small_disk(tmp_path / "tiny", "1m") as mnt:
        yield mnt


def test_full_disk_flush_keeps_the_old_block_and_leaves_no_temp_file(tiny_disk: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A flush that fails for lack of space keeps the previous block intact and cleans up its temp file
    (a half-written temp left behind would hold on to the space the next flush needs)."""
    h = History(tiny_disk, flush_interval=3600)
    fill(h, 50)
    h.flush()
    block = block_dir(tiny_disk) / "000000.json"
    before = block.read_bytes()
    filler = tiny_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:  # eat the rest of the disk
        while True:
            fh.write(b"\0" * 4096)
    for v in range(51, 60):
        h.record(SPACE, head(v))
    try:
        h.flush()
        raised = False
    except OSError:
        raised = True
    assert raised or "No space left on device" in caplog.text  # the failure is reported either way
    assert block.read_bytes() == before
    assert sorted(p.name for p in block_dir(tiny_disk).iterdir()) == ["000000.json", ID_FILE]
    os.unlink(filler)
    h.close()  # the records still in the cache are written once there is space again
    assert [r.version for r in History(tiny_disk).records(SPACE, FID)] == list(range(59, 0, -1))


# -- conflicts -------------------------------------------------------------------------------------


def test_conflict_record_is_listed_but_never_latest(hist: History, tmp_path: Path) -> None:
    hist.record(SPACE, head(1))
    # A losing concurrent edit with the higher hash: a plain record would win the tie.
    assert hist.record(SPACE, head(2, hx(0xFFFF), author="bob-laptop"), conflict=True)
    hist.record(SPACE, head(2, hx(0x10)))
    latest = hist.latest(SPACE, FID)
    assert latest is not None and latest.hash == hx(0x10)
    assert hist.get(SPACE, FID, 2).hash == hx(0x10)  # type: ignore[union-attr]
    total, entries = hist.page(SPACE, FID, 0, 10)
    assert total == 3
    assert [(e.version, e.kind) for e in entries].count((2, VersionKind.CONFLICT)) == 1
    hist.close()
    again = History(tmp_path, flush_interval=3600)  # the same from disk
    assert again.latest(SPACE, FID).hash == hx(0x10)  # type: ignore[union-attr]
    again.close()


def test_mark_conflict_demotes_the_loser(hist: History) -> None:
    hist.record(SPACE, head(1))
    hist.record(SPACE, head(2, hx(0xAA)))
    hist.record(SPACE, head(2, hx(0xBB), author="bob-laptop"))
    assert hist.latest(SPACE, FID).hash == hx(0xBB)  # type: ignore[union-attr]
    hist.mark_conflict(SPACE, FID, 2, hx(0xBB))
    assert hist.latest(SPACE, FID).hash == hx(0xAA)  # type: ignore[union-attr]
    kinds = {e.hash: e.kind for e in hist.page(SPACE, FID, 0, 10)[1]}
    assert kinds[hx(0xBB)] is VersionKind.CONFLICT and kinds[hx(0xAA)] is VersionKind.EDIT


def test_a_conflict_can_be_unmarked(hist: History) -> None:
    hist.record(SPACE, head(1))
    hist.record(SPACE, head(2, hx(0xAA)), conflict=True)
    assert [r.hash for r in hist.recent_conflicts(SPACE, FID, 50)] == [hx(0xAA)]
    hist.mark_conflict(SPACE, FID, 2, hx(0xAA), conflict=False)
    assert hist.recent_conflicts(SPACE, FID, 50) == []
    assert hist.latest(SPACE, FID).hash == hx(0xAA)  # type: ignore[union-attr]
    assert hist.get(SPACE, FID, 2).entry.kind is VersionKind.EDIT  # type: ignore[union-attr]
