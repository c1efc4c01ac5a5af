"""Incremental replication (issue 14): the project's watermark, and the query window it gives.

A replication asks the PACS, for each inclusion row, only for the studies dated from
``watermark - late_days`` on, where the watermark is the local day on which the last successful
replication of that row started. This day, not the StudyDate of the newest study seen, because
C-FIND can select by StudyDate only, and a study reaches the PACS after it is acquired: one
acquired before the last run but stored after it is caught while it is at most ``late_days``
older than that run (``replication.late_days`` in the spec, default 7). Older late arrivals, and
studies whose StudyDate is not a valid date, are caught by a full extraction
(``extract_project``, ``pacs2bids run``), which asks for everything.

The rows with a watermark are asked together: one study search of the PACS by StudyDate from
the earliest of their days on, matched to each row here by PatientID or AccessionNumber
(:func:`pacs2bids.query.find_studies`); only the rows with a study in their window are then asked
on their own. When the PACS cuts that answer short (its result limit) or warns, each row is asked.

Within that window, the register (:mod:`pacs2bids.register`) skips every study the published
dataset holds whole: a study to which a series was added since is extracted again; one that
holds nothing new is not retrieved. When nothing is new, no version is published.

The watermark of a row advances only when the run completed and no study or series of the row's
subject failed (those are asked for again, from the old watermark on, until they succeed). A row
never replicated (a new inclusion, or a changed selection) is asked for everything.

The state is ``replication.json`` in the project's work area: one entry per row, keyed by
HMAC-SHA256 of the row's identifier and the selection under a key derived from the project
secret (no original identifier is stored); and the last replication's outcome, for
``pacs2bids status``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import date, timedelta
from pathlib import Path

from .config import Inclusion, ProjectSpec
from .deid.keyed import derive_key

STATE_FILE = "replication.json"
_FAILED = ("failed", "incomplete")


def state_path(spec: ProjectSpec) -> Path:
    return spec.resolved_work_dir / STATE_FILE


def read_state(spec: ProjectSpec) -> dict:
    """The replication state (``{"rows": {key: day}, "last": {...}}``); empty when never replicated."""
    path = state_path(spec)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"rows": {}}
    except (OSError, ValueError) as exc:
        raise OSError(f"replication state {path} cannot be read ({exc}); delete it to replicate everything again"
                      ) from None
    data.setdefault("rows", {})
    return data


def _write_state(spec: ProjectSpec, data: dict) -> None:
    path = state_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def row_key(spec: ProjectSpec, inc: Inclusion) -> str:
    """The keyed name of an inclusion row's watermark: its identifier and the selection, under the
    project key (another selection asks for everything again)."""
    key = derive_key(spec.secret_bytes, spec.project, "replication-watermark")
    ident = f"PatientID={inc.patient_id}" if inc.patient_id else f"AccessionNumber={inc.accession_number}"
    selection = spec.selection.model_dump_json()
    return hmac.new(key, f"{ident}\n{selection}".encode(), hashlib.sha256).hexdigest()


def query_since(spec: ProjectSpec, late_days: int | None = None) -> dict[int, str]:
    """Inclusion row -> ISO day from which that row's studies are asked for; rows never replicated
    are absent (asked for everything)."""
    late = spec.replication.late_days if late_days is None else late_days
    rows = read_state(spec)["rows"]
    out: dict[int, str] = {}
    for inc in spec.inclusions:
        day = rows.get(row_key(spec, inc))
        if day:
            out[inc.row] = (date.fromisoformat(day) - timedelta(days=late)).isoformat()
    return out


def failed_subjects(summary: dict) -> set[str]:
    """The subjects a run summary lists with a failed study or a failed or incomplete series."""
    out = {s["subject"] for s in summary.get("series", []) if s.get("status") in _FAILED}
    out |= {f["label"].split("_")[0].removeprefix("sub-") for f in summary.get("study_failures", [])}
    return out


def record_replication(spec: ProjectSpec, summary: dict, started: date, since: dict[int, str]) -> int:
    """After a replication: advance the watermark of each row whose subject has nothing failed
    (only when the run completed), and keep the run's outcome. Returns the rows advanced."""
    state = read_state(spec)
    advanced = 0
    if summary.get("state") in ("completed", "completed with failures"):
        failed = failed_subjects(summary)
        for inc in spec.inclusions:
            if inc.subject not in failed:
                state["rows"][row_key(spec, inc)] = started.isoformat()
                advanced += 1
    state["last"] = {
        "run_id": summary.get("run_id"), "state": summary.get("state"), "started": summary.get("started"),
        "finished": summary.get("finished"), "incremental_rows": len(since), "rows_advanced": advanced,
        "studies": summary.get("studies", 0), "unchanged": bool(summary.get("unchanged")),
    }
    _write_state(spec, state)
    return advanced
