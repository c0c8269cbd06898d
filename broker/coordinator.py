"""The coordinator: watches every space's heads, pulls each new version into the chunk store, serves it.

It connects to any MQTT 3.1.1 broker as an ordinary client (in-process beside the embedded
broker in ``atrius hub``, or alone against Mosquitto in ``atrius coordinator``).  For every head
it has not stored yet it fetches the manifest pages and chunks from the author through the same
windowed, hash-verified pull the agents use, so a device that missed a transfer can repair it
from the coordinator even after the author went offline.  One coordinator serves every space.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from broker.store import ChunkStore, StoreError
from schemas.exchange import BlobExchange, FetchFailed, device_provider
from schemas.manifest import ChunkRef, ManifestError, decode_inline, decode_page
from schemas.messages import MAX_JSON_MESSAGE, Head
from schemas.mqtt import BrokerUrl, MqttSession
from schemas.topics import ROOT, TopicError, TopicKind, all_heads_filter, parse_topic

log = logging.getLogger("atrius.coordinator")

RETRY_DELAY = 5.0
MAX_RETRY_DELAY = 120.0


class _StoreSink:
    def __init__(self, store: ChunkStore) -> None:
        self.store = store

    def put(self, digest: str, data: memoryview) -> None:
        self.store.put(digest, data)


@dataclass
class _FileJob:
    """The newest head of one (space, file) and the task pulling it."""

    head: Head
    task: asyncio.Task[None] | None = None
    done: set[str] = field(default_factory=set)


class Coordinator:
    def __init__(
        self, url: BrokerUrl, data_dir: Path, *, username: str | None = None, password: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.url = url
        self.data_dir = data_dir
        self.store = ChunkStore(data_dir)
        self._creds = (username, password, ca_file)
        self._jobs: dict[tuple[str, str], _FileJob] = {}
        self.session: MqttSession
        self.exchange: BlobExchange
        self.stored_versions = 0

    # BlobSource
    def read_blobs(self, space: str, file_id: str, digests: list[str]) -> list[tuple[str, bytes | None]]:
        return [(d, self.store.get(d)) for d in digests]

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(topic)
        except TopicError as exc:
            log.warning("dropped message: %s", exc)
            return
        if parsed.kind is TopicKind.HUB_REQUEST:
            self.exchange.on_request(parsed.space, payload)
        elif parsed.kind is TopicKind.HUB_DATA:
            self.exchange.on_data(payload)
        elif parsed.kind is TopicKind.HEAD and parsed.file_id is not None and payload:
            if len(payload) > MAX_JSON_MESSAGE:
                log.warning("dropped oversized head on %s", topic)
                return
            try:
                head = Head.model_validate_json(payload)
            except ValidationError as exc:
                log.warning("dropped malformed head on %s: %s", topic, exc.errors()[0]["msg"])
                return
            if head.file_id != parsed.file_id:
                log.warning("dropped head whose file_id does not match %s", topic)
                return
            self._on_head(parsed.space, head)

    def _on_head(self, space: str, head: Head) -> None:
        key = (space, head.file_id)
        job = self._jobs.get(key)
        if job is not None and head.hash in job.done:
            return
        if job is not None and job.head.hash == head.hash and job.task is not None and not job.task.done():
            return
        if job is None:
            job = self._jobs[key] = _FileJob(head)
        if job.task is not None and not job.task.done():
            job.task.cancel()
        job.head = head
        job.task = asyncio.get_running_loop().create_task(self._pull(space, job), name=f"pull:{space}/{head.file_id}")

    async def _pull(self, space: str, job: _FileJob) -> None:
        head = job.head
        delay = RETRY_DELAY
        while True:
            try:
                await self._pull_once(space, head)
                job.done.add(head.hash)
                self.stored_versions += 1
                log.info("stored %s/%s v%d from %s (%d chunks)", space, head.file_id, head.version, head.author,
                         head.chunks)
                return
            except (FetchFailed, StoreError) as exc:
                log.warning("%s/%s v%d: %s; retrying in %.0fs", space, head.file_id, head.version, exc, delay)
            except ManifestError as exc:
                log.error("%s/%s v%d: bad manifest (%s); not stored", space, head.file_id, head.version, exc)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)  # the author may be gone for a long time

    async def _pull_once(self, space: str, head: Head) -> None:
        if head.deleted or head.size == 0:
            return
        sink = _StoreSink(self.store)
        providers = [device_provider(head.author)]
        if head.inline_manifest is not None:
            page = decode_inline(head.inline_manifest, head.manifest[0])
            self.store.put(head.manifest[0], page)
        missing = [d for d in head.manifest if not self.store.has(d)]
        if missing:
            await self.exchange.fetch(space, head.file_id, missing, lambda: providers, sink, give_up_after=30)
        entries: list[ChunkRef] = []
        for d in head.manifest:
            page_data = self.store.get(d)
            if page_data is None:
                raise FetchFailed(f"manifest page {d[:12]} vanished from the store")
            entries.extend(decode_page(page_data))
        if len(entries) != head.chunks or sum(e.length for e in entries) != head.size:
            raise ManifestError("chunk count or size disagrees with the head")
        need = [d for d in dict.fromkeys(e.hash for e in entries) if not self.store.has(d)]
        if need:
            await self.exchange.fetch(space, head.file_id, need, lambda: providers, sink, give_up_after=60)

    async def run(self, stop: asyncio.Event) -> None:
        username, password, ca_file = self._creds
        self.session = MqttSession(
            self.url, f"atrius-coordinator-{uuid.uuid4().hex[:8]}", on_message=self._on_message,
            username=username, password=password, ca_file=ca_file,
        )
        self.exchange = BlobExchange(self.session, None, self)
        self.session.subscribe(all_heads_filter("+"))
        self.session.subscribe(f"{ROOT}/+/hub/req")
        self.session.subscribe(f"{ROOT}/+/hub/data")
        self.exchange.start()
        self.session.start()
        log.info("coordinator using %s, data in %s", self.url, self.data_dir)
        try:
            await stop.wait()
        finally:
            for job in self._jobs.values():
                if job.task is not None:
                    job.task.cancel()
            await self.exchange.close()
            await self.session.stop()
