"""How far a run is: a thread-safe tracker fed by events, watched by renderers (no engine).

:class:`RunProgress` counts, for one run, the studies, series and instances announced by the
query against those received and finished, the bytes received, and from these a fraction, a
rate (MB/s) and the time left (estimated from the studies done so far). Renderers (the Prefect
artifact in ``tasks/progress.py``, the terminal in :mod:`pacs2bids.progressview`) subscribe
and are called with a :class:`Snapshot` after each event; a renderer's failure never reaches
the run.

Trackers are found through a registry keyed by run id (:func:`open_run`, :func:`tracker`), and
:func:`on_open` lets a watcher (the CLI) subscribe to every tracker opened in this process. The
flow, its study tasks and the CLI share one process today (tasks run in threads). Were study
tasks to run in other processes, :func:`tracker` would return None there and the tasks would
report nothing: the events would then travel as Prefect events (``emit_event``) that the
flow's process turns into the same calls on its tracker.

The text holds counts and rates only, never identifiers; series are keyed in memory only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger(__name__)
MB = 1_000_000


@dataclass(frozen=True)
class Snapshot:
    """Where a run stands at one moment (plain values)."""

    studies: int
    studies_done: int
    series: int
    series_done: int
    instances: int
    instances_received: int
    bytes_received: int
    elapsed: float  # seconds since the totals were known
    finished: bool = False

    @property
    def fraction(self) -> float:
        """Done, from 0 to 1: half the instances received, half the studies finished (a study
        is received, then pseudonymised and converted)."""
        if self.finished:
            return 1.0
        studies = self.studies_done / self.studies if self.studies else 0.0
        instances = min(1.0, self.instances_received / self.instances) if self.instances else studies
        return 0.5 * instances + 0.5 * studies

    @property
    def mb_per_second(self) -> float | None:
        return self.bytes_received / MB / self.elapsed if self.elapsed > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left, from the time per study done so far; None before the first study is done."""
        if self.finished or self.studies_done >= self.studies:
            return 0.0
        if not self.studies_done:
            return None
        return self.elapsed / self.studies_done * (self.studies - self.studies_done)

    def text(self) -> str:
        """One line, e.g. ``studies 3/14 · series 40/120 · instances 1200/2728 · 12.3 MB/s · 1m20s left``."""
        rate = self.mb_per_second
        parts = [f"studies {self.studies_done}/{self.studies}", f"series {self.series_done}/{self.series}",
                 f"instances {self.instances_received}/{self.instances}",
                 f"{rate:.1f} MB/s" if rate is not None else "- MB/s",
                 "done" if self.finished else (f"{duration(self.eta)} left" if self.eta is not None else "time left: -")]
        return " · ".join(parts)


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = int(round(seconds or 0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunProgress:
    """One run's progress; every method may be called from any thread.

    Events: :meth:`begin` (totals from the query's StudyRefs), :meth:`received` (a series'
    instances so far, the retrieval's ``progress`` callback; a series is done once received
    whole), :meth:`add_bytes`, :meth:`study_done` (the study and all its series done, whatever
    their outcome), :meth:`finish`."""

    def __init__(self, run_id: str = "", clock: Callable[[], float] = time.monotonic):
        self.run_id, self._clock = run_id, clock
        self._lock = threading.Lock()
        self._studies = self._series = self._instances = 0
        self._studies_done = self._bytes = 0
        self._received: dict[object, int] = {}  # series key -> instances received so far
        self._series_done: set = set()
        self._started: float | None = None
        self._finished = False
        self._observers: list[Callable[[Snapshot], None]] = []

    def subscribe(self, observer: Callable[[Snapshot], None]) -> None:
        with self._lock:
            self._observers.append(observer)

    def begin(self, studies: Iterable) -> None:
        """The totals, from the StudyRefs the run will retrieve (their series' announced instances)."""
        studies = list(studies)
        with self._lock:
            self._studies = len(studies)
            self._series = sum(len(s.series) for s in studies)
            self._instances = sum(x.announced_instances or 0 for s in studies for x in s.series)
            self._started = self._clock()
        self._notify()

    def received(self, series_key, done: int, total: int | None = None) -> None:
        """``done`` instances of a series received so far (a running count, not an increment);
        the series counts as done once ``done`` reaches ``total``."""
        with self._lock:
            self._received[series_key] = max(done, self._received.get(series_key, 0))
            if total and done >= total:
                self._series_done.add(series_key)
        self._notify()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n
        self._notify()

    def study_done(self, series_keys: Iterable = ()) -> None:
        """A study finished (whatever its outcome): it and its series count as done."""
        with self._lock:
            self._studies_done += 1
            self._series_done.update(series_keys)
        self._notify()

    def finish(self) -> None:
        with self._lock:
            self._finished = True
        self._notify()

    def snapshot(self) -> Snapshot:
        with self._lock:
            elapsed = self._clock() - self._started if self._started is not None else 0.0
            return Snapshot(self._studies, min(self._studies_done, self._studies), self._series,
                            min(len(self._series_done), self._series), self._instances,
                            sum(self._received.values()), self._bytes, elapsed, self._finished)

    def _notify(self) -> None:
        with self._lock:
            observers = list(self._observers)
        if not observers:
            return
        snap = self.snapshot()
        for observer in observers:
            try:
                observer(snap)
            except Exception as exc:  # showing progress is never worth failing a run for
                log.debug("progress observer failed: %s", type(exc).__name__)


_registry: dict[str, RunProgress] = {}
_watchers: list[Callable[[RunProgress], None]] = []
_registry_lock = threading.Lock()


def on_open(watcher: Callable[[RunProgress], None]) -> Callable[[], None]:
    """Call ``watcher`` with every tracker opened from now on in this process; returns its removal."""
    with _registry_lock:
        _watchers.append(watcher)

    def remove() -> None:
        with _registry_lock:
            if watcher in _watchers:
                _watchers.remove(watcher)
    return remove


def open_run(run_id: str, clock: Callable[[], float] = time.monotonic) -> RunProgress:
    """A new tracker for ``run_id``, registered and shown to the watchers."""
    tracker_ = RunProgress(run_id, clock)
    with _registry_lock:
        _registry[run_id] = tracker_
        watchers = list(_watchers)
    for watcher in watchers:
        try:
            watcher(tracker_)
        except Exception as exc:
            log.debug("progress watcher failed: %s", type(exc).__name__)
    return tracker_


def tracker(run_id: str) -> RunProgress | None:
    """The tracker of ``run_id`` in this process, or None."""
    with _registry_lock:
        return _registry.get(run_id)


def close_run(run_id: str) -> None:
    with _registry_lock:
        _registry.pop(run_id, None)
