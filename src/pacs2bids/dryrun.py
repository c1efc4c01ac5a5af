"""``pacs2bids deid --dry-run``: what pseudonymisation would change, before any extraction.

Queries the PACS, retrieves a few studies into a private temporary folder (removed afterwards),
and prints, for the first instance of each series, every attribute the profile would change and
why. Original values are masked; nothing is written to ``output``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

from .config import ProjectSpec
from .deid import Pseudonymiser
from .dicomfiles import iter_dicom_files
from .query import find_studies
from .retrieve import retrieve_study


def dry_run_project(spec: ProjectSpec, *, sample: int = 3) -> str:
    """Text report of the changes on ``sample`` studies of the project (first instance per series)."""
    found = find_studies(spec)
    studies = found.studies[:sample]
    lines = [
        f"pacs2bids deid --dry-run, project {spec.project}: {len(studies)} of {len(found.studies)} studies sampled",
    ]
    p = Pseudonymiser(
        project=spec.project, secret=spec.secret_bytes, settings=spec.pseudonymization,
        key_store=spec.resolved_key_store,
    )
    tmp = tempfile.mkdtemp(prefix="pacs2bids-dryrun-", dir=_private_parent(spec))
    try:
        for study in studies:
            retrieved = retrieve_study(spec, study, Path(tmp))
            for rs in retrieved:
                first = next(iter(iter_dicom_files(rs.folder)), None)
                if first is None:
                    continue
                changes = p.dry_run([first], subject=study.subject)
                number = rs.series.series_number if rs.series.series_number is not None else "?"
                actions = Counter(c["action"] for c in changes)
                lines.append(
                    f"\nsub-{study.subject} series {number}: "
                    + ", ".join(f"{n} {a}" for a, n in sorted(actions.items()))
                )
                for c in changes:
                    before = f" {c['before']} ->" if c.get("before") else ""
                    after = f" {c['after']}" if c.get("after") else ""
                    lines.append(f"  {c['attribute']}: {c['action']}{before}{after}  ({c['why']})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "\n".join(lines)


def _private_parent(spec: ProjectSpec) -> str:
    work = spec.resolved_work_dir
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o700)
    return str(work)
