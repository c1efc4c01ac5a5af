"""Run bookkeeping that needs no engine: the run's context, sessions, folder names, the run summary.

The summary holds pseudonymised identifiers only (subject codes, series numbers, cleaned
descriptions, pseudonymised UIDs) and inclusion row numbers, never patient IDs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .model import StudyRef

if TYPE_CHECKING:
    from .config import ProjectSpec

META = Path(".pacs2bids")  # the dataset's own folder: logs, runs, lineage, provenance, deid records


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares: the spec, the run's ids, its folders and tool versions.

    The folders are under the project's private work folder: ``raw`` (the retrieved files, one
    keyed folder per study), ``quarantine``, this run's ``scratch`` and ``staging`` (the dataset
    being built, published at the end)."""

    spec: "ProjectSpec"
    run_id: str
    flow_run_id: str | None
    staging: Path
    versions: dict[str, str] = field(default_factory=dict)
    started: str = field(default_factory=_now)

    @staticmethod
    def new_run_id(flow_run_id: str | None) -> str:
        return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{(flow_run_id or uuid.uuid4().hex)[:8]}"

    @property
    def work(self) -> Path:
        return self.spec.resolved_work_dir

    @property
    def raw_root(self) -> Path:
        return self.work / "raw"

    @property
    def quarantine(self) -> Path:
        return self.work / "quarantine"

    @property
    def scratch(self) -> Path:
        return self.work / f"scratch-{self.run_id}"

    @property
    def summary_path(self) -> Path:
        return self.work / "runs" / f"run-{self.run_id}.json"


def assign_sessions(studies: list[StudyRef]) -> list[StudyRef]:
    """Give each study its BIDS session.

    The inclusion list's session wins. A subject with several studies and no session given
    gets ``ses-01``, ``ses-02``... in study-date order (heudiconv refuses several studies of
    one subject without sessions). A subject with one study and no session has no session level.
    """
    by_subject: dict[str, list[StudyRef]] = defaultdict(list)
    for s in studies:
        by_subject[s.subject].append(s)
    for subject, group in by_subject.items():
        unlabelled = [s for s in group if not s.session]
        if len(group) > 1 and unlabelled:
            taken = {s.session for s in group if s.session}
            n = 1
            for s in sorted(unlabelled, key=lambda s: (s.study_date or "", s.study_instance_uid)):
                while f"{n:02d}" in taken:
                    n += 1
                s.session = f"{n:02d}"
                taken.add(s.session)
    return studies


def session_dir(root: Path, subject: str, session: str | None) -> Path:
    p = root / f"sub-{subject}"
    return p / f"ses-{session}" if session else p


def label(subject: str, session: str | None) -> str:
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


TIMELINE_ENV = "PACS2BIDS_TIMELINE"  # "1": the run summary holds each study's timeline (issue 12)
_SPANS = {"retrieve": ("retrieve_started", "retrieve_ended"),  # series are pseudonymised as they arrive: the
          "pseudonymise": ("retrieve_ended", "pseudonymise_ended"),  # span is what remains after retrieval
          "convert": ("pseudonymise_ended", "convert_ended")}


def study_timeline(studies: list, results: list, submitted: list[int], t0: float) -> list[dict]:
    """Each study, in the order it was submitted: its pseudonymised label, announced instances and
    each stage's ``[start, end]`` in seconds after ``t0`` (epoch seconds; ``None`` where a stage did
    not run). Labels and counts only: nothing identifying."""
    rows = []
    for i in submitted:
        clock = results[i].clock
        row = {"study": results[i].label, "instances": sum(s.announced_instances or 0 for s in studies[i].series)}
        for stage, (a, b) in _SPANS.items():
            row[stage] = [round(clock[a] - t0, 2), round(clock[b] - t0, 2)] if a in clock and b in clock else None
        rows.append(row)
    return rows


@dataclass
class SeriesLine:
    subject: str
    session: str | None
    series_number: int | None
    description: str
    status: str  # converted | skipped | incomplete | failed | quarantined
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    pseudo_series_uid: str = ""


@dataclass
class RunSummary:
    project: str
    run_id: str
    output: str
    started: str = field(default_factory=_now)
    finished: str = ""
    state: str = "running"  # completed | completed with failures | failed
    subjects: set[str] = field(default_factory=set)
    studies: int = 0
    already_published: int = 0
    series: list[SeriesLine] = field(default_factory=list)
    unmatched: list[dict] = field(default_factory=list)  # {"row": n, "subject": code}
    # a selection filter that could not be applied to a matched study, which was included anyway
    # (query.UnappliedFilter: {"row", "subject", "filter", "reason"}): a StudyDate that is not a date
    unapplied_filters: list[dict] = field(default_factory=list)
    study_failures: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)
    released: list[dict] = field(default_factory=list)  # quarantined earlier, released by a reviewer, published now
    derivatives: list[dict] = field(default_factory=list)  # per image: defaced, or failed with the reason (issue 15)
    awaiting_review: int = 0  # quarantined items (this run's or earlier) no one has decided on yet
    dead_letter: list[dict] = field(default_factory=list)  # what keeps failing, run after run (deadletter.py)
    validator_warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    published: bool = False
    unchanged: bool = False  # nothing new since the last run: the published dataset was left as it is
    targets: list[dict] = field(default_factory=list)  # one TargetReport per secondary target (pacs2bids.targets)
    # seconds per stage (retrieve, pseudonymise, convert: summed over studies), for the benchmarks
    stage_seconds: dict[str, float] = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)  # opt-in (TIMELINE_ENV): see study_timeline

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time spent inside to ``stage_seconds[stage]``."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.add_seconds({stage: time.monotonic() - started})

    def add_seconds(self, seconds: dict[str, float]) -> None:
        for stage, s in seconds.items():
            self.stage_seconds[stage] = round(self.stage_seconds.get(stage, 0.0) + s, 3)

    def count(self, status: str) -> int:
        return sum(1 for s in self.series if s.status == status)

    @property
    def retrieved(self) -> int:
        return sum(1 for s in self.series if s.status in ("converted", "skipped"))

    def finish(self) -> None:
        self.finished = _now()
        if self.errors:
            self.state = "failed"
        elif self.study_failures or any(s.status in ("incomplete", "failed") for s in self.series) or self.quarantined:
            self.state = "completed with failures"
        elif any(r["status"] != "included in this run" for r in self.released):  # a release refused or failed
            self.state = "completed with failures"
        elif any(d["status"] == "failed" for d in self.derivatives):  # an image that could not be defaced
            self.state = "completed with failures"
        else:
            self.state = "completed"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.timeline:
            del d["timeline"]
        d["subjects"] = sorted(self.subjects)
        d["counts"] = {
            "subjects": len(self.subjects),
            "studies": self.studies,
            "series_retrieved": self.retrieved,
            "series_converted": self.count("converted"),
            "series_skipped": self.count("skipped"),
            "series_incomplete": self.count("incomplete"),
            "series_failed": self.count("failed"),
            "series_already_published": self.already_published,
            "inclusions_unmatched": len(self.unmatched),
            "filters_unapplied": len(self.unapplied_filters),
            "files_quarantined": len(self.quarantined),
            "files_released": len(self.released),
            "files_awaiting_review": self.awaiting_review,
            "dead_letter": len(self.dead_letter),
            "images_defaced": sum(1 for d in self.derivatives if d["status"] == "defaced"),
            "images_not_defaced": sum(1 for d in self.derivatives if d["status"] == "failed"),
        }
        return d

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    def format(self) -> str:
        c = self.to_dict()["counts"]
        lines = [
            f"pacs2bids run {self.run_id} of project {self.project}: {self.state}",
            f"  subjects {c['subjects']}, studies {c['studies']}",
            f"  series: {c['series_retrieved']} retrieved, {c['series_converted']} converted, "
            f"{c['series_skipped']} skipped, {c['series_incomplete']} incomplete, {c['series_failed']} failed"
            + (f", {self.already_published} already published" if self.already_published else ""),
        ]
        if self.published:
            lines.append(f"  dataset: {self.output}")
        elif self.unchanged:
            lines.append(f"  dataset: {self.output} (nothing new since the last run: left as published)")
        else:
            lines.append(f"  dataset: not published ({self.output} unchanged)")
        for u in self.unmatched:
            lines.append(f"  inclusion row {u['row']} (sub-{u['subject']}): no study matched")
        for u in self.unapplied_filters:
            lines.append(f"  inclusion row {u['row']} (sub-{u['subject']}): {u['filter']} filter not applied to one "
                         f"study, included: {u['reason']}")
        for f in self.study_failures:
            lines.append(f"  study of {f['label']} failed: {f['reason']}")
        for s in self.series:
            if s.status != "converted":
                lines.append(
                    f"  {label(s.subject, s.session)} series {s.series_number if s.series_number is not None else '?'}"
                    f" '{s.description}': {s.status}" + (f" ({s.reason})" if s.reason else "")
                )
        for q in self.quarantined:
            lines.append(f"  quarantined: {q['file']} ({q['reason']})")
        for r in self.released:
            lines.append(f"  released from quarantine: {r['file']} ({r['status']})")
        for d in self.derivatives:
            if d["status"] == "failed":
                lines.append(f"  {d['derivative']}: {d['source']} failed, not published as defaced ({d['reason']})")
        if self.dead_letter:
            lines.append(f"  dead-letter list: {len(self.dead_letter)} item(s) keep failing "
                         "(pacs2bids dead-letter SPEC shows them with their last error)")
        if self.awaiting_review:
            lines.append(f"  {self.awaiting_review} quarantined file(s) await review: pacs2bids quarantine list SPEC")
        if self.validator_warnings:
            lines.append(f"  validator warnings ({len(self.validator_warnings)}):")
            lines += [f"    - {w}" for w in self.validator_warnings[:20]]
        for t in self.targets:
            lines.append(f"  target {t['target']}: {t['state']}, {t['sent_files']} file(s) sent ({t['sent_bytes']} "
                         f"bytes), {t['copied_files']} copied on the server, {t['skipped_files']} already there"
                         + (f": {t['error']}" if t.get("error") else ""))
        for e in self.errors:
            lines.append(f"  error: {e}")
        return "\n".join(lines)
