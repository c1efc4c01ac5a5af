from pathlib import Path

from prefect import task

from pacs2bids.config import ProjectSpec
from pacs2bids.deid import LeakHit, scan_for_leaks as _scan
from pacs2bids.deid.leakrules import build_rules
from pacs2bids.study import pseudonymiser

from . import TASK_DEFAULTS


@task(name="scan_for_leaks", **TASK_DEFAULTS)
def scan_for_leaks(spec: ProjectSpec, root: Path) -> list[LeakHit]:
    """Search every byte under ``root`` for the project's identifying values (from the key store).
    Unless the profile keeps full dates, every date element was shifted or emptied: not searched."""
    p = pseudonymiser(spec)
    rules = build_rules(p.identifiers())  # the key store's values, one per original UID: let go once in the rules
    return _scan(root, rules, dates_shifted=not p.profile.keep_dates)
