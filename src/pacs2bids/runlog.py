"""The run's own log, kept with the dataset, and the run summary as a Prefect artifact.

The library's log lines (logger ``pacs2bids``) of a run are written into the staging dataset,
where the leak scan reads them like every other file; the log is closed before that scan, so
nothing is appended to what was scanned.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .run import RunSummary

log = logging.getLogger(__name__)


@contextmanager
def run_log(path: Path) -> Iterator[logging.Handler]:
    """Keep the library's log of this run at ``path`` (it is leak-scanned like the rest) while
    inside; :func:`close_run_log` may close it earlier."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lib = logging.getLogger("pacs2bids")
    lib.addHandler(handler)
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        lib.removeHandler(handler)
        handler.close()


def close_run_log(staging: Path) -> None:
    """Detach and close every run log written under ``staging`` (idempotent)."""
    lib = logging.getLogger("pacs2bids")
    for handler in list(lib.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(staging):
            lib.removeHandler(handler)
            handler.close()


def artifact_key(project: str) -> str:
    """The project's key for its Prefect artifacts (lowercase letters, digits and dashes)."""
    return "pacs2bids-" + (re.sub(r"[^a-z0-9-]+", "-", project.lower()).strip("-") or "project")


def summary_artifact(project: str, summary: RunSummary, logger=log) -> None:
    """The run summary as a Prefect artifact, for the UI (pseudonymised like the summary;
    the leak tests read it back)."""
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(project)
    try:
        create_markdown_artifact(markdown="```\n" + summary.format() + "\n```", key=key,
                                 description=f"pacs2bids run {summary.run_id}: {summary.state}")
    except Exception as exc:  # the UI's copy: never worth failing a run for
        logger.warning("could not record the summary artifact: %s", type(exc).__name__)
