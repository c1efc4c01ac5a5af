"""The run's progress in the terminal (:mod:`pacs2bids.progress` renderers, no engine).

On a terminal, a rich progress bar on stderr (rich comes with Prefect); elsewhere (CI, logs,
pipes), one ``pacs2bids: progress: ...`` line when the totals are known, then at most every
``every`` seconds, and when the studies are done. :func:`show_progress` watches every run
opened in this process while it is active (``pacs2bids run`` wraps the flow in it).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

from . import progress

EVERY_SECONDS = float(os.environ.get("PACS2BIDS_PROGRESS_SECONDS", "30"))


class LineProgress:
    """One line per snapshot, at most every ``every`` seconds (the first and the last always)."""

    def __init__(self, stream: TextIO, every: float = EVERY_SECONDS, clock=time.monotonic):
        self.stream, self.every, self.clock = stream, every, clock
        self._lock = threading.Lock()
        self._next: float | None = None

    def __call__(self, snap: progress.Snapshot) -> None:
        with self._lock:
            now = self.clock()
            if not snap.finished and self._next is not None and now < self._next:
                return
            self._next = now + self.every
            print(f"pacs2bids: progress: {snap.text()}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A rich progress bar on ``stream``, its description the snapshot's line."""

    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self._bar = Progress(TextColumn("pacs2bids"), BarColumn(), TaskProgressColumn(),
                             TextColumn("{task.description}"), console=Console(file=stream), transient=False)
        self._task = self._bar.add_task("", total=100.0)
        self._bar.start()

    def __call__(self, snap: progress.Snapshot) -> None:
        self._bar.update(self._task, completed=100.0 * snap.fraction, description=snap.text())

    def close(self) -> None:
        self._bar.stop()


def renderer(stream: TextIO):
    """A bar when ``stream`` is a terminal, progress lines otherwise."""
    isatty = getattr(stream, "isatty", None)
    return BarProgress(stream) if isatty is not None and isatty() else LineProgress(stream)


@contextmanager
def show_progress(stream: TextIO | None = None) -> Iterator[None]:
    """Show on ``stream`` (stderr) the progress of every run opened in this process meanwhile."""
    stream = stream or sys.stderr
    shown: list = []

    def watch(tracker: progress.RunProgress) -> None:
        view = renderer(stream)
        shown.append(view)
        tracker.subscribe(view)

    remove = progress.on_open(watch)
    try:
        yield
    finally:
        remove()
        for view in shown:
            view.close()
