from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from pacs2bids import retrieve
from pacs2bids.config import ProjectSpec
from pacs2bids.model import StudyRef

from . import TASK_DEFAULTS


def _progress(study: StudyRef):
    """Per-series progress lines for Prefect's UI (subject code and series number only)."""
    logger = get_run_logger()

    def progress(series, done: int, total: int | None) -> None:
        number = series.series_number if series.series_number is not None else "?"
        logger.info("sub-%s series %s: %d/%s instances received", study.subject, number, done, total or "?")

    return progress


@task(name="retrieve_study", task_run_name="retrieve_study-sub-{study.subject}", **TASK_DEFAULTS)
def retrieve_study(spec: ProjectSpec, study: StudyRef, raw_root: Path) -> list[retrieve.RetrievedSeries]:
    """:func:`pacs2bids.retrieve.retrieve_study`: window, pacing, chosen then fallback transport."""
    return retrieve.retrieve_study(spec, study, raw_root, progress=_progress(study))
