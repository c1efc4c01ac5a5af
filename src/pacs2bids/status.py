"""``pacs2bids status``: the register of extractions (E4), from local state only.

Per project: the versions published (when, by which run, subjects, series and files), the PACS
they came from (AE title and address, or the DICOMweb URL without credentials), the last run's
state, the last replication, and what is left: inclusion rows with no published series
(pending), series that keep failing (the dead-letter list), quarantined items awaiting review.
It reads the published versions and the work area; it never contacts the PACS. Subjects are
named by their pseudonymised codes and rows by their number, never by an original identifier.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .config import ProjectSpec
from .deadletter import DeadLetters
from .lineage import LINEAGE_DIR, read_lineage
from .publish import MANIFEST, current_version, published_versions
from .released import awaiting_review
from .replicate import read_state

_DONE = ("converted", "skipped", "released")  # a series the version holds (deadletter.DONE)


@dataclass
class VersionInfo:
    version: str
    run_id: str | None
    published: str | None
    subjects: int
    series: int
    files: int
    current: bool


@dataclass
class ProjectStatus:
    project: str
    output: str
    pacs: str
    versions: list[VersionInfo] = field(default_factory=list)
    last_run: dict | None = None  # run_id, state, finished, published, unchanged
    last_replication: dict | None = None
    pending: list[dict] = field(default_factory=list)  # {"row", "subject"}: in the inclusion list, nothing published
    failing: list[dict] = field(default_factory=list)  # dead letters: subject, session, series, stage, attempts
    awaiting_review: int = 0


def pacs_label(spec: ProjectSpec) -> str:
    """The PACS a project reads, without any credential."""
    p = spec.pacs
    if p.dimse is not None:
        return f"DIMSE {p.dimse.ae_title}@{p.dimse.host}:{p.dimse.port}"
    if p.dicomweb is not None:
        u = urlsplit(p.dicomweb.url)
        host = u.hostname or ""
        netloc = f"{host}:{u.port}" if u.port else host
        return "DICOMweb " + urlunsplit((u.scheme, netloc, u.path, "", ""))
    return "none"


def _published_series(version: Path) -> dict[str, set[str]]:
    """Subject -> pseudonymised series UIDs the version publishes (converted, skipped by the heuristic, or
    released from quarantine)."""
    out: dict[str, set[str]] = {}
    if (version / LINEAGE_DIR).is_dir():
        for r in read_lineage(version).to_pylist():
            if r["publish_status"] == "published" and r["pseudo_series_uid"] and r["convert_status"] in _DONE:
                out.setdefault(r["subject"], set()).add(r["pseudo_series_uid"])
    return out


def _version_info(version: Path, current: Path | None) -> VersionInfo:
    try:
        manifest = json.loads((version / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    series = _published_series(version)
    return VersionInfo(
        version=version.name, run_id=manifest.get("run_id"), published=manifest.get("published"),
        subjects=sum(1 for p in version.glob("sub-*") if p.is_dir()),
        series=sum(len(s) for s in series.values()), files=len(manifest.get("files", {})),
        current=current is not None and version.resolve() == current.resolve(),
    )


def _last_run(work: Path) -> dict | None:
    runs = sorted((work / "runs").glob("run-*.json"))
    if not runs:
        return None
    try:
        s = json.loads(runs[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"run_id": runs[-1].stem.removeprefix("run-"), "state": "unreadable"}
    return {k: s.get(k) for k in ("run_id", "state", "started", "finished", "published", "unchanged", "studies")}


def project_status(spec: ProjectSpec) -> ProjectStatus:
    """The status of one loaded project (its secret is needed for the quarantine's signed log)."""
    work = spec.resolved_work_dir
    current = current_version(spec.output)
    st = ProjectStatus(project=spec.project, output=str(spec.output_url or spec.output), pacs=pacs_label(spec))
    st.versions = [_version_info(v, current) for v in published_versions(spec.output)]
    st.last_run = _last_run(work)
    st.last_replication = read_state(spec).get("last")
    done = _published_series(current) if current is not None else {}
    st.pending = [{"row": i.row, "subject": i.subject} for i in spec.inclusions if i.subject not in done]
    st.failing = [{"subject": e.subject, "session": e.session, "series_number": e.series_number, "stage": e.stage,
                   "attempts": e.attempts, "last_error": e.last_error}
                  for e in DeadLetters(work / "dead-letter.json").entries()]
    st.awaiting_review = awaiting_review(spec, work / "quarantine") if (work / "quarantine").is_dir() else 0
    return st


def to_json(statuses: list[ProjectStatus]) -> str:
    return json.dumps([asdict(s) for s in statuses], indent=2)


def format_status(st: ProjectStatus) -> str:
    """A readable block for one project."""
    lines = [f"project {st.project}", f"  from     {st.pacs}", f"  dataset  {st.output}"]
    if st.versions:
        lines.append(f"  {'version':<28} {'published':<26} {'subjects':>8} {'series':>7} {'files':>6}")
        for v in st.versions:
            mark = " (current)" if v.current else ""
            lines.append(f"  {v.version:<28} {v.published or '?':<26} {v.subjects:>8} {v.series:>7} {v.files:>6}{mark}")
    else:
        lines.append("  no version published yet")
    if st.last_run:
        r = st.last_run
        what = "nothing new" if r.get("unchanged") else ("published" if r.get("published") else "nothing published")
        lines.append(f"  last run {r.get('run_id')}: {r.get('state')}, {what}, finished {r.get('finished') or '?'}")
    if st.last_replication:
        r = st.last_replication
        lines.append(f"  last replication {r.get('run_id')}: {r.get('state')}, "
                     f"{r.get('incremental_rows', 0)} rows asked from their watermark")
    lines.append(f"  pending  {len(st.pending)}" + "".join(
        f"\n    inclusion row {p['row']} (sub-{p['subject']}): nothing published" for p in st.pending))
    lines.append(f"  failing  {len(st.failing)}" + "".join(
        f"\n    sub-{f['subject']}" + (f" ses-{f['session']}" if f["session"] else "")
        + (f" series {f['series_number']}" if f["series_number"] is not None else " (study)")
        + f": {f['stage']} failed in {f['attempts']} run(s)" for f in st.failing))
    lines.append(f"  awaiting review  {st.awaiting_review}" + (" (pacs2bids quarantine list)" if st.awaiting_review
                                                              else ""))
    return "\n".join(lines)
