from pathlib import Path

from prefect import task

from pacs2bids.config import ProjectSpec
from pacs2bids.deid import LeakHit, Pseudonymiser, scan_for_leaks as _scan

from . import TASK_DEFAULTS


@task(name="scan_for_leaks", **TASK_DEFAULTS)
def scan_for_leaks(spec: ProjectSpec, root: Path) -> list[LeakHit]:
    """Search every byte under ``root`` for the project's identifying values (from the key store)."""
    p = Pseudonymiser(
        project=spec.project, secret=spec.secret_bytes, settings=spec.pseudonymization, key_store=spec.resolved_key_store
    )
    return _scan(root, p.identifiers())
