"""Benchmark: what the live screen costs in a big space.

Measures, in one run on this machine:
  - folding state events into a SpaceView (events/s), against storing the same events in a plain
    dict (the least any consumer must do) as the baseline;
  - drawing one full frame (120x40) with 10,000 files, 8 transfers and 500 log lines, against a
    frame of a 10-file space as the baseline (the cost that grows with the space);
  - the view's memory for 10,000 files (tracemalloc peak).

Usage: python bench/ui.py [--files N]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console

from agent.events import (
    Direction,
    Event,
    HeadSeen,
    LocalChanged,
    LocalState,
    LogLine,
    PresenceSeen,
    TransferProgress,
)
from agent.ui import render
from agent.view import SpaceView
from schemas.messages import Head, Presence, PresenceState

HASH = "ab" * 32


def events_for(n_files: int) -> list[Event]:
    out: list[Event] = []
    for d in range(20):
        out.append(PresenceSeen(Presence(device=f"dev-{d:02d}", state=PresenceState.ONLINE, epoch=1, since=0.0,
                                         host=f"host-{d}")))
    for i in range(n_files):
        fid = f"assets/folder{i // 100:03d}/file{i:05d}.png"
        out.append(HeadSeen(Head(file_id=fid, hash=HASH, size=4096 + i, version=1 + i % 7, author=f"dev-{i % 20:02d}",
                                 chunks=1, manifest=[HASH]), initial=True))
        out.append(LocalChanged(fid, LocalState.IN_SYNC))
    for i in range(500):
        out.append(LogLine(f"assets/folder000/file{i:05d}.png: applied v2 from dev-01 (4.0 KiB) in 12 ms"))
    return out


def fold(events: list[Event]) -> tuple[SpaceView, float]:
    view = SpaceView("bench", "dev-00")
    t0 = time.perf_counter()
    for ev in events:
        view.apply(ev, now=1.0)
    return view, time.perf_counter() - t0


def baseline_fold(events: list[Event]) -> float:
    store: dict[object, Event] = {}
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        key = getattr(ev, "file_id", None) or getattr(getattr(ev, "head", None), "file_id", None) or i
        store[key] = ev
    return time.perf_counter() - t0


def frame_time(view: SpaceView, frames: int = 20) -> float:
    console = Console(width=120, height=40, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    t0 = time.perf_counter()
    for _ in range(frames):
        console.print(render(view, 40, now=time.time(), mono=10.0))
    return (time.perf_counter() - t0) / frames


def with_transfers(view: SpaceView) -> None:
    for i in range(8):
        fid = f"assets/folder000/file{i:05d}.png"
        view.apply(TransferProgress(fid, Direction.IN, 1000 * i, 64 << 20, "dev-01", at=9.0), now=9.0)
        view.apply(TransferProgress(fid, Direction.IN, 1 << 20, 64 << 20, "dev-01", at=10.0), now=10.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000)
    args = p.parse_args()

    events = events_for(args.files)
    view, took = fold(events)
    base = baseline_fold(events)
    print(f"fold {len(events):,} events into the view: {took * 1000:.0f} ms ({len(events) / took:,.0f} events/s); "
          f"baseline dict store {base * 1000:.1f} ms; ratio {took / base:.1f}x")

    with_transfers(view)
    big = frame_time(view)
    small_view, _ = fold(events_for(10))
    with_transfers(small_view)
    small = frame_time(small_view)
    print(f"one 120x40 frame, {args.files:,} files: {big * 1000:.1f} ms; 10 files: {small * 1000:.1f} ms; "
          f"ratio {big / small:.2f}x (the screen redraws at most 10 times a second)")

    tracemalloc.start()
    fold(events)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"view of {args.files:,} files: peak {peak / 2**20:.1f} MiB while folding "
          f"({peak / args.files:,.0f} B per file on top of the events it is given)")


if __name__ == "__main__":
    main()
