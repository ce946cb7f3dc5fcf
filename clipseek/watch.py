"""Keep an index in step with folders: new and changed pictures are indexed, removed ones deleted.

Built on watchdog's observer (inotify on Linux); events are gathered for a short quiet
period and sent in batches through the same client as ``clipseek index``.
"""

import logging
import os
import threading
import time
from typing import Callable, Optional, Sequence

from executors.images.imaging import is_image_file, uri_id
from clipseek.client import ClipseekClient, IndexReport

logger = logging.getLogger(__name__)


class _Changes:
    def __init__(self):
        self.lock = threading.Lock()
        self.changed: set = set()
        self.removed: set = set()
        self.last = 0.0

    def add(self, path: str, removed: bool = False) -> None:
        if not is_image_file(path):
            return
        with self.lock:
            (self.removed if removed else self.changed).add(os.path.abspath(path))
            (self.changed if removed else self.removed).discard(os.path.abspath(path))
            self.last = time.monotonic()

    def take(self, quiet: float):
        with self.lock:
            if not (self.changed or self.removed) or time.monotonic() - self.last < quiet:
                return [], []
            changed, removed = sorted(self.changed), sorted(self.removed)
            self.changed, self.removed = set(), set()
            return changed, removed


def watch(client: ClipseekClient, folders: Sequence[str], *, stop: threading.Event, quiet: float = 1.0,
          on_batch: Optional[Callable[[IndexReport, int], None]] = None, **index_options) -> None:
    """Index what changes under ``folders`` until ``stop`` is set."""
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
        observer.schedule(Handler(), os.path.abspath(os.path.expanduser(folder)), recursive=True)
    observer.start()
    try:
        while not stop.wait(0.2):
            changed, removed = changes.take(quiet)
            existing = [p for p in changed if os.path.exists(p)]
            report = client.index(existing, **index_options) if existing else IndexReport()
            deleted = client.delete([uri_id(p) for p in removed]) if removed else 0
            if (existing or removed) and on_batch:
                on_batch(report, deleted)
    finally:
        observer.stop()
        observer.join(timeout=5)
