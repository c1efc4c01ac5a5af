"""The register of extractions done (E4): which studies a published dataset already holds whole.

A study whose every series was already published whole, by the same heuristic, is not retrieved
again. The pseudonymised UIDs are recomputed from the query with the project key and compared
with the published dataset's lineage (:mod:`pacs2bids.lineage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ProjectSpec
from .deid.keyed import Keyed
from .heuristic_path import heuristic_sha256
from .lineage import LINEAGE_DIR, read_lineage
from .model import StudyRef


@dataclass
class Unpublished:
    """The studies still to extract, and what the register let go: series and their subjects."""

    studies: list[StudyRef]
    already_published: int = 0
    subjects: set[str] = field(default_factory=set)


def published_series(spec: ProjectSpec) -> dict[str, int]:
    """Pseudonymised SeriesInstanceUID -> instances received, of every series the dataset at
    ``spec.output`` published whole (converted or skipped) with the spec's current heuristic."""
    if not (spec.output / LINEAGE_DIR).is_dir():
        return {}
    current = heuristic_sha256(spec.heuristic, spec.sidecar_fields)
    return {
        r["pseudo_series_uid"]: r["instances_received"]
        for r in read_lineage(spec.output).to_pylist()
        if r["publish_status"] == "published" and r["convert_status"] in ("converted", "skipped")
        and r["heuristic_sha256"] == current
    }


def skip_already_published(spec: ProjectSpec, studies: list[StudyRef]) -> Unpublished:
    """The studies of which some series is not yet published whole; the others are counted."""
    done = published_series(spec)
    if not done:
        return Unpublished(studies)
    keyed = Keyed(spec.secret_bytes, spec.project)
    out = Unpublished([])
    for study in studies:
        # per study, not per series: a session is converted whole, so that run numbers and
        # scans.tsv stay consistent when only part of it was published before
        published = [
            s for s in study.series
            if (n := done.get(keyed.uid(s.series_instance_uid))) is not None
            and (s.announced_instances is None or n >= s.announced_instances)
        ]
        if study.series and len(published) == len(study.series):
            out.already_published += len(published)
            out.subjects.add(study.subject)
        else:
            out.studies.append(study)
    return out
