"""The ``atrius agent`` command: load the config, run the sync engine until a signal."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from agent.commands import CommandError
from agent.config import AgentConfig, ConfigError, load_config
from agent.state import StateError
from agent.sync import Engine

log = logging.getLogger("atrius.agent")

Runner = Callable[[Callable[[asyncio.Event], Awaitable[None]]], None]


def main_agent(config_path: str, *, tui: bool, run: Runner) -> int:
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    if tui:
        log.error("--tui is not available in this release yet; run without it")
        return 2
    try:
        engine = Engine(cfg)
    except StateError as exc:
        log.error("%s", exc)
        return 1
    run(engine.run)
    return 0


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
