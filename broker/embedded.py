"""The embedded amqtt 0.12.1 broker: its configuration, its lifecycle, and the `atrius broker` entry point."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

from amqtt.broker import Broker

log = logging.getLogger("atrius.broker")

# amqtt and its state-machine library log every connection at INFO and every packet at DEBUG.
_NOISY_LOGGERS = ("amqtt", "transitions")
# amqtt's Broker.start() logs a traceback under this message before raising; we raise a one-liner.
_STARTUP_FAILED_MSG = "Broker startup failed"
# amqtt's shutdown awaits a drain of every client socket; bound it so one stuck client cannot hold the exit.
_SHUTDOWN_TIMEOUT_S = 10.0


class BrokerStartError(Exception):
    """The embedded broker could not start listening (port in use, address not available, bad host)."""


def broker_config(host: str, port: int) -> dict[str, Any]:
    """The amqtt config: one TCP listener on host:port, anonymous clients allowed, no $SYS, no packet log."""
    return {
        "listeners": {
            # amqtt splits bind at the last colon, so an IPv6 host works without brackets.
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0},
        },
        # An explicit plugin dict replaces amqtt's defaults (event logger, packet logger, $SYS publisher).
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


def _quiet_amqtt() -> None:
    """Keep amqtt's loggers at WARNING unless ours is at DEBUG."""
    level = logging.NOTSET if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)


class _DropStartupTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _STARTUP_FAILED_MSG


@contextlib.contextmanager
def _no_startup_traceback() -> Iterator[None]:
    broker_logger = logging.getLogger("amqtt.broker")
    flt = _DropStartupTraceback()
    broker_logger.addFilter(flt)
    try:
        yield
    finally:
        broker_logger.removeFilter(flt)


def _reason(exc: BaseException) -> str:
    """The root cause of amqtt's wrapped startup error, as a short phrase."""
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, socket.gaierror):
        return cause.strerror or str(cause)
    if isinstance(cause, OSError) and cause.errno is not None:
        return os.strerror(cause.errno)
    return str(cause) or type(cause).__name__


async def run_embedded(host: str, port: int, started: asyncio.Event | None = None) -> None:
    """Run an amqtt broker on host:port until cancelled, then shut it down.

    Sets `started` once the listener is bound. Raises BrokerStartError if it cannot listen.
    """
    _quiet_amqtt()
    broker = Broker(broker_config(host, port))
    try:
        with _no_startup_traceback():
            await broker.start()
    except Exception as exc:
        raise BrokerStartError(f"cannot listen on {host}:{port}: {_reason(exc)}") from None
    log.debug("amqtt broker started on %s:%s", host, port)
    if started is not None:
        started.set()
    try:
        await asyncio.Future()  # until cancelled
    finally:
        try:
            await asyncio.wait_for(broker.shutdown(), _SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.warning("broker shutdown did not finish within %s s", _SHUTDOWN_TIMEOUT_S)
        except Exception as exc:
            log.warning("broker shutdown failed: %s", exc)
        log.debug("amqtt broker stopped")


async def _serve(host: str, port: int) -> None:
    """Run the broker until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still raises KeyboardInterrupt
            loop.add_signal_handler(sig, stop.set)
    started = asyncio.Event()
    broker_task = asyncio.create_task(run_embedded(host, port, started), name="embedded-broker")
    waiters = [asyncio.create_task(started.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait({broker_task, waiters[0]}, return_when=asyncio.FIRST_COMPLETED)
        if started.is_set():
            log.info("broker listening on %s:%s", host, port)
            await asyncio.wait({broker_task, waiters[1]}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                log.info("broker stopping")
    finally:
        for waiter in waiters:
            waiter.cancel()
        broker_task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
    with contextlib.suppress(asyncio.CancelledError):
        await broker_task  # re-raises BrokerStartError


def main_broker(host: str, port: int) -> int:
    """`atrius broker`: serve MQTT on host:port until SIGINT/SIGTERM. Returns the process exit code."""
    try:
        asyncio.run(_serve(host, port))
    except BrokerStartError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
