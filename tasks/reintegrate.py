"""Thin task over :mod:`pacs2bids.reintegrate`: check a researcher's derivative dataset and publish it."""

from pathlib import Path

from prefect import task

from pacs2bids import reintegrate as stage
from pacs2bids.config import ProjectSpec

from . import TASK_DEFAULTS


@task(name="reintegrate", **TASK_DEFAULTS)
def reintegrate(spec: ProjectSpec, folder: Path, producer: stage.Producer, name: str | None,
                run_id: str) -> stage.Reintegrated:
    """:func:`pacs2bids.reintegrate.reintegrate`: refused (and audited) with nothing changed, or a new
    version named ``run_id`` with ``derivatives/<name>/`` (audited)."""
    return stage.reintegrate(spec, folder, producer, name=name, run_id=run_id)
