"""The hub: the embedded amqtt broker and the coordinator in one process (``atrius hub``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from broker.coordinator import Coordinator, RetentionPolicy
from broker.embedded import run_embedded
from schemas.mqtt import BrokerUrl

log = logging.getLogger("atrius.hub")


async def serve_hub(host: str, port: int, data_dir: Path, stop: asyncio.Event,
                    retention: RetentionPolicy | None = None) -> None:
    """Run broker + coordinator until ``stop`` is set; raises BrokerStartError if it cannot listen."""
    started = asyncio.Event()
    broker_task = asyncio.create_task(run_embedded(host, port, started), name="embedded-broker")
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({broker_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if broker_task.done():
        waiter.cancel()
        broker_task.result()  # raises BrokerStartError
        return
    connect_host = "127.0.0.1" if host in {"0.0.0.0", "", "::"} else host
    coordinator = Coordinator(BrokerUrl(connect_host, port, False), data_dir, retention=retention)
    log.info("hub listening on %s:%d, data in %s", host, port, data_dir)
    try:
        await coordinator.run(stop)
    finally:
        broker_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await broker_task
