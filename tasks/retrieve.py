import re
from pathlib import Path

from prefect import task
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger

from pacs2bids import retrieve
from pacs2bids.config import ProjectSpec
from pacs2bids.model import StudyRef
from pacs2bids.windows import wait_until_open

from . import TASK_DEFAULTS


def pacs_limit_name(spec: ProjectSpec) -> str:
    """The Prefect global concurrency limit shared by every run and worker using this PACS."""
    if spec.pacs.chosen == "dimse":
        d = spec.pacs.dimse
        return f"pacs2bids-pacs-{d.ae_title}@{d.host}:{d.port}"
    # limit names may not hold / % & < >
    return "pacs2bids-pacs-" + re.sub(r"[/%&<>]+", "_", spec.pacs.dicomweb.url.split("://", 1)[1])


def ensure_pacs_limit(spec: ProjectSpec) -> str:
    """Create (or update) the PACS's global concurrency limit; returns its name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    name = pacs_limit_name(spec)
    limit = spec.pacs.max_concurrent_studies
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(name)
            if current.limit != limit or not current.active:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True))
    return name


@task(name="retrieve_study", task_run_name="retrieve_study-sub-{study.subject}", **TASK_DEFAULTS)
def retrieve_study(spec: ProjectSpec, study: StudyRef, raw_root: Path) -> list[retrieve.RetrievedSeries]:
    """C-GET, C-MOVE or WADO-RS of one study into the private raw folder; counts checked per series.

    Waits for the PACS's retrieval window, then holds one slot of the PACS's global
    concurrency limit for the whole study; series the chosen transport cannot retrieve whole go
    to the project's fallback transport, if any.
    """
    logger = get_run_logger()

    def progress(series, done: int, total: int | None) -> None:
        number = series.series_number if series.series_number is not None else "?"
        logger.info("sub-%s series %s: %d/%s instances received", study.subject, number, done, total or "?")

    limiter = None
    if spec.pacs.instances_per_minute:
        # at most max_concurrent_studies studies hold a slot at once, across every run: each
        # gets its share, so the PACS never sends more than instances_per_minute in all
        limiter = retrieve.RateLimiter(spec.pacs.instances_per_minute / spec.pacs.max_concurrent_studies)
    wait_until_open(spec.pacs.windows, log=logger.info)
    with concurrency(pacs_limit_name(spec), occupy=1, timeout_seconds=None):
        return retrieve.retrieve_study_with_fallback(spec, study, raw_root, progress=progress, limiter=limiter)
