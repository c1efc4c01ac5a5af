"""``pacs2bids plan SPEC``: what each matched series would become, before anything is published.

Queries the PACS, retrieves the matched studies into the project's private work folder (kept:
the next run resumes from it, as retrieval does), runs ``dcm2niix -b o`` (sidecars only, no
image) on each session in a private scratch folder that is removed afterwards, names the
outputs with :func:`pacs2bids.convert.classify.classify_session`, and reports per subject, session and
series: the series number, then the BIDS path or the reason it is left out. Writes nothing to
``output``. Original identifiers (UIDs, patient IDs and names, series descriptions) are never
printed; subjects and sessions are the project's labels.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pacs2bids.config import ProjectSpec
from pacs2bids.convert import dcm2niix_session, judge_session
from pacs2bids.query import find_studies
from pacs2bids.retrieve import retrieve_study
from pacs2bids.run import assign_sessions, label

log = logging.getLogger(__name__)


@dataclass
class PlannedSeries:
    series_number: int | None
    paths: list[str] = field(default_factory=list)  # BIDS paths without extension
    reason: str = ""  # why left out, or a note


@dataclass
class PlannedSession:
    subject: str
    session: str | None
    series: list[PlannedSeries] = field(default_factory=list)
    failure: str = ""


@dataclass
class Plan:
    sessions: list[PlannedSession] = field(default_factory=list)
    unmatched_rows: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for s in self.sessions:
            out.append(label(s.subject, s.session))
            if s.failure:
                out.append(f"  not planned: {s.failure}")
            for p in s.series:
                num = "?" if p.series_number is None else str(p.series_number)
                if p.paths:
                    for path in p.paths:
                        out.append(f"  series {num}: {path}" + (f"  ({p.reason})" if p.reason else ""))
                else:
                    out.append(f"  series {num}: left out: {p.reason}")
        for row in self.unmatched_rows:
            out.append(f"inclusion row {row}: no study matched")
        return out


def plan_session(series_folders: list[Path], subject: str, session: str | None, scratch: Path,
                 sidecar_fields: dict | None = None) -> PlannedSession:
    """Plan one session from its retrieved series folders (one folder per series); ``sidecar_fields``
    as the spec gives them to the conversion."""
    from pacs2bids.convert.classify import classify_session

    planned = PlannedSession(subject, session)
    if not series_folders:
        return planned
    private = Path(tempfile.mkdtemp(prefix="plan-", dir=scratch))
    try:
        run = dcm2niix_session(series_folders, private / "run", sidecar_only=True)
        decisions = classify_session(run.outputs) if run.outputs else []
        verdicts = judge_session(run, decisions, subject, session, sidecar_fields)
        kept = {v.series.uid: [d.relpath(subject, session) for d in v.kept] for v in verdicts}
        for v in verdicts:
            if v.stacked_with is not None:
                paths, note = kept[v.stacked_with.uid], f"stacked by dcm2niix with series {v.stacked_with.number}"
            else:
                paths, note = kept[v.series.uid], ""
            planned.series.append(PlannedSeries(v.series.number, paths, note if paths else v.reason))
        planned.series += [PlannedSeries(f.series_number, [], f.reason) for f in run.skipped]
        planned.series.sort(key=lambda p: (p.series_number is None, p.series_number or 0))
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return planned


def plan_project(spec: ProjectSpec) -> Plan:
    """Query, retrieve (into the work folder, kept) and plan every matched session of ``spec``.

    Raises :class:`~pacs2bids.errors.PacsError` when the PACS cannot be queried. A study whose
    retrieval fails is listed with its reason; the others are planned.
    """
    work = spec.resolved_work_dir
    raw_root, scratch = work / "raw", work / "plan-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    found = find_studies(spec)
    plan = Plan(unmatched_rows=[i.row for i in found.unmatched])
    try:
        for study in assign_sessions(found.studies):
            try:
                retrieved = retrieve_study(spec, study, raw_root)
            except Exception as exc:  # one study's failure never stops the others
                plan.sessions.append(PlannedSession(study.subject, study.session,
                                                    failure=f"retrieval failed: {type(exc).__name__}"))
                continue
            folders = [rs.folder for rs in retrieved if rs.status == "complete"]
            planned = plan_session(folders, study.subject, study.session, scratch, spec.sidecar_fields)
            planned.series += [PlannedSeries(rs.series.series_number, [], f"not retrieved: {rs.status}")
                               for rs in retrieved if rs.status != "complete"]
            plan.sessions.append(planned)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return plan
