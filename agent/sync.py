"""The sync engine: owns every listed file's sync state and runs the pipeline for it.

scan -> chunk -> announce (head) -> transfer (pull, windowed) -> assemble -> verify -> apply

One :class:`FileTask` per listed file is the single owner of that file's state; the MQTT thread,
the watchdog thread and timers only wake it.  The :class:`Engine` owns the MQTT session, the
presence map and the blob exchange, and routes each validated message to its owner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import __version__
from agent.apply import Assembly, ContentMismatch, remove_stale_temps
from agent.chunker import FileChanged, FileStat, Scan, hash_file, scan_file, stat_of
from agent.config import AgentConfig, FileEntry
from agent.state import AgentState
from agent.watcher import QUICK_MS, Watcher
from schemas.exchange import HUB, BlobExchange, FetchAborted, FetchFailed, device_provider
from schemas.manifest import (
    ChunkRef,
    ManifestError,
    blob_hash,
    decode_inline,
    decode_page,
    encode_pages,
    inline_page,
)
from schemas.messages import Head, MessageError, Presence, PresenceState, decode_head, decode_presence, encode
from schemas.mqtt import MqttSession, Will
from schemas.rules import RemoteAction, Startup, at_startup, next_version, on_remote_head, presence_is_current
from schemas.topics import (
    TopicError,
    TopicKind,
    all_presence_filter,
    device_data_topic,
    device_request_topic,
    head_topic,
    parse_topic,
    presence_topic,
)

log = logging.getLogger("atrius.agent")

RETAINED_GRACE = 0.7
"""Seconds after (re)connecting during which retained heads are expected to arrive."""
FETCH_GIVE_UP = 30.0
RETRY_DELAY = 3.0


class ScanError(RuntimeError):
    """A listed file that exists but cannot be read; retried until it can."""


def conflict_name(path: Path, device: str, when: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when if when is not None else time.time()))
    candidate = path.with_name(f"{path.stem}.conflict-{device}-{stamp}{path.suffix}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.conflict-{device}-{stamp}-{n}{path.suffix}")
    return candidate


@dataclass
class _PageSink:
    pages: dict[str, bytes]

    def put(self, digest: str, data: memoryview) -> None:
        self.pages[digest] = bytes(data)


class FileTask:
    """Single owner of one file's sync state."""

    def __init__(self, engine: Engine, entry: FileEntry) -> None:
        self.engine = engine
        self.entry = entry
        self.known: Head | None = engine.state.synced.get(entry.file_id)
        self.remote: Head | None = None
        self.remote_conn = -1
        self.index: dict[str, tuple[int, int]] = {}
        self.index_stat: FileStat | None = None
        self.local_hash: str | None = None
        self.dirty = False
        self.reconcile_due = True
        self.bad_heads: set[str] = set()
        self._applying: Head | None = None
        self.wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._missing_logged = False

    # -- hints from other owners (run on the loop, never block) -----------------------------
    def hint_local(self, quick: bool) -> None:
        delay = (QUICK_MS if quick else self.engine.cfg.settle_ms) / 1000
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._timer is not None:
            if quick and self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = loop.call_at(due, self._settled)

    def _settled(self) -> None:
        self._timer = None
        self.dirty = True
        self.wake.set()

    def on_remote(self, head: Head) -> None:
        self.remote_conn = self.engine.session.connect_count
        if head.hash in self.bad_heads:
            return
        # Track the last arrival, not the best: it is what the broker now retains, so a loser
        # arriving after our winner is noticed (and answered with REASSERT).
        if self.remote is None or (head.version, head.hash) != (self.remote.version, self.remote.hash):
            self.remote = head
            self.wake.set()
            applying = self._applying
            if applying is not None and on_remote_head(head, applying, "") is RemoteAction.APPLY:
                # Stop fetching a version nobody will want; its partial stays in case it comes back.
                self.engine.exchange.abort(self.engine.cfg.space, self.entry.file_id, f"superseded by v{head.version}")

    def on_reconnected(self) -> None:
        self.reconcile_due = True
        self.dirty = True
        self.wake.set()

    # -- the owner's loop ----------------------------------------------------------------------
    async def run(self) -> None:
        removed = remove_stale_temps(self.entry.path)
        if removed:
            log.info("%s: removed %d temp file(s) left by an interrupted apply", self.entry.file_id, removed)
        last_error = ""
        while True:
            try:
                await self._step()
                last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the other files; say it once, retry quietly
                text = str(exc)
                if text != last_error:
                    log.error("%s: %s", self.entry.file_id, text, exc_info=log.isEnabledFor(logging.DEBUG))
                    last_error = text
                self.dirty = True
                self.engine.wake_later(self, RETRY_DELAY)
            await self.wake.wait()
            self.wake.clear()

    async def _step(self) -> None:
        eng = self.engine
        if not eng.session.connected:
            return
        if self.reconcile_due:
            await eng.ready_after_connect()
            if not eng.session.connected:
                return
            self.reconcile_due = False
            await self._reconcile()
        if self.remote is not None:
            action = on_remote_head(self.remote, self.known, eng.cfg.device)
            if action is RemoteAction.APPLY:
                await self._apply(self.remote, keep_local=False)
            elif action is RemoteAction.REASSERT and self.known is not None:
                log.info("%s: broker holds an older head (v%d); re-publishing v%d",
                         self.entry.file_id, self.remote.version, self.known.version)
                self._announce(self.known)
        if self.dirty:
            self.dirty = False
            await self._check_local()

    async def _reconcile(self) -> None:
        """At start-up and after each reconnect: compare local, last synced and retained head."""
        await self._rescan()
        remote = self.remote if self.remote_conn == self.engine.session.connect_count else None
        decision = at_startup(self.local_hash, self.known, remote)
        fid = self.entry.file_id
        log.debug("%s: reconcile -> %s", fid, decision.value)
        if decision is Startup.IN_SYNC and remote is not None:
            self._set_known(remote)
        elif decision is Startup.APPLY_REMOTE and remote is not None:
            await self._apply(remote, keep_local=False)
        elif decision is Startup.CONFLICT and remote is not None:
            await self._apply(remote, keep_local=True)
        elif decision is Startup.PUBLISH_LOCAL:
            if self.known is not None and self.known.hash == self.local_hash:
                self._announce(self.known)
            else:
                await self._check_local()

    async def _rescan(self, *, wait: bool = True) -> Scan | None:
        """Scan the local file.  If it changes while being read: with ``wait``, scan again after the
        settle time; without, return None and let the next watch event (its close) bring us back."""
        path = self.entry.path
        while True:
            if stat_of(path) is None:
                self.index, self.index_stat, self.local_hash = {}, None, None
                return None
            try:
                scan = await asyncio.to_thread(scan_file, path)
            except FileChanged:
                if not wait:
                    self.hint_local(quick=False)
                    return None
                await asyncio.sleep(self.engine.cfg.settle_ms / 1000)
                continue
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ScanError(f"cannot read {path}: {exc.strerror or exc}") from exc
            self._index_from(scan.chunks, scan.stat)
            self.local_hash = scan.hash
            return scan

    async def _unchanged(self, digest: str) -> bool:
        """Whether the local file still hashes to ``digest`` (a whole-file hash, no chunking)."""
        try:
            now, st = await asyncio.to_thread(hash_file, self.entry.path)
        except (FileChanged, FileNotFoundError):
            return False  # the full scan below decides
        except OSError as exc:
            raise ScanError(f"cannot read {self.entry.path}: {exc.strerror or exc}") from exc
        if now == digest:
            self.index_stat = st
        return now == digest

    def _index_from(self, chunks: tuple[ChunkRef, ...] | list[ChunkRef], st: FileStat | None) -> None:
        index: dict[str, tuple[int, int]] = {}
        off = 0
        for c in chunks:
            index.setdefault(c.hash, (off, c.length))
            off += c.length
        self.index, self.index_stat = index, st

    def _set_known(self, head: Head) -> None:
        self.known = head
        self.engine.state.set_synced(head)

    # -- scan -> chunk -> announce -----------------------------------------------------------
    async def _check_local(self) -> None:
        path = self.entry.path
        if stat_of(path) is None:
            if not self._missing_logged and self.known is not None:
                log.warning("%s: %s is missing locally; deletions of listed files are not synced yet",
                            self.entry.file_id, path)
                self._missing_logged = True
            return
        self._missing_logged = False
        if self.known is not None and self.local_hash == self.known.hash and await self._unchanged(self.known.hash):
            return  # e.g. the watch event of our own apply: hashed, not chunked again
        scan = await self._rescan(wait=False)
        if scan is None or (self.known is not None and scan.hash == self.known.hash):
            return
        if not self.engine.session.connected:
            self.dirty = True  # publish after reconnecting
            return
        pages = encode_pages(scan.chunks)
        digests = [blob_hash(p) for p in pages]
        for d, p in zip(digests, pages, strict=True):
            self.engine.state.put_blob(d, p)
        head = Head(
            file_id=self.entry.file_id,
            hash=scan.hash,
            size=scan.size,
            version=next_version(self.known, self.remote),
            author=self.engine.cfg.device,
            time=time.time(),
            parent=self.known.hash if self.known else None,
            chunks=len(scan.chunks),
            manifest=digests,
            inline_manifest=inline_page(pages, len(scan.chunks)),
        )
        self._set_known(head)
        self._announce(head)
        log.info("%s: published v%d (%s, %d chunks)", head.file_id, head.version, _size(head.size), head.chunks)

    def _announce(self, head: Head) -> None:
        self.engine.session.publish(head_topic(self.engine.cfg.space, head.file_id), encode(head), retain=True)

    # -- transfer -> assemble -> verify -> apply --------------------------------------------
    async def _apply(self, head: Head, *, keep_local: bool) -> None:
        fid = self.entry.file_id
        if head.deleted:
            log.warning("%s: v%d from %s is a deletion; deletions are not applied yet", fid, head.version, head.author)
            self.bad_heads.add(head.hash)
            return
        t0 = time.perf_counter()
        self._applying = head
        try:
            try:
                entries = await self._manifest(head)
            except ManifestError as exc:
                log.error("%s: v%d from %s has a bad manifest (%s); ignored", fid, head.version, head.author, exc)
                self.bad_heads.add(head.hash)
                return
            path = self.entry.path
            path.parent.mkdir(parents=True, exist_ok=True)
            asm = await asyncio.to_thread(Assembly, self.engine.state.partial_dir, path, fid, head.hash,
                                          head.size, entries)
            try:
                needed = await asyncio.to_thread(asm.copy_local, path, self.index)
                reused = len(asm.where) - len(needed) - asm.resumed
                if needed:
                    order = [e.hash for e in entries if e.hash in needed]
                    await self.engine.exchange.fetch(
                        self.engine.cfg.space, fid, order, self._providers_for(head), asm,
                        give_up_after=FETCH_GIVE_UP,
                    )
                await asyncio.to_thread(asm.finish, head.hash)
                if self.remote is not None and on_remote_head(self.remote, head, "") is RemoteAction.APPLY:
                    return  # a newer head arrived meanwhile; the loop applies that one
                await self._swap(asm, head, keep_local)
            finally:
                asm.abort()
        except ContentMismatch as exc:
            log.error("%s: v%d from %s: %s; this version is ignored", fid, head.version, head.author, exc)
            self.bad_heads.add(head.hash)
            return
        except FetchAborted as exc:
            log.info("%s: v%d from %s abandoned: %s", fid, head.version, head.author, exc)
            return
        except FetchFailed as exc:
            log.warning("%s: v%d not complete: %s; will retry", fid, head.version, exc)
            self.engine.wake_later(self, RETRY_DELAY)
            return
        finally:
            self._applying = None
        ms = (time.perf_counter() - t0) * 1000
        log.info("%s: applied v%d from %s (%s; %d chunks fetched, %d reused, %d resumed) in %.0f ms",
                 fid, head.version, head.author, _size(head.size), len(needed), reused, asm.resumed, ms)

    def _providers_for(self, head: Head) -> Callable[[], list[str]]:
        return lambda: self.engine.providers(head.author, hub_first=head.restored_from is not None)

    async def _manifest(self, head: Head) -> list[ChunkRef]:
        if head.size == 0:
            return []
        if head.inline_manifest is not None:
            pages = {head.manifest[0]: decode_inline(head.inline_manifest, head.manifest[0])}
        else:
            pages = {}
            missing = []
            for d in head.manifest:
                blob = self.engine.state.get_blob(d)
                if blob is None:
                    missing.append(d)
                else:
                    pages[d] = blob
            if missing:
                await self.engine.exchange.fetch(
                    self.engine.cfg.space, head.file_id, missing, self._providers_for(head),
                    _PageSink(pages), give_up_after=FETCH_GIVE_UP,
                )
        entries: list[ChunkRef] = []
        for d in head.manifest:
            entries.extend(decode_page(pages[d]))
            self.engine.state.put_blob(d, pages[d])
        if len(entries) != head.chunks or sum(e.length for e in entries) != head.size:
            raise ManifestError("chunk count or total size disagrees with the head")
        return entries

    async def _swap(self, asm: Assembly, head: Head, keep_local: bool) -> None:
        path = self.entry.path
        eng = self.engine
        st = stat_of(path)
        mode: int | None = None
        if st is not None:
            mode = os.stat(path).st_mode & 0o7777
            if st != self.index_stat:
                await self._rescan()  # the user touched it during the transfer: look again
            expected = {head.hash} | ({self.known.hash} if self.known else set())
            # Our own version lost a same-version race (tie-break): keep it visibly, not only in snapshots.
            lost_race = (self.known is not None and self.known.author == eng.cfg.device
                         and self.local_hash == self.known.hash and head.version == self.known.version)
            if keep_local or lost_race or (self.local_hash is not None and self.local_hash not in expected):
                copy = conflict_name(path, eng.cfg.device)
                await asyncio.to_thread(shutil.copy2, path, copy)
                log.warning("%s: local edit kept as conflict copy %s before applying v%d from %s",
                            head.file_id, copy.name, head.version, head.author)
            label = f"v{self.known.version}-{self.known.hash[:12]}" if (
                self.known and self.known.hash == self.local_hash) else f"local-{(self.local_hash or 'x')[:12]}"
            await asyncio.to_thread(eng.state.snapshot, head.file_id, path, label, eng.cfg.keep_snapshots)
        await asyncio.to_thread(asm.swap_in, mode)
        entries_index = {d: (offs[0], asm.lengths[d]) for d, offs in asm.where.items()}
        self.index, self.index_stat, self.local_hash = entries_index, stat_of(path), head.hash
        self._set_known(head)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class Engine:
    """Owns the session, presence map and exchange; routes messages to file owners."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.state = AgentState(cfg.state_dir)
        self.presence: dict[str, Presence] = {}
        self.tasks: dict[str, FileTask] = {}
        self._by_path: dict[Path, FileTask] = {}
        self._epoch_lock = threading.Lock()
        self._epoch = max(self.state.epoch, 0)
        self._connected_at = 0.0
        self.started_at = time.time()
        self.host = socket.gethostname()
        self.session: MqttSession
        self.exchange: BlobExchange

    # -- presence epoch (the will is set from paho's thread just before each connect) -------
    def _next_epoch(self) -> int:
        with self._epoch_lock:
            self._epoch = max(self._epoch + 1, time.time_ns() // 1_000_000)
            return self._epoch

    def _presence(self, state: PresenceState, epoch: int) -> bytes:
        return encode(Presence(device=self.cfg.device, state=state, epoch=epoch, since=self.started_at,
                               host=self.host[:255], agent_version=__version__))

    def _will(self) -> Will:
        epoch = self._next_epoch()
        return Will(presence_topic(self.cfg.space, self.cfg.device), self._presence(PresenceState.OFFLINE, epoch))

    def _on_connected(self) -> None:
        with self._epoch_lock:
            epoch = self._epoch
        self.state.epoch = epoch
        self.state.save()
        self._connected_at = asyncio.get_running_loop().time()
        self.session.publish(presence_topic(self.cfg.space, self.cfg.device),
                             self._presence(PresenceState.ONLINE, epoch), retain=True)
        for task in self.tasks.values():
            task.on_reconnected()

    async def ready_after_connect(self) -> None:
        """Wait out the grace period in which retained messages arrive after (re)connecting."""
        delay = self._connected_at + RETAINED_GRACE - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    def providers(self, author: str, *, hub_first: bool = False) -> list[str]:
        """Who to ask for a version's blobs, in order: the author while online, the coordinator,
        every other online device (one that applied the version holds it), the author again
        (presence may lag).  ``hub_first`` for a restored version: the coordinator holds it, the
        "author" (who asked for the restore) may not."""
        me = self.cfg.device
        online = sorted(d for d, p in self.presence.items() if p.state is PresenceState.ONLINE and d != me)
        others = [device_provider(d) for d in online if d != author]
        if hub_first:
            return [HUB, *others] + ([device_provider(author)] if author != me else [])
        out = [device_provider(author)] if author in online else []
        out += [HUB, *others]
        if author != me and device_provider(author) not in out:
            out.append(device_provider(author))
        return out

    def wake_later(self, task: FileTask, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, task.wake.set)

    # -- BlobSource: serve chunks of our current files and manifest pages -------------------
    def read_blobs(self, space: str, file_id: str, digests: list[str]) -> list[tuple[str, bytes | None]]:
        first = self.tasks.get(file_id)
        order = [first] if first else []
        order += [t for t in self.tasks.values() if t is not first]
        out: list[tuple[str, bytes | None]] = []
        for d in digests:
            data = None
            for t in order:
                loc = t.index.get(d)
                if loc is None:
                    continue
                try:
                    with open(t.entry.path, "rb") as fh:
                        fh.seek(loc[0])
                        chunk = fh.read(loc[1])
                except OSError:
                    continue
                if blob_hash(chunk) == d:
                    data = chunk
                    break
            if data is None:
                data = self.state.get_blob(d)
            out.append((d, data))
        return out

    # -- incoming messages ----------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(topic)
        except TopicError as exc:
            log.warning("dropped message: %s", exc)
            return
        if parsed.space != self.cfg.space:
            return
        kind = parsed.kind
        if kind is TopicKind.DEVICE_DATA and parsed.device == self.cfg.device:
            self.exchange.on_data(payload)
        elif kind is TopicKind.DEVICE_REQUEST and parsed.device == self.cfg.device:
            self.exchange.on_request(parsed.space, payload)
        elif kind is TopicKind.HEAD and parsed.file_id is not None:
            self._on_head(parsed.file_id, payload)
        elif kind is TopicKind.PRESENCE and parsed.device is not None:
            self._on_presence(parsed.device, payload)

    def _on_head(self, file_id: str, payload: bytes) -> None:
        task = self.tasks.get(file_id)
        if task is None or not payload:
            return
        try:
            head = decode_head(file_id, payload)
        except MessageError as exc:
            log.warning("dropped %s", exc)
            return
        task.on_remote(head)

    def _on_presence(self, device: str, payload: bytes) -> None:
        if not payload:
            self.presence.pop(device, None)
            return
        try:
            p = decode_presence(device, payload)
        except MessageError as exc:
            log.warning("dropped %s", exc)
            return
        current = self.presence.get(device)
        if presence_is_current(p, current):
            if current is None or current.state is not p.state:
                log.info("device %s is %s", device, p.state.value)
            self.presence[device] = p

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        self.session = MqttSession(
            cfg.broker, f"atrius-{cfg.space}-{cfg.device}",
            on_message=self._on_message, on_connected=self._on_connected, will=self._will,
            username=cfg.username, password=cfg.password, ca_file=cfg.ca_file,
        )
        self.exchange = BlobExchange(self.session, cfg.device, self)
        for entry in cfg.files:
            task = FileTask(self, entry)
            self.tasks[entry.file_id] = task
            self._by_path[entry.path] = task
            self.session.subscribe(head_topic(cfg.space, entry.file_id))
        self.session.subscribe(all_presence_filter(cfg.space))
        self.session.subscribe(device_request_topic(cfg.space, cfg.device))
        self.session.subscribe(device_data_topic(cfg.space, cfg.device))
        watcher = Watcher([e.path for e in cfg.files], self._on_hint)
        watcher.start()
        self.exchange.start()
        self.session.start()
        log.info("agent %s in space %s: %d file(s), broker %s", cfg.device, cfg.space, len(cfg.files), cfg.broker)
        runners = [asyncio.create_task(t.run(), name=f"file:{fid}") for fid, t in self.tasks.items()]
        runners.append(asyncio.create_task(self._periodic_rescan(), name="rescan"))
        try:
            await stop.wait()
        finally:
            for r in runners:
                r.cancel()
            await asyncio.gather(*runners, return_exceptions=True)
            watcher.stop()
            await self.exchange.close()
            with self._epoch_lock:
                epoch = self._epoch
            await self.session.stop([(presence_topic(cfg.space, cfg.device),
                                      self._presence(PresenceState.OFFLINE, epoch))])
            self.state.save()
            log.info("agent %s stopped", cfg.device)

    def _on_hint(self, path: Path, quick: bool) -> None:
        task = self._by_path.get(path)
        if task is not None:
            task.hint_local(quick)

    async def _periodic_rescan(self) -> None:
        """Watch events can be lost: look at files whose stat changed since their last scan."""
        while True:
            await asyncio.sleep(self.cfg.rescan_seconds)
            for task in self.tasks.values():
                if stat_of(task.entry.path) != task.index_stat:
                    task.hint_local(quick=False)
