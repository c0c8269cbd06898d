"""The terminal UI, and the only module that imports rich: draws a ``SpaceView`` as devices, live
transfers, files and an event log, and owns the terminal while it runs.

``Screen`` takes events from a ``QueueSink``, folds them into the view and redraws at most
``MAX_FPS`` times a second (rich ``Live`` on the alternate screen: each frame overwrites the last
in place, no clearing, so no flicker; every frame is laid out for the terminal's current size, so
a resize only needs a redraw).  When stdout is not a terminal it prints plain log lines instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from typing import IO

from rich import box
from rich.console import Console, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from agent.commands import human_size
from agent.events import Connection, Direction, Level, LocalState, QueueSink
from agent.view import DeviceRow, FileRow, SpaceView, Transfer

MAX_FPS = 10
"""Redraws per second at most (a burst of events costs one frame)."""
TICK_ACTIVE = 0.25
"""Redraw period while transfers run (bytes/s, ETA and the bars move without events)."""
TICK_IDLE = 1.0
"""Redraw period otherwise ("last seen 5 s ago" ages)."""
SNAPSHOT_AFTER = 1.5
"""Plain mode: seconds after connecting to print the state found (retained messages have arrived)."""

LOCAL_STYLE = {
    LocalState.IN_SYNC: "green",
    LocalState.SENDING: "cyan",
    LocalState.RECEIVING: "cyan",
    LocalState.MODIFIED: "yellow",
    LocalState.CONFLICT: "bold red",
    LocalState.READ_ONLY: "magenta",
    LocalState.BEHIND: "yellow",
    LocalState.MISSING: "red",
    LocalState.NOT_HERE: "dim",
}
LEVEL_STYLE = {Level.INFO: "", Level.WARNING: "yellow", Level.ERROR: "bold red"}
ARROW = {Direction.IN: "↓", Direction.OUT: "↑"}


# -- formatting ----------------------------------------------------------------------------------
def ago(t: float | None, now: float) -> str:
    if not t:
        return "unknown"
    d = max(0.0, now - t)
    if d < 60:
        return f"{d:.0f} s ago"
    if d < 3600:
        return f"{d / 60:.0f} min ago"
    if d < 86400:
        return f"{d / 3600:.0f} h ago"
    return time.strftime("%Y-%m-%d", time.localtime(t))


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# -- panels -------------------------------------------------------------------------------------------
def devices_table(view: SpaceView, now: float) -> Table:
    t = Table(box=None, expand=True, show_edge=False, pad_edge=False)
    t.add_column("", width=1, no_wrap=True)
    t.add_column("device", ratio=3, no_wrap=True, overflow="ellipsis")
    t.add_column("host", ratio=2, no_wrap=True, overflow="ellipsis", style="dim")
    t.add_column("status", min_width=18, ratio=4, no_wrap=True, overflow="ellipsis")
    for d in view.device_rows():
        t.add_row(*_device_cells(view, d, now))
    return t


def _device_cells(view: SpaceView, d: DeviceRow, now: float) -> tuple[Text, Text, str, Text]:
    mark = Text("●", style="bold green") if d.online else Text("○", style="red")
    name = Text(d.name, style="bold underline" if d.name == view.me else "")
    if d.online:
        status = Text(f"on since {clock(d.since)}" if d.since else "online", style="green")
        busy = (f" ↑{len(d.sending)}" if d.sending else "") + (f" ↓{len(d.receiving)}" if d.receiving else "")
        if busy:
            status.append(busy, style="cyan")
    else:
        status = Text(f"off, seen {ago(d.last_seen, now)}" if d.last_seen else "offline", style="red")
    return mark, name, d.host, status


def files_table(view: SpaceView, rows: int, *, show_header: bool = True) -> Table:
    t = Table(box=box.SIMPLE_HEAD, expand=True, show_edge=False, pad_edge=False, show_header=show_header)
    t.add_column("file", ratio=5, no_wrap=True, overflow="ellipsis")
    t.add_column("ver", justify="right", no_wrap=True)
    t.add_column("size", justify="right", no_wrap=True)
    t.add_column("author", ratio=2, no_wrap=True, overflow="ellipsis")
    t.add_column("lock", ratio=2, no_wrap=True, overflow="ellipsis")
    t.add_column("local", ratio=2, no_wrap=True, overflow="ellipsis")
    files = view.file_rows()
    shown = files if len(files) <= rows else files[:max(rows - 1, 0)]
    for f in shown:
        t.add_row(*_file_cells(view, f))
    if len(shown) < len(files):
        t.add_row(Text(f"… and {len(files) - len(shown)} more", style="dim"), "", "", "", "", "")
    return t


def _file_cells(view: SpaceView, f: FileRow) -> tuple[Text, str, str, str, Text, Text]:
    h = f.head
    name = Text(f.file_id, style="dim strike" if h is not None and h.deleted else "")
    version = f"v{h.version}" if h else "-"
    size = ("deleted" if h.deleted else human_size(h.size)) if h else "-"
    lock = Text("-", style="dim")
    if f.lock is not None:
        mine = f.lock.holder == view.me
        lock = Text(f"🔒 {f.lock.holder}", style="bold yellow" if not mine else "bold green")
    local = view.local_of(f)
    local_text = Text(local.value if local else "-", style=LOCAL_STYLE.get(local, "dim") if local else "dim")
    return name, version, size, h.author if h else "-", lock, local_text


def transfers_table(view: SpaceView, now: float, rows: int) -> RenderableType:
    items = view.transfer_rows()
    if not items:
        return Text("no transfers", style="dim")
    t = Table(box=None, expand=True, show_edge=False, pad_edge=False, show_header=False)
    t.add_column("who", no_wrap=True, max_width=15, overflow="ellipsis")
    t.add_column("file", ratio=3, min_width=20, no_wrap=True, overflow="ellipsis")
    t.add_column("bar", width=10, no_wrap=True)
    t.add_column("pct", justify="right", width=4, no_wrap=True)
    t.add_column("rate", justify="right", no_wrap=True)
    t.add_column("eta", justify="right", no_wrap=True)
    for tr in items[:rows]:
        t.add_row(*_transfer_cells(tr, now))
    if len(items) > rows:
        t.add_row("", Text(f"… and {len(items) - rows} more", style="dim"), "", "", "", "")
    return t


def _transfer_cells(tr: Transfer, now: float) -> tuple[Text, Text, ProgressBar | Text, str, str, str]:
    who = Text(f"{ARROW[tr.direction]} {tr.device or '?'}", style="cyan")
    peer = f" {'from' if tr.direction is Direction.IN else 'to'} {tr.peer}" if tr.peer else ""
    name = Text(tr.file_id + peer)
    frac = tr.fraction()
    if tr.finished_at is not None and not tr.ok:
        return who, name, Text("failed", style="red"), "", "", ""
    if frac is None:
        bar = ProgressBar(total=None, width=10, pulse=True, animation_time=now)
        return who, name, bar, "", "", ""
    bar = ProgressBar(total=1.0, completed=frac, width=10,
                      complete_style="green" if tr.finished_at is not None else "cyan")
    rate = tr.rate()
    rate_text = f"{human_size(int(rate))}/s" if rate else ""
    eta = "done" if tr.finished_at is not None else duration(tr.eta())
    return who, name, bar, f"{frac * 100:.0f}%", rate_text, eta


def log_lines(view: SpaceView, rows: int) -> Text:
    out = Text(no_wrap=True, overflow="ellipsis")
    lines = list(view.log)[-rows:] if rows > 0 else []
    for i, line in enumerate(lines):
        if i:
            out.append("\n")
        out.append(clock(line.at) + " ", style="dim")
        out.append(line.text, style=LEVEL_STYLE.get(line.level, ""))
    return out


def header(view: SpaceView) -> Text:
    online = sum(d.online for d in view.devices.values())
    t = Text()
    t.append(" Atrius ", style="bold white on blue")
    t.append(f" {view.space}", style="bold")
    if view.broker:
        t.append(f" · {view.broker}")
    if view.me:
        t.append(f" · on {view.me}")
    t.append(" · ")
    t.append("● connected" if view.connected else "○ not connected", style="green" if view.connected else "red")
    t.append(f" · {online}/{len(view.devices)} online · {len(view.file_rows())} files")
    active = view.active_transfers()
    if active:
        t.append(f" · {active} transfer{'s' if active != 1 else ''}", style="cyan")
    return t


def render(view: SpaceView, height: int, *, now: float | None = None, mono: float | None = None) -> Layout:
    """The whole screen for a terminal ``height`` lines tall (the width is the console's)."""
    now = time.time() if now is None else now
    mono = time.monotonic() if mono is None else mono
    height = max(height, 12)
    n_top = max(len(view.devices), min(len(view.transfers), 8), 1)
    top = min(n_top + 3, max(height // 3, 4))
    rest = height - 1 - top
    # files: as tall as its rows (+ borders, header, rule, "more" line), leaving the log a third
    middle = max(min(len(view.file_rows()) + 5, rest - max(3, rest // 3)), 3)
    bottom = rest - middle
    layout = Layout()
    layout.split_column(Layout(header(view), name="header", size=1), Layout(name="top", size=top),
                        Layout(name="files", size=middle), Layout(name="log", size=bottom))
    layout["top"].split_row(
        Layout(Panel(devices_table(view, now), title="devices", title_align="left", border_style="blue"),
               ratio=4),
        Layout(Panel(transfers_table(view, mono, max(top - 2, 1)), title="live transfers", title_align="left",
                     border_style="cyan"), ratio=5))
    show_header = middle >= 7  # (in a short terminal the rows matter more than the column names)
    rows = max(middle - (4 if show_header else 2), 1)
    layout["files"].update(Panel(files_table(view, rows, show_header=show_header), title="files",
                                 title_align="left", border_style="blue"))
    layout["log"].update(Panel(log_lines(view, bottom - 2), title="events", title_align="left",
                               border_style="blue"))
    return layout


def export_svg(view: SpaceView, path: str, *, width: int = 120, height: int = 36, title: str = "atrius tui") -> None:
    """Write the screen as an SVG (for the README's screenshot)."""
    import io

    console = Console(record=True, width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor")
    console.print(render(view, height))
    console.save_svg(path, title=title)


def plain_snapshot(view: SpaceView, out: IO[str]) -> None:
    """The state as plain lines, for a log that is not a terminal."""
    now = time.time()
    print(f"space {view.space}: {sum(d.online for d in view.devices.values())} of {len(view.devices)} "
          f"device(s) online, {len(view.file_rows())} file(s)", file=out)
    for d in view.device_rows():
        state = f"online since {clock(d.since)}" if d.online else (
            f"offline, last seen {ago(d.last_seen, now)}" if d.last_seen else "offline")
        print(f"  device {d.name} ({d.host or '?'}): {state}", file=out)
    for f in view.file_rows():
        h = f.head
        lock = f", locked by {f.lock.holder}" if f.lock else ""
        local = view.local_of(f)
        desc = (f"v{h.version} {'deleted' if h.deleted else human_size(h.size)} by {h.author}" if h else "no head")
        print(f"  file {f.file_id}: {desc}{lock}{', ' + local.value if local else ''}", file=out)
    out.flush()


# -- the owner of the terminal ----------------------------------------------------------------------
class Screen:
    """Applies events to the view and draws it until ``stop``; the terminal is restored on exit
    (also on Ctrl-C and on errors: rich's Live leaves the alternate screen in its ``finally``)."""

    def __init__(self, view: SpaceView, sink: QueueSink, *, console: Console | None = None,
                 interactive: bool | None = None, out: IO[str] | None = None) -> None:
        self.view = view
        self.sink = sink
        self.out = out or sys.stdout
        self.console = console or Console(file=self.out)
        self.interactive = self.console.is_terminal if interactive is None else interactive
        self._printed = 0
        self._closed = False
        self._wake = asyncio.Event()
        self._snapshot_due: float | None = None
        self._snapshot_done = False
        self._resized = False

    def _drain(self, first: object | None) -> bool:
        changed = False
        events = [first] if first is not None else []
        while not self.sink.queue.empty():
            events.append(self.sink.queue.get_nowait())
        for ev in events:
            self.view.apply(ev)  # type: ignore[arg-type]
            if isinstance(ev, Connection) and ev.connected and self._snapshot_due is None:
                self._snapshot_due = time.monotonic() + SNAPSHOT_AFTER
            changed = True
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        if self.interactive:
            await self._run_live(stop)
        else:
            await self._run_plain(stop)

    async def _next(self, stop: asyncio.Event, timeout: float) -> object | None:
        get = asyncio.ensure_future(self.sink.queue.get())
        halt = asyncio.ensure_future(stop.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait({get, halt, wake}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            return get.result() if get in done else None
        finally:
            self._wake.clear()
            for f in (get, halt, wake):
                if not f.done():
                    f.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(get, halt, wake, return_exceptions=True)

    async def _run_live(self, stop: asyncio.Event) -> None:
        from rich.live import Live

        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, AttributeError, ValueError):
            loop.add_signal_handler(signal.SIGWINCH, self._on_resize)
        frame = 1.0 / MAX_FPS
        last_draw = 0.0
        dirty = True
        try:
            with Live(console=self.console, screen=True, auto_refresh=False, transient=False,
                      redirect_stdout=False, redirect_stderr=False) as live:
                while not stop.is_set():
                    now = time.monotonic()
                    tick = TICK_ACTIVE if self.view.active_transfers() else TICK_IDLE
                    if self._resized:
                        self._resized, dirty = False, True
                    if (dirty and now - last_draw >= frame) or now - last_draw >= tick:
                        self.view.expire(now)
                        live.update(render(self.view, self.console.size.height), refresh=True)
                        last_draw, dirty = now, False
                    wait = (frame if dirty else tick) - (now - last_draw)
                    ev = await self._next(stop, max(wait, 0.005))
                    if ev is not None and self._drain(ev):
                        dirty = True
        finally:
            with contextlib.suppress(NotImplementedError, AttributeError, ValueError):
                loop.remove_signal_handler(signal.SIGWINCH)

    def _on_resize(self) -> None:
        self._resized = True
        self._wake.set()  # redrawn for the new size at once

    async def _run_plain(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            timeout = 0.5
            if self._snapshot_due is not None and not self._snapshot_done:
                timeout = max(0.0, min(timeout, self._snapshot_due - time.monotonic()))
            ev = await self._next(stop, timeout)
            if ev is not None:
                self._drain(ev)
            self._print_new_lines()
            if (self._snapshot_due is not None and not self._snapshot_done
                    and time.monotonic() >= self._snapshot_due):
                self._snapshot_done = True
                self._write(lambda: plain_snapshot(self.view, self.out))
        while not self.sink.queue.empty():
            self._drain(None)
        self._print_new_lines()

    def _print_new_lines(self) -> None:
        new = self.view.logged - self._printed
        if new <= 0:
            return
        lines = list(self.view.log)
        self._printed = self.view.logged
        text = "".join(f"{clock(line.at)} {'' if line.level is Level.INFO else line.level.name + ' '}{line.text}\n"
                       for line in (lines[-new:] if new <= len(lines) else lines))
        self._write(lambda: (self.out.write(text), self.out.flush()))

    def _write(self, action: Callable[[], object]) -> None:
        """Write to stdout unless it was closed (a pipe whose reader went away): then stop writing
        and keep running (the agent still syncs; Ctrl-C still stops it cleanly)."""
        if self._closed:
            return
        try:
            action()
        except (BrokenPipeError, ValueError):  # (ValueError: write to a closed file)
            self._closed = True
