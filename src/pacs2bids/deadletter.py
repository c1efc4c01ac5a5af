"""The dead-letter list: series and studies that keep failing, with their last error (E1).

A run retries what may succeed later (``spec.retries``); what still fails is not silently
forgotten: it is listed here, run after run, until a run gets it through. Every run retries the
listed items (they are not published, so the register of extractions does not skip them), and
``attempts`` counts the runs that failed on them, so an administrator sees what needs a person
(a series offline on near-line storage, a PACS that refuses a SOP class...).

The list lives in the private work folder (``<work>/dead-letter.json``): it holds pseudonymised
identifiers only (subject and session codes, pseudonymised UIDs, series numbers) and the error
texts, which never carry header values. Writes replace the file atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from .lineage import LineageRecord

FAILED = ("failed", "incomplete")
DONE = ("converted", "skipped", "released")


@dataclass
class DeadLetter:
    key: str  # the pseudonymised series UID, or "study:" + the pseudonymised study UID
    subject: str
    session: str | None
    series_number: int | None
    stage: str  # retrieve | pseudonymise | convert
    last_error: str
    attempts: int
    first_failed: str
    last_failed: str
    last_run: str


def _key(r: LineageRecord) -> str | None:
    if r.pseudo_series_uid:
        return r.pseudo_series_uid
    if r.pseudo_study_uid:
        return f"study:{r.pseudo_study_uid}"
    return None


def _failed_stage(r: LineageRecord) -> str | None:
    for stage in ("retrieve", "pseudonymise", "convert"):
        if getattr(r, f"{stage}_status") in FAILED:
            return stage
    return None


class DeadLetters:
    """The dead-letter list of one project, in ``path`` (a JSON file)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def entries(self) -> list[DeadLetter]:
        if not self.path.exists():
            return []
        return [DeadLetter(**e) for e in json.loads(self.path.read_text(encoding="utf-8"))["entries"]]

    def fold(self, records: Iterable[LineageRecord], *, run_id: str) -> list[DeadLetter]:
        """The list once this run's records are folded in (nothing is written: :meth:`save`
        it once the run is published). What failed is added, or its attempts counted; what
        got through leaves the list (a study leaves it when any of its series got through)."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        current = {e.key: e for e in self.entries()}
        failed: dict[str, tuple[LineageRecord, str]] = {}
        done: set[str] = set()
        for r in records:
            key, stage = _key(r), _failed_stage(r)
            if key is None:
                continue
            if stage is not None:
                failed.setdefault(key, (r, stage))
            elif r.convert_status in DONE:
                done.add(key)
                if r.pseudo_study_uid:
                    done.add(f"study:{r.pseudo_study_uid}")
        for key in done - failed.keys():
            current.pop(key, None)
        for key, (r, stage) in failed.items():
            before = current.get(key)
            current[key] = DeadLetter(
                key=key, subject=r.subject, session=r.session, series_number=r.series_number, stage=stage,
                last_error=r.reason or "", attempts=(before.attempts if before else 0) + 1,
                first_failed=before.first_failed if before else now, last_failed=now, last_run=run_id,
            )
        return sorted(current.values(), key=lambda e: (e.subject, e.session or "", e.series_number or 0, e.key))

    def save(self, entries: list[DeadLetter]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"entries": [asdict(e) for e in entries]}, indent=2), encoding="utf-8")
        os.replace(tmp, self.path)


def format_entries(entries: list[DeadLetter]) -> str:
    if not entries:
        return "the dead-letter list is empty"
    lines = []
    for e in entries:
        where = f"sub-{e.subject}" + (f"_ses-{e.session}" if e.session else "")
        what = f"series {e.series_number}" if not e.key.startswith("study:") else "whole study"
        lines.append(f"{where} {what}: {e.stage} failed in {e.attempts} run(s), last {e.last_failed} ({e.last_run})")
        lines.append(f"    last error: {e.last_error}")
    return "\n".join(lines)
