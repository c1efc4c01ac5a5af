"""The run's progress in the Prefect UI: a progress artifact, updated as studies and series complete.

:func:`track_progress` opens the run's tracker (:mod:`pacs2bids.progress`) once the query has
told what the run will retrieve, and subscribes :class:`ProgressArtifact` to it. Writing the
artifact never fails the run (like :func:`pacs2bids.runlog.summary_artifact`).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from pacs2bids import progress
from pacs2bids.runlog import artifact_key

log = logging.getLogger(__name__)
UPDATE_SECONDS = 2.0  # instance counts arrive often; the artifact is written at most this often between them


def progress_key(project: str) -> str:
    """The key of the project's progress artifact: the project's artifact key, ``-progress``."""
    return artifact_key(project) + "-progress"


class ProgressArtifact:
    """An observer of a :class:`~pacs2bids.progress.RunProgress` that keeps one Prefect progress
    artifact current: created on the first snapshot, updated when a study completes and when the
    run finishes, and otherwise (series completed, instances received) at most every
    ``UPDATE_SECONDS``: each write is a request to Prefect's API, and a run has many series."""

    def __init__(self, project: str, run_id: str, logger=log, clock=time.monotonic):
        self.key, self.run_id, self.logger, self.clock = progress_key(project), run_id, logger, clock
        self.artifact_id = None
        self._lock = threading.Lock()
        self._last: tuple | None = None
        self._written = 0.0
        self._failed = False

    def _due(self, snap: progress.Snapshot) -> bool:
        """Whether ``snap`` is written: the first, a study completed, the run finished, or something
        changed and ``UPDATE_SECONDS`` have passed since the last write."""
        marks = (snap.studies_done, snap.series_done, snap.instances_received, snap.finished)
        if self._last is None or marks[0] != self._last[0] or (snap.finished and not self._last[3]):
            return True
        return marks != self._last and self.clock() - self._written >= UPDATE_SECONDS

    def __call__(self, snap: progress.Snapshot) -> None:
        with self._lock:
            if self._failed or not self._due(snap):
                return
            self._last = (snap.studies_done, snap.series_done, snap.instances_received, snap.finished)
            self._written = self.clock()
            try:
                self._write(round(100.0 * snap.fraction, 1), f"pacs2bids run {self.run_id}: {snap.text()}")
            except Exception as exc:  # the UI's view: never worth failing a run for
                self._failed = True
                self.logger.warning("could not record the progress artifact: %s", type(exc).__name__)

    def _write(self, pct: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=pct, key=self.key, description=description)
        else:
            update_progress_artifact(self.artifact_id, progress=pct, description=description)


@contextmanager
def track_progress(project: str, run_id: str, studies: list, logger=log) -> Iterator[progress.RunProgress]:
    """The run's tracker, shown in the Prefect UI, with the totals of ``studies``; finished and
    closed on leaving (also when the run fails)."""
    tracker = progress.open_run(run_id)
    tracker.subscribe(ProgressArtifact(project, run_id, logger))
    try:
        tracker.begin(studies)
        yield tracker
        tracker.finish()
    finally:
        progress.close_run(run_id)
