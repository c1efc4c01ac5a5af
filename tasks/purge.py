"""Thin tasks over :mod:`pacs2bids.purge`: list what the retention says must go, and delete it."""

from prefect import task
from prefect.logging import get_run_logger

from pacs2bids import purge
from pacs2bids.config import ProjectSpec

from . import TASK_DEFAULTS


@task(name="plan_purge", **TASK_DEFAULTS)
def plan_purge(spec: ProjectSpec) -> purge.PurgePlan:
    """Every expired version (locally and on each target), and at the project's end its private data."""
    return purge.plan_purge(spec)


@task(name="execute_purge", **TASK_DEFAULTS)
def execute_purge(spec: ProjectSpec, plan: purge.PurgePlan) -> purge.PurgePlan:
    """Delete what ``plan`` lists and record the purge in the audit log."""
    return purge.execute(spec, plan, logger=get_run_logger())
