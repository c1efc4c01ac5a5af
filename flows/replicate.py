"""Flow ``replicate_project``: bring a published project up to date (issue 14).

It runs ``extract_project``'s stages in its own flow run (the same function, not a copy), with
the query bounded by the project's watermark (:mod:`pacs2bids.replicate`): each inclusion row
already replicated is asked only for the studies dated from its watermark less ``late_days``
on; the register skips every study the dataset holds whole, so only new studies and studies
with new series (late arrivals) are retrieved. With nothing new it publishes no version
(``summary["unchanged"]``). Then the watermark advances for the rows with nothing failed.

Side effects: those of ``extract_project``, and ``replication.json`` in the work area.
"""

from __future__ import annotations

from datetime import date

from prefect import flow
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from pacs2bids.config import load_spec
from pacs2bids.errors import RunFailed
from pacs2bids.flows.extract import extract_project
from pacs2bids.launch import flow_run_name
from pacs2bids.replicate import query_since, record_replication

__all__ = ["replicate_project"]


@flow(name="replicate_project", flow_run_name=flow_run_name, task_runner=ThreadPoolTaskRunner(max_workers=4),
      log_prints=False)
def replicate_project(spec_path: str, late_days: int | None = None) -> dict:
    """Replicate what is new since the last replication; returns the run summary, with a
    ``replication`` entry (rows asked incrementally, rows whose watermark advanced).

    ``late_days`` overrides the spec's ``replication.late_days``. Raises :class:`RunFailed` as
    ``extract_project`` does; the watermark then stays where it was.
    """
    logger = get_run_logger()
    spec = load_spec(spec_path)
    started = date.today()  # the local day this run starts: the rows' next watermark
    since = query_since(spec, late_days)
    logger.info("replication: %d of %d inclusion rows asked from their watermark on, the others for everything",
                len(since), len(spec.inclusions))
    try:
        summary = extract_project.fn(spec_path, since=since)
    except RunFailed as exc:
        record_replication(spec, exc.summary, started, since)
        raise
    advanced = record_replication(spec, summary, started, since)
    summary["replication"] = {"incremental_rows": len(since), "rows_advanced": advanced}
    return summary
