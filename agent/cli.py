"""The ``atrius agent`` and ``atrius tui`` commands: load the config, run the sync engine (and/or
the terminal UI) until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from agent.commands import CommandError
from agent.config import AgentConfig, ConfigError, load_config
from agent.state import StateError
from agent.sync import Engine

if TYPE_CHECKING:
    from agent.events import QueueSink
    from agent.view import SpaceView

log = logging.getLogger("atrius.agent")

Runner = Callable[[Callable[[asyncio.Event], Awaitable[None]]], None]


def main_agent(config_path: str, *, tui: bool, run: Runner) -> int:
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    try:
        engine = Engine(cfg)
    except StateError as exc:
        log.error("%s", exc)
        return 1
    if not tui:
        run(engine.run)
        return 0

    async def with_screen(stop: asyncio.Event) -> None:
        from agent.events import QueueSink
        from agent.view import SpaceView

        sink = QueueSink(asyncio.get_running_loop())
        engine.events = sink
        view = SpaceView(cfg.space, cfg.device, broker=str(cfg.broker), agent=True)
        await _with_ui(view, sink, engine.run(stop), logging.INFO)

    run(with_screen)
    return 0


def main_tui(config_path: str, *, run: Runner) -> int:
    """``atrius tui``: watch a space (this device's files included) without syncing anything."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2

    async def watch(stop: asyncio.Event) -> None:
        from agent.events import QueueSink
        from agent.view import SpaceView
        from agent.watch import SpaceWatch

        sink = QueueSink(asyncio.get_running_loop())
        view = SpaceView(cfg.space, cfg.device, broker=str(cfg.broker), agent=False)
        await _with_ui(view, sink, SpaceWatch(cfg, sink).run(stop), logging.WARNING)

    run(watch)
    return 0


async def _with_ui(view: SpaceView, sink: QueueSink, body: Awaitable[None], level: int) -> None:
    """Run ``body`` with the screen drawing ``view``; the log goes to the screen's event log (and
    the --log-file) instead of stderr while the screen owns the terminal."""
    from agent.events import LogBridge
    from agent.ui import Screen  # (rich is imported only when a screen is wanted)

    screen = Screen(view, sink)
    ui_stop = asyncio.Event()
    with _log_to(LogBridge(sink, level)):
        ui = asyncio.create_task(screen.run(ui_stop), name="ui")
        try:
            await body
        finally:
            ui_stop.set()
            await ui
    if screen.interactive:  # the alternate screen is gone: leave a line saying how it ended
        t = view.totals
        print(f"atrius: {view.space} on {view.broker}: {t.versions} version(s), {t.locks} lock(s), "
              f"{t.conflicts} conflict(s), {t.errors} error(s) while the screen was open", file=sys.stderr)


@contextlib.contextmanager
def _log_to(bridge: logging.Handler) -> Iterator[None]:
    root = logging.getLogger()
    console = [h for h in root.handlers if type(h) is logging.StreamHandler]
    for h in console:
        root.removeHandler(h)
    atrius = logging.getLogger("atrius")
    atrius.addHandler(bridge)
    try:
        yield
    finally:
        atrius.removeHandler(bridge)
        for h in console:
            root.addHandler(h)


def main_command(config_path: str, action: Callable[[AgentConfig], int]) -> int:
    """Run a one-shot command: config errors exit 2, failures exit 1 with one readable line."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    try:
        return action(cfg)
    except CommandError as exc:
        log.error("%s", exc)
        return 1
