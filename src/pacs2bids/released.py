"""Files a reviewer released from quarantine (:mod:`pacs2bids.quarantine`), brought into a run.

They are pseudonymised per series into the staging ``sourcedata/``, pixels as reviewed, and
published as DICOM, not converted. Only releases signed with the project key count; when the
chain of decisions is broken, none is included and the summary says where.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import ProjectSpec
from .deid.keyed import Keyed, audit_mac_key
from .lineage import instance_records, write_instance_part
from .quarantine import DECISIONS, Quarantine, QuarantineError
from .recorder import Outcomes, Recorder, reason
from .run import META, RunContext, label, session_dir
from .study import pseudonymiser, write_json

log = logging.getLogger(__name__)


@dataclass
class ReleasedResult:
    """What the step did (plain values): its outcomes, the item ids included, its lineage part."""

    outcomes: Outcomes = field(default_factory=Outcomes)
    included: list[str] = field(default_factory=list)
    instances_part: str | None = None


def project_quarantine(spec: ProjectSpec, folder: Path) -> Quarantine:
    """The quarantine with the project's log key: only decisions signed with it count."""
    return Quarantine(folder, key=audit_mac_key(spec.secret_bytes, spec.project))


def awaiting_review(spec: ProjectSpec, folder: Path) -> int:
    """Quarantined items (this run's or earlier) no one has decided on yet."""
    return sum(1 for i in project_quarantine(spec, folder).items() if i.state == "pending")


def mark_published(spec: ProjectSpec, folder: Path, item_ids: list[str], run_id: str) -> None:
    """Record in the quarantine's log that the released items were published by ``run_id``."""
    q = project_quarantine(spec, folder)
    for item_id in item_ids:
        q.mark_published(item_id, run_id=run_id)


def include_released(spec: ProjectSpec, ctx: RunContext, *, log=log) -> ReleasedResult:
    """Pseudonymise the released files into ``ctx.staging``; returns what was included and why not."""
    result = ReleasedResult()
    rec = Recorder(outcomes=result.outcomes)
    q = project_quarantine(spec, ctx.quarantine)
    for problem in q.problems():  # a decision that does not count is reported, never skipped silently
        rec.release_status(f"quarantine/{DECISIONS}", f"not included: {problem}")
        log.warning("%s", problem)
    if q.verification().broken is not None:
        return result
    groups: dict[tuple, list] = {}
    for item in q.released():
        try:
            path = q.check_released(item)
        except QuarantineError as exc:
            rec.release_status(f"{label(item.subject, item.session)}/{item.id}", f"not included: {exc}")
            log.warning("%s", exc)
            continue
        groups.setdefault((item.subject, item.session, item.series_folder), []).append((item, path))
    instances = []
    for (subject, session, folder), items in groups.items():
        instances += _include_series(spec, ctx, subject, session, folder, items, rec, result, log)
    result.instances_part = write_instance_part(ctx.staging, "released", instances)
    return result


def _include_series(spec: ProjectSpec, ctx: RunContext, subject: str, session: str | None, folder: str,
                    items: list, rec: Recorder, result: ReleasedResult, log) -> list:
    """One series' released files, whole or not at all; returns their instance records."""
    lbl = label(subject, session)
    out_dir = session_dir(ctx.staging / "sourcedata", subject, session) / folder
    try:
        # a released file that fails again stays where it is: its copy goes to scratch, not back into quarantine
        res = pseudonymiser(spec).pseudonymise_series(
            [p for _, p in items], out_dir, subject=subject, session=session,
            quarantine_dir=ctx.scratch / "requarantine", pixels_reviewed=True)
    except Exception as exc:
        for item, _ in items:
            rec.release_status(f"{lbl}/{item.id}", f"failed: {reason(exc)}")
        return []
    write_json(ctx.staging / META / "deid" / lbl / f"released-{res.pseudo_series_uid[-12:]}-{items[0][0].id[:8]}.json",
               res.record)
    ok = len(res.written) == len(items) and not res.quarantined
    for item, _ in items:
        status = "included in this run" if ok else "failed: " + "; ".join(r for _, r in res.quarantined + res.dropped)
        rec.release_status(f"{lbl}/{item.id}", status)
    if not ok:  # a series is released whole or not at all
        for f in res.written:
            f.unlink(missing_ok=True)
        return []
    result.included += [item.id for item, _ in items]
    rec.released_included(subject, session, res, res.written, ctx.staging)
    log.info("%s: %d file(s) released from quarantine included", lbl, len(items))
    # per-instance lineage as for any published file: the received checksum is the one taken
    # when the file entered quarantine (the transport is not recorded there)
    return instance_records(
        ctx.staging, res.written, res.sources, {item.id: {"sha256": item.sha256} for item, _ in items},
        subject=subject, session=session, pseudo_study_uid=res.pseudo_study_uid,
        pseudo_series_uid=res.pseudo_series_uid, received_digest=Keyed(spec.secret_bytes, spec.project).received_digest,
    )
