from prefect import task
from prefect.logging import get_run_logger

from pacs2bids import memory as _memory
from pacs2bids import progress as _progress
from pacs2bids import staging as _staging
from pacs2bids import study as _study
from pacs2bids.config import ProjectSpec
from pacs2bids.model import StudyRef
from pacs2bids.run import RunContext

from . import TASK_DEFAULTS


@task(name="extract_study", task_run_name="extract_study-sub-{study.subject}", **TASK_DEFAULTS)
def extract_study(spec: ProjectSpec, study: StudyRef, ctx: RunContext) -> _study.StudyResult:
    """One study retrieved, pseudonymised and converted into the run's staging dataset
    (:func:`pacs2bids.study.extract_study`), or, with the spec's ``staging``, into its part on the
    staging store (:func:`pacs2bids.staging.extract_staged`); its progress goes to the Prefect run log and to the
    run's tracker (:mod:`pacs2bids.progress`), when this process holds one."""
    logger = get_run_logger()
    _memory.tune_malloc()  # also on a Dask worker (issue 14): what the study frees is returned
    tracker = _progress.tracker(ctx.run_id)

    def progress(series, done: int, total: int | None) -> None:
        number = series.series_number if series.series_number is not None else "?"
        logger.info("sub-%s series %s: %d/%s instances received", study.subject, number, done, total or "?")
        if tracker is not None:
            tracker.received(series.series_instance_uid, done, total)

    # with remote staging, in a local scratch folder, then uploaded (pacs2bids.staging, issue 14)
    extract = _study.extract_study if spec.staging is None else _staging.extract_staged
    result = extract(spec, study, ctx, progress=progress, log=logger)
    if tracker is not None:
        tracker.add_bytes(result.received_bytes)
        tracker.study_done([s.series_instance_uid for s in study.series])
    _memory.give_back()  # what the study freed: the process stays the size of the studies at hand
    return result
