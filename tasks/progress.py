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
    artifact current: created on the first snapshot, updated when a study or series completes,
    when the run finishes, and otherwise at most every ``UPDATE_SECONDS``."""

    def __init__(self, project: str, run_id: str, logger=log, clock=time.monotonic):
        self.key, self.run_id, self.logger, self.clock = progress_key(project), run_id, logger, clock
        self.artifact_id = None
        self._lock = threading.Lock()
        self._last: tuple | None = None
        self._written = 0.0
        self._failed = False

    def __call__(self, snap: progress.Snapshot) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        marks = (snap.studies_done, snap.series_done, snap.finished)
        with self._lock:
            if self._failed or (self._last == marks and self.clock() - self._written < UPDATE_SECONDS):
                return
            self._last, self._written = marks, self.clock()
            description = f"pacs2bids run {self.run_id}: {snap.text()}"
            pct = round(100.0 * snap.fraction, 1)
            try:
                if self.artifact_id is None:
                    self.artifact_id = create_progress_artifact(progress=pct, key=self.key, description=description)
                else:
                    update_progress_artifact(self.artifact_id, progress=pct, description=description)
            except Exception as exc:  # the UI's view: never worth failing a run for
                self._failed = True
                self.logger.warning("could not record the progress artifact: %s", type(exc).__name__)


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
