"""Flow ``purge_project``: apply a project's retention (issue 14, :mod:`pacs2bids.purge`).

Lists what expired (versions no longer current older than ``retention.keep_days``; everything,
with the work area, the quarantine and the matching key, after ``retention.project_end``) and,
unless ``dry_run``, deletes it locally and on every storage target and records the purge in the
operations audit log (:mod:`pacs2bids.audit`). Scheduled like replication (deployments/).
"""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from pacs2bids.config import load_spec
from pacs2bids.logsafety import quiet_third_party_loggers
from pacs2bids.purge import format_plan
from pacs2bids.tasks.purge import execute_purge, plan_purge

__all__ = ["purge_project"]


@flow(name="purge_project", log_prints=False)
def purge_project(spec_path: str, dry_run: bool = False) -> dict:
    """Purge one project; returns ``{"text", "deleted", "errors"}`` (places and version ids only)."""
    quiet_third_party_loggers()
    logger = get_run_logger()
    spec = load_spec(spec_path)
    plan = plan_purge(spec)
    if not dry_run:
        plan = execute_purge(spec, plan)
    text = format_plan(plan, dry_run=dry_run)
    logger.info("%s", text)
    return {"text": text, "deleted": [] if dry_run else [f"{i.where}:{i.what}" for i in plan.items if not i.error],
            "errors": [f"{i.where} {i.what}: {i.error}" for i in plan.items if i.error]}
