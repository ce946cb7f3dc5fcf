"""Keep an index in step with folders: new and changed pictures are indexed, removed ones deleted.

Built on watchdog's observer (inotify on Linux); events are gathered for a short quiet
period and sent in batches through the same client as ``clipseek index``.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from executors.images.imaging import uri_id
from executors.images.video import is_media_file
from clipseek.client import ClipseekClient, IndexReport

logger = logging.getLogger(__name__)


@dataclass
class WatchBatch:
    """What one batch of changes did: the index report of the new and changed files, and the removed
    files that were in the index and are deleted from it now (their stored uris)."""

    report: IndexReport = field(default_factory=IndexReport)
    deleted: List[str] = field(default_factory=list)


class _Changes:
    def __init__(self):
        self.lock = threading.Lock()
        self.changed: set = set()
        self.removed: set = set()
        self.last = 0.0

    def add(self, path: str, removed: bool = False) -> None:
        if not is_media_file(path):
            return
        path = os.path.abspath(path)
        with self.lock:
            (self.removed if removed else self.changed).add(path)
            (self.changed if removed else self.removed).discard(path)
            self.last = time.monotonic()

    def take(self, quiet: float):
        with self.lock:
            if not (self.changed or self.removed) or time.monotonic() - self.last < quiet:
                return [], []
            changed, removed = sorted(self.changed), sorted(self.removed)
            self.changed, self.removed = set(), set()
            return changed, removed


def watch(client: ClipseekClient, folders: Sequence[str], *, stop: threading.Event, quiet: float = 1.0,
          on_batch: Optional[Callable[[IndexReport, int], None]] = None,
          on_changes: Optional[Callable[[WatchBatch], None]] = None, **index_options) -> None:
    """Index what changes under ``folders`` until ``stop`` is set.

    After each batch ``on_batch(report, deleted)`` gets the index report and how many documents were
    deleted; ``on_changes(batch)`` gets a ``WatchBatch``, which also names the deleted files."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    changes = _Changes()

    class Handler(FileSystemEventHandler):
        def on_created(self, event):
            if not event.is_directory:
                changes.add(event.src_path)

        def on_modified(self, event):
            if not event.is_directory:
                changes.add(event.src_path)

        def on_closed(self, event):
            if not event.is_directory:
                changes.add(event.src_path)

        def on_deleted(self, event):
            if not event.is_directory:
                changes.add(event.src_path, removed=True)

        def on_moved(self, event):
            if not event.is_directory:
                changes.add(event.src_path, removed=True)
                changes.add(event.dest_path)

    observer = Observer()
    for folder in folders:
        # the real folder: inotify sees nothing under a watched path that is a symbolic link
        observer.schedule(Handler(), os.path.realpath(os.path.expanduser(folder)), recursive=True)
    observer.start()
    try:
        while not stop.wait(0.2):
            changed, removed = changes.take(quiet)
            existing = [p for p in changed if os.path.exists(p)]
            report = client.index(existing, **index_options) if existing else IndexReport()
            batch = WatchBatch(report)
            deleted = 0
            if removed:
                ids = {uri_id(p): p for p in removed}
                stored = {d.id: d.uri or ids[d.id] for d in client.lookup(list(ids)) if d.found}
                deleted = client.delete(list(ids))
                batch.deleted = [stored[i] for i in ids if i in stored]
                logger.info("watch: deleted %d of %d removed files", deleted, len(removed))
            if existing or removed:
                if on_batch:
                    on_batch(report, deleted)
                if on_changes:
                    on_changes(batch)
    finally:
        observer.stop()
        observer.join(timeout=5)
