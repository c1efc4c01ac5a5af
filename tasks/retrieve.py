from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from pacs2bids import retrieve
from pacs2bids.config import ProjectSpec
from pacs2bids.model import StudyRef

from . import TASK_DEFAULTS


@task(name="retrieve_study", task_run_name="retrieve_study-sub-{study.subject}", **TASK_DEFAULTS)
def retrieve_study(spec: ProjectSpec, study: StudyRef, raw_root: Path) -> list[retrieve.RetrievedSeries]:
    """C-GET, C-MOVE or WADO-RS of one study into the private raw folder; counts checked per series."""
    logger = get_run_logger()

    def progress(done: int, total: int | None) -> None:
        logger.info("sub-%s: %d/%s instances received", study.subject, done, total if total else "?")

    return retrieve.retrieve_study(spec, study, raw_root, progress=progress)
