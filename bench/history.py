"""Benchmark: the cost of recording one version in broker.history stays flat as a file's history grows."""


from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as pkg_version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import blake3  # noqa: E402
from tinydb import Query, TinyDB  # noqa: E402

from broker.history import BLOCK, History  # noqa: E402
from schemas.manifest import ChunkRef, encode_pages  # noqa: E402
from schemas.messages import Head, VersionKind  # noqa: E402

OUT = REPO / "bench" / "out" / "history.json"
SPACE = "game"
FILE_ID = "Content/Characters/Hero/Textures/hero_albedo.png"
FULL, QUICK = 100_000, 10_000
BASELINE_MAX_VERSIONS = 5_000
BASELINE_MAX_SECONDS = 60.0
WINDOW = 100
"""The baseline's cost "at" a version is the mean over the 100 inserts ending there."""
T0 = 1_700_000_000.0
ABOUT = f"""\
Records N versions of one file ({FULL:,}, or {QUICK:,} with --quick) into broker.history.History with its
default 1 s flush interval, timing each block of {BLOCK:,} record() calls (timed flushes included), and
compares with the same work (dedupe query + insert) on one plain TinyDB file with its default JSONStorage,
which re-reads and rewrites the whole file on every call and is stopped at {BASELINE_MAX_VERSIONS:,} versions
or {BASELINE_MAX_SECONDS:.0f} s.  Prints a table and writes bench/out/history.json."""


def digest(*parts: object) -> str:
    return blake3.blake3(repr(parts).encode()).hexdigest()


def make_head(v: int) -> Head:
    """Version ``v`` as a device would publish it: 64-hex hashes, one manifest page sent inline."""
    refs = [ChunkRef(digest("chunk", v, i), 60_000 + i) for i in range(2)]
    page = encode_pages(refs)[0]  # 72 bytes -> 96 characters of base64
    return Head(file_id=FILE_ID, hash=digest("content", v), size=sum(r.length for r in refs), version=v,
                author="alice-pc", time=T0 + v, parent=digest("content", v - 1) if v > 1 else None,
                chunks=len(refs), manifest=[blake3.blake3(page).hexdigest()],
                inline_manifest=base64.b64encode(page).decode())


class TimedHistory(History):
    """History that adds up the time spent in flush() (timed flushes inside record() and the final close)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)  # the default flush interval
        self.flush_seconds = 0.0
        self.flushes = 0

    def flush(self) -> None:
        start = time.perf_counter()
        super().flush()
        self.flush_seconds += time.perf_counter() - start
        self.flushes += 1


@dataclass
class Run:
    name: str
    versions: int = 0
    block_us: list[float] = field(default_factory=list)
    """Mean µs per insert of each block of 1,000 versions, wall clock, flushes included."""
    seconds: float = 0.0
    flush_seconds: float = 0.0
    flushes: int = 0
    close_seconds: float = 0.0
    stopped_early: str = ""
    disk_bytes: int = 0
    window_us: dict[str, float] = field(default_factory=dict)


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def bench_history(root: Path, n: int) -> Run:
    run = Run("broker.history.History (blocks of 1,000, 1 s flush)")
    hist = TimedHistory(root)
    for b in range(n // BLOCK):
        heads = [make_head(v) for v in range(b * BLOCK + 1, (b + 1) * BLOCK + 1)]
        start = time.perf_counter()
        for h in heads:
            hist.record(SPACE, h)
        elapsed = time.perf_counter() - start
        run.block_us.append(elapsed / BLOCK * 1e6)
        run.seconds += elapsed
        run.versions += BLOCK
    start = time.perf_counter()
    hist.close()
    run.close_seconds = time.perf_counter() - start
    run.flush_seconds, run.flushes = hist.flush_seconds, hist.flushes
    check = History(root)
    total, newest = check.page(SPACE, FILE_ID, 0, 1)
    assert total == n and newest[0].version == n, (total, newest)
    run.disk_bytes = dir_bytes(root / "history")
    return run


def bench_plain_tinydb(root: Path, limit: int) -> Run:
    """The same documents, dedupe query and insert as History.record, on one TinyDB file, timed per insert."""
    run = Run("plain TinyDB, one file, default JSONStorage")
    db = TinyDB(str(root / "history.json"))
    q = Query()
    per_insert: list[float] = []
    for v in range(1, limit + 1):
        h = make_head(v)
        start = time.perf_counter()
        if not db.contains((q.version == h.version) & (q.hash == h.hash)):
            entry = {"version": h.version, "hash": h.hash, "size": h.size, "author": h.author, "time": h.time,
                     "parent": h.parent, "deleted": h.deleted, "kind": VersionKind.EDIT.value,
                     "restored_from": None, "pruned": False}
            db.insert({"version": h.version, "hash": h.hash, "recorded_at": time.time(), "entry": entry,
                       "head": h.model_dump(mode="json")})
        per_insert.append(time.perf_counter() - start)
        run.seconds += per_insert[-1]
        run.versions = v
        if run.seconds > BASELINE_MAX_SECONDS:
            run.stopped_early = f"stopped after {run.seconds:.0f} s (limit {BASELINE_MAX_SECONDS:.0f} s)"
            break
    else:
        run.stopped_early = f"stopped at {run.versions:,} versions (it is quadratic)"
    db.close()
    run.block_us = [statistics.fmean(per_insert[i : i + BLOCK]) * 1e6 for i in range(0, len(per_insert), BLOCK)]
    run.window_us = {  # mean µs per insert over the WINDOW inserts ending at each point
        "at_1000": statistics.fmean(per_insert[BLOCK - WINDOW : BLOCK]) * 1e6,
        "at_end": statistics.fmean(per_insert[-WINDOW:]) * 1e6,
    }
    run.disk_bytes = dir_bytes(root)
    return run


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions_of(block: int) -> str:
    return f"{block * BLOCK + 1:,}-{(block + 1) * BLOCK:,}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=ABOUT,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK:,} versions instead of {FULL:,}")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the databases (default: a temp dir)")
    args = ap.parse_args()
    n = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="atrius-bench-history-", dir=args.dir))
    print(f"Measures: wall-clock µs per History.record() of one file's versions 1..{n:,}, in blocks of "
          f"{BLOCK:,}\n(timed 1 s flushes with fsync included), against the same inserts into one plain TinyDB file.")
    print(f"Data in {work} ({fs_type(work)}); Python {platform.python_version()}, tinydb {pkg_version('tinydb')}\n")
    try:
        (work / "history").mkdir()
        (work / "plain").mkdir()
        hist = bench_history(work / "history", n)
        plain = bench_plain_tinydb(work / "plain", min(n, BASELINE_MAX_VERSIONS))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    blocks = len(hist.block_us)
    picks = sorted({0, (blocks - 1) // 2, blocks - 1})
    first, last = hist.block_us[0], hist.block_us[-1]
    rows = [(f"History: versions {versions_of(b)}", f"{hist.block_us[b]:8.1f}") for b in picks]
    rows.append(("History: ratio last/first block", f"{last / first:8.2f}"))
    rows.append(("History: all blocks, min / median / max",
                 f"{min(hist.block_us):.1f} / {statistics.median(hist.block_us):.1f} / {max(hist.block_us):.1f}"))
    at_1000, at_end = plain.window_us["at_1000"], plain.window_us["at_end"]
    rows.append((f"plain TinyDB: versions {versions_of(0)}", f"{plain.block_us[0]:8.1f}"))
    rows.append((f"plain TinyDB: versions {BLOCK - WINDOW + 1:,}-{BLOCK:,}", f"{at_1000:8.1f}"))
    rows.append((f"plain TinyDB: versions {plain.versions - WINDOW + 1:,}-{plain.versions:,} (the end)",
                 f"{at_end:8.1f}"))
    rows.append(("plain TinyDB: ratio end / at 1,000", f"{at_end / at_1000:8.2f}"))
    width = max(len(r[0]) for r in rows)
    print(f"{'mean µs per insert':<{width}}  value")
    print("-" * (width + 12))
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print()
    print(f"History: {hist.versions:,} versions in {hist.seconds:.1f} s; {hist.flushes} flushes took "
          f"{hist.flush_seconds:.2f} s in all ({hist.flush_seconds / max(hist.seconds, 1e-9):.0%} of the insert time, "
          f"close {hist.close_seconds * 1e3:.0f} ms); {hist.disk_bytes / 1e6:.1f} MB on disk")
    print(f"plain TinyDB: {plain.versions:,} versions in {plain.seconds:.1f} s, {plain.stopped_early}; "
          f"{plain.disk_bytes / 1e6:.1f} MB on disk")

    result = {
        "measures": "mean wall-clock microseconds per History.record() per block of 1,000 versions of one file "
                    "(timed flushes included), vs. the same inserts into one plain TinyDB JSON file",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "python": platform.python_version(),
        "tinydb": pkg_version("tinydb"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "filesystem": fs_type(Path(tempfile.gettempdir()) if args.dir is None else args.dir),
        "history": {**asdict(hist), "first_block_us": first, "middle_block_us": hist.block_us[(blocks - 1) // 2],
                    "last_block_us": last, "ratio_last_first": last / first},
        "plain_tinydb": {**asdict(plain), "first_block_us": plain.block_us[0], "at_1000_us": at_1000,
                         "at_end_us": at_end, "ratio_end_at_1000": at_end / at_1000},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
