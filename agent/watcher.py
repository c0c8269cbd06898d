"""Watch stage: turns watchdog events on the listed files and inside the synced folders into
"look at this path after N ms" hints.

The watchdog thread only calls ``loop.call_soon_threadsafe``.  Events are hints, not truth: the
engine decides by content hash.  A close-after-write or a rename onto the path (editors' atomic
save) means the write is complete, so it is looked at almost at once; "created" and "modified"
wait for the settle time, restarting on every further write, so a file still being written is
not sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import (
    DirModifiedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger("atrius.watch")

QUICK_MS = 5


class _Handler(FileSystemEventHandler):
    def __init__(self, watched: set[str], roots: tuple[str, ...], notify: Callable[[str, bool], None]) -> None:
        self.watched = watched
        self.roots = roots
        self.notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileOpenedEvent | FileClosedNoWriteEvent):
            return
        if event.is_directory and (not self.roots or isinstance(event, DirModifiedEvent)):
            return  # (a folder's "modified" only echoes a change to an entry, which has its own event)
        # Created fires at open(O_CREAT), before a byte is written: only close, rename and delete
        # mean the writer is done.
        quick = not isinstance(event, FileModifiedEvent | FileCreatedEvent)
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if isinstance(p, bytes):
                p = os.fsdecode(p)
            # A rename away from the path or a delete is also a change worth a look.
            if p and (p in self.watched or any(p.startswith(r) for r in self.roots)):
                self.notify(p, quick)


class Watcher:
    """Watches the parent folders of the listed files (so save-by-rename is seen) and every synced
    folder recursively."""

    def __init__(self, paths: Iterable[Path], on_hint: Callable[[Path, bool], None],
                 folders: Iterable[Path] = ()) -> None:
        self._loop = asyncio.get_running_loop()
        self._paths = {str(p): p for p in paths}
        self._on_hint = on_hint
        self._observer = Observer()
        roots = tuple(sorted({str(f) + os.sep for f in folders}))
        handler = _Handler(set(self._paths), roots, self._from_thread)
        recursive = sorted(set(folders))
        for folder in recursive:
            folder.mkdir(parents=True, exist_ok=True)
            self._observer.schedule(handler, str(folder), recursive=True)
        for folder in sorted({p.parent for p in self._paths.values()}):
            if not any(folder == r or r in folder.parents for r in recursive):
                folder.mkdir(parents=True, exist_ok=True)
                self._observer.schedule(handler, str(folder), recursive=False)

    def _from_thread(self, path: str, quick: bool) -> None:
        self._loop.call_soon_threadsafe(self._on_hint, self._paths.get(path) or Path(path), quick)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
