"""Flow ``extract_project``: one research project from the PACS to a published BIDS dataset.

Read it top-down to follow a series: query → retrieve (private raw folder) → pseudonymise
(staging ``sourcedata/``) → convert (heudiconv + dcm2niix) → provenance → validate →
lineage (per output file, and per instance with its received file's keyed checksum) → leak
scan (the last gate, lineage tables and run summary included) → publish (atomic rename into
``output``).
Files a reviewer released from quarantine since the last run join the staging ``sourcedata/``
before the checks.

Side effects: writes the private work folder beside ``output`` (raw files, quarantine,
staging), the encrypted matching key, and, when the run succeeds, the dataset in ``output``.
Nothing is written to ``output`` if the PACS cannot be reached, a leak is found, or the
validator reports errors.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, runtime
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from pacs2bids import __version__
from pacs2bids.config import ProjectSpec, load_spec
from pacs2bids.deadletter import DeadLetters
from pacs2bids.deid.keyed import Keyed
from pacs2bids.pacs import close_pools
from pacs2bids.errors import LeakDetected, Pacs2BidsError, PacsError, ValidationFailed
from pacs2bids.heuristic_path import heuristic_sha256
from pacs2bids.lineage import InstanceRecord, LineageRecord, instance_records
from pacs2bids.logsafety import quiet_third_party_loggers
from pacs2bids.model import StudyRef
from pacs2bids.provenance import write_series_provenance
from pacs2bids.publish import RunLock, seed_staging, staging_dir, write_marker
from pacs2bids.quarantine import Quarantine, QuarantineError
from pacs2bids.retrieve import read_ledger
from pacs2bids.run import RunSummary, SeriesLine, assign_sessions, label, session_dir
from pacs2bids.versions import tool_versions
from pacs2bids.tasks.bids import finalise_dataset
from pacs2bids.tasks.convert import convert_session
from pacs2bids.tasks.deid import scan_for_leaks
from pacs2bids.tasks.lineage import record_lineage
from pacs2bids.tasks.pseudonymise import pseudonymise_released, pseudonymise_series
from pacs2bids.tasks.publish import publish_dataset
from pacs2bids.tasks.query import query_studies
from pacs2bids.tasks.pacs_limit import use_pacs_limit
from pacs2bids.tasks.retrieve import retrieve_study
from pacs2bids.tasks.validate import validate_dataset

META = Path(".pacs2bids")


class RunFailed(Pacs2BidsError):
    """The run stopped before publishing; ``summary`` says why. ``output`` is unchanged."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class NothingToPublish(Pacs2BidsError):
    """No image was converted. Check the inclusion list and filters, and the reasons the summary
    gives for each series left out."""


def _transient(task, task_run, state) -> bool:
    """Retry only what may succeed later (PACS busy, connection dropped), not misconfiguration."""
    try:
        state.result()
    except PacsError as exc:
        return exc.transient
    except (ConnectionError, TimeoutError, OSError):
        return True
    except Exception:
        return False
    return True


@flow(name="extract_project", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def extract_project(spec_path: str) -> dict:
    """Extract one project end to end; returns the run summary (pseudonymised, JSON-ready).

    Raises :class:`RunFailed` (carrying the summary) when nothing could be published.
    """
    quiet_third_party_loggers()  # also under a Prefect worker, without the CLI
    logger = get_run_logger()
    spec = load_spec(spec_path)
    versions = tool_versions()
    logger.info("versions: %s", ", ".join(f"{k} {v}" for k, v in versions.items()))
    use_pacs_limit(spec)  # every connection to the PACS holds a slot of its limit, shared by every run

    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{(flow_run_id or uuid.uuid4().hex)[:8]}"
    work = spec.resolved_work_dir
    raw_root, quarantine, scratch = work / "raw", work / "quarantine", work / f"scratch-{run_id}"
    staging = staging_dir(spec.output, work, run_id)
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o700)
    run_lock = RunLock(work)  # held till the end; stale staging/scratch of killed runs go when no run is alive
    run_lock.acquire()
    for d in (raw_root, quarantine, scratch):
        d.mkdir(parents=True, exist_ok=True)
    seed_staging(spec.output, staging)
    run_log = _attach_run_log(staging / META / "logs" / f"run-{run_id}.log")

    summary = RunSummary(project=spec.project, run_id=run_id, output=str(spec.output))
    records: list[LineageRecord] = []
    instances: list[InstanceRecord] = []  # compact, one per published sourcedata file
    done_raw: list[Path] = []
    released: list[str] = []
    dead_letters = DeadLetters(work / "dead-letter.json")
    try:
        _extract(spec, staging, raw_root, quarantine, scratch, summary, records, instances, done_raw, flow_run_id,
                 logger)
        released = _include_released(spec, staging, quarantine, scratch, summary, records, instances, logger)
        summary.awaiting_review = sum(1 for i in _quarantine(spec, quarantine).items() if i.state == "pending")
        dead = dead_letters.fold(records, run_id=run_id)
        summary.dead_letter = [asdict(e) for e in dead]
        _check_and_publish(spec, staging, summary, records, instances, run_id, flow_run_id, versions, logger)
    except Pacs2BidsError as exc:
        summary.errors.append(str(exc))
        summary.finish()
        summary.write(work / "runs" / f"run-{run_id}.json")
        _summary_artifact(spec, summary, logger)
        logger.error("run %s failed, nothing published: %s", run_id, exc)
        raise RunFailed(str(exc), summary.to_dict()) from None
    finally:
        close_pools()  # idle associations would hold the PACS's slots until the reaper's turn
        logging.getLogger("pacs2bids").removeHandler(run_log)
        run_log.close()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)  # gone when published; a failed run's must not linger
        run_lock.release()
    for folder in done_raw:  # the clinical copy goes as soon as its research copy is published (E6)
        shutil.rmtree(folder, ignore_errors=True)
    for study_folder in {f.parent for f in done_raw}:
        try:
            study_folder.rmdir()  # only once every series of the study is gone
        except OSError:
            pass
    for item_id in released:
        _quarantine(spec, quarantine).mark_published(item_id, run_id=run_id)
    dead_letters.save(dead)
    summary.write(work / "runs" / f"run-{run_id}.json")
    _summary_artifact(spec, summary, logger)
    logger.info("%s", summary.format())
    return summary.to_dict()


def _summary_artifact(spec: ProjectSpec, summary: RunSummary, logger) -> None:
    """The run summary as a Prefect artifact, for the UI (pseudonymised like the summary;
    the leak tests read it back)."""
    from prefect.artifacts import create_markdown_artifact

    key = "pacs2bids-" + (re.sub(r"[^a-z0-9-]+", "-", spec.project.lower()).strip("-") or "project")
    try:
        create_markdown_artifact(markdown="```\n" + summary.format() + "\n```", key=key,
                                 description=f"pacs2bids run {summary.run_id}: {summary.state}")
    except Exception as exc:  # the UI's copy: never worth failing a run for
        logger.warning("could not record the summary artifact: %s", type(exc).__name__)


def _extract(
    spec: ProjectSpec,
    staging: Path,
    raw_root: Path,
    quarantine: Path,
    scratch: Path,
    summary: RunSummary,
    records: list[LineageRecord],
    instances: list[InstanceRecord],
    done_raw: list[Path],
    flow_run_id: str | None,
    logger,
) -> None:
    query = query_studies.with_options(
        retries=spec.retries.attempts,
        retry_delay_seconds=exponential_backoff(spec.retries.backoff_seconds or 0.1),
        retry_condition_fn=_transient,
    )
    retrieve = retrieve_study.with_options(
        retries=spec.retries.attempts,
        retry_delay_seconds=exponential_backoff(spec.retries.backoff_seconds or 0.1),
        retry_condition_fn=_transient,
    )
    keyed = Keyed(spec.secret_bytes, spec.project)
    found = query(spec)
    summary.unmatched = [{"row": i.row, "subject": i.subject} for i in found.unmatched]
    summary.unapplied_filters = [asdict(u) for u in found.unapplied]  # included, listed (query.py)
    for i in found.unmatched:
        logger.warning("inclusion row %d (sub-%s): no study matched", i.row, i.subject)
    studies = assign_sessions(found.studies)
    studies = _skip_already_published(spec, studies, summary, logger)
    summary.studies = len(studies)
    summary.subjects |= {s.subject for s in studies}
    logger.info("%d studies of %d subjects selected", len(studies), len(summary.subjects))

    retrievals = [(study, retrieve.submit(spec, study, raw_root)) for study in studies]
    conversions = []
    for n, (study, fut) in enumerate(retrievals, start=1):
        lbl = label(study.subject, study.session)
        try:
            retrieved = fut.result()
        except Exception as exc:  # one study's failure never stops the others
            summary.study_failures.append({"label": lbl, "reason": _reason(exc)})
            records.append(LineageRecord(study.subject, study.session, keyed.uid(study.study_instance_uid),
                                         retrieve_status="failed", reason=_reason(exc)))
            logger.error("study %d/%d (%s): retrieval failed: %s", n, len(studies), lbl, _reason(exc))
            continue
        logger.info("study %d/%d (%s): %d series retrieved", n, len(studies), lbl, len(retrieved))
        src = session_dir(staging / "sourcedata", study.subject, study.session)
        pending = []
        for rs in retrieved:
            for name, why in rs.quarantined:
                summary.quarantined.append({"file": f"{lbl}/{name}", "reason": why})
            if rs.status != "complete":
                line = SeriesLine(study.subject, study.session, rs.series.series_number, "", rs.status, rs.reason)
                summary.series.append(line)
                records.append(_record(keyed, study, rs, retrieve_status=rs.status, reason=rs.reason))
                continue
            number = rs.series.series_number if rs.series.series_number is not None else 0
            out_dir = src / f"{number:03d}-{rs.folder.name[:12]}"
            fut_deid = pseudonymise_series.submit(spec, rs.folder, out_dir, study.subject, study.session, quarantine)
            pending.append((rs, fut_deid))
        deids = []
        for rs, fut_deid in pending:
            try:
                res = fut_deid.result()
            except Exception as exc:
                summary.series.append(
                    SeriesLine(study.subject, study.session, rs.series.series_number, "", "failed", _reason(exc))
                )
                records.append(_record(keyed, study, rs, pseudonymise_status="failed", reason=_reason(exc)))
                continue
            for name, why in res.quarantined:
                summary.quarantined.append({"file": f"{lbl}/{name}", "reason": why})
            # each sourcedata file paired with the received file it came from (its ledger entry)
            instances += instance_records(
                staging, res.written, res.sources, read_ledger(rs.folder), subject=study.subject,
                session=study.session, pseudo_study_uid=res.pseudo_study_uid,
                pseudo_series_uid=res.pseudo_series_uid, received_digest=keyed.received_digest,
            )
            _write_json(staging / META / "deid" / lbl / f"series-{res.series_number}-{res.pseudo_series_uid[-12:]}.json", res.record)
            if not res.written:
                why = "; ".join(r for _, r in res.dropped[:1]) or "nothing left after pseudonymisation"
                summary.series.append(
                    SeriesLine(study.subject, study.session, res.series_number, res.series_description, "skipped", why)
                )
                records.append(_record(keyed, study, rs, res, convert_status="skipped", reason=why))
                done_raw.append(rs.folder)
                continue
            deids.append((rs, res))
        if deids:
            conv = convert_session.submit(src, staging, study.subject, study.session, spec.heuristic, scratch / lbl,
                                          spec.sidecar_fields)
            conversions.append((study, deids, conv))

    for study, deids, conv in conversions:
        lbl = label(study.subject, study.session)
        try:
            result = conv.result()
        except Exception as exc:
            for rs, res in deids:
                summary.series.append(
                    SeriesLine(study.subject, study.session, res.series_number, res.series_description, "failed",
                               _reason(exc), pseudo_series_uid=res.pseudo_series_uid)
                )
                records.append(_record(keyed, study, rs, res, convert_status="failed", reason=_reason(exc)))
            logger.error("%s: conversion failed: %s", lbl, _reason(exc))
            continue
        by_uid = {c.series_uid: c for c in result.series}
        for rs, res in deids:
            c = by_uid.get(res.pseudo_series_uid)
            status = c.status if c else "skipped"
            reason = c.reason if c else "not seen by the converter"
            if res.dropped:  # objects of an image series left out (Philips raw data, say): listed, not silent
                kinds = sorted({why for _, why in res.dropped})
                note = (f"{len(res.dropped)} non-image object(s) of this series left out: "
                        + ", ".join(f"{why} x{sum(1 for _, w in res.dropped if w == why)}" for why in kinds))
                reason = f"{reason}; {note}" if reason else note
            summary.series.append(
                SeriesLine(study.subject, study.session, res.series_number, res.series_description, status, reason,
                           list(c.outputs) if c else [], res.pseudo_series_uid)
            )
            if status != "failed":
                done_raw.append(rs.folder)
            outputs = list(c.outputs) if c else []
            if status == "converted":
                prov = write_series_provenance(
                    staging / META / "provenance" / lbl / f"series-{res.series_number}-{res.pseudo_series_uid[-12:]}.json",
                    pseudo_study_uid=res.pseudo_study_uid,
                    pseudo_series_uid=res.pseudo_series_uid,
                    instance_count=len(res.written),
                    outputs=[staging / o for o in outputs],
                    bids_root=staging,
                    heuristic=spec.heuristic,
                    flow_run_id=flow_run_id,
                    started=summary.started,
                    finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    extra={"deidentification": res.record.get("method", {}) if isinstance(res.record, dict) else {},
                           # fields the project gave where the images hold none (spec sidecar_fields)
                           **({"sidecar_fields_given": spec.sidecar_fields} if spec.sidecar_fields else {})},
                )
                outputs.append(prov.relative_to(staging).as_posix())
            for o in outputs or [None]:
                records.append(_record(keyed, study, rs, res, convert_status=status, reason=reason or None, path=o))
        logger.info("%s: converted", lbl)


def _quarantine(spec: ProjectSpec, quarantine: Path) -> Quarantine:
    """The quarantine with the project's log key: only decisions signed with it count."""
    from pacs2bids.deid.keyed import audit_mac_key

    return Quarantine(quarantine, key=audit_mac_key(spec.secret_bytes, spec.project))


def _include_released(spec: ProjectSpec, staging: Path, quarantine: Path, scratch: Path, summary: RunSummary,
                      records: list[LineageRecord], instances: list[InstanceRecord], logger) -> list[str]:
    """Files a reviewer released from quarantine (:mod:`pacs2bids.quarantine`): pseudonymised
    per series into the staging ``sourcedata/``, pixels as reviewed. They are published as
    DICOM, not converted. Returns the item ids included. Only releases signed with the project
    key count; when the chain of decisions is broken, none is included and the summary says where."""
    from pacs2bids.quarantine import DECISIONS

    q = _quarantine(spec, quarantine)
    for problem in q.problems():  # a decision that does not count is reported, never skipped silently
        summary.released.append({"file": f"quarantine/{DECISIONS}", "status": f"not included: {problem}"})
        logger.warning("%s", problem)
    if q.verification().broken is not None:
        return []
    keyed = Keyed(spec.secret_bytes, spec.project)
    groups: dict[tuple, list] = {}
    for item in q.released():
        lbl = f"{label(item.subject, item.session)}/{item.id}"
        try:
            path = q.check_released(item)
        except QuarantineError as exc:
            summary.released.append({"file": lbl, "status": f"not included: {exc}"})
            logger.warning("%s", exc)
            continue
        groups.setdefault((item.subject, item.session, item.series_folder), []).append((item, path))
    included: list[str] = []
    for (subject, session, folder), items in groups.items():
        out_dir = session_dir(staging / "sourcedata", subject, session) / folder
        try:
            # a released file that fails again stays where it is: its copy goes to scratch, not back into quarantine
            res = pseudonymise_released(spec, [p for _, p in items], out_dir, subject, session, scratch / "requarantine")
        except Exception as exc:
            for item, _ in items:
                summary.released.append({"file": f"{label(subject, session)}/{item.id}", "status": f"failed: {_reason(exc)}"})
            continue
        lbl = label(subject, session)
        _write_json(staging / META / "deid" / lbl / f"released-{res.pseudo_series_uid[-12:]}-{items[0][0].id[:8]}.json",
                    res.record)
        ok = len(res.written) == len(items) and not res.quarantined
        for item, _ in items:
            status = "included in this run" if ok else "failed: " + "; ".join(r for _, r in res.quarantined + res.dropped)
            summary.released.append({"file": f"{lbl}/{item.id}", "status": status})
        if not ok:  # a series is released whole or not at all
            for f in res.written:
                f.unlink(missing_ok=True)
            continue
        included += [item.id for item, _ in items]
        # per-instance lineage as for any published file: the received checksum is the one taken
        # when the file entered quarantine (the transport is not recorded there)
        instances += instance_records(
            staging, res.written, res.sources, {item.id: {"sha256": item.sha256} for item, _ in items},
            subject=subject, session=session, pseudo_study_uid=res.pseudo_study_uid,
            pseudo_series_uid=res.pseudo_series_uid, received_digest=keyed.received_digest,
        )
        for f in res.written:
            records.append(LineageRecord(
                subject, session, pseudo_study_uid=res.pseudo_study_uid, pseudo_series_uid=res.pseudo_series_uid,
                series_number=res.series_number, retrieve_status="quarantined", pseudonymise_status="pseudonymised",
                convert_status="released", reason="released from quarantine after review; published as DICOM",
                path=f.relative_to(staging).as_posix(),
            ))
        logger.info("%s: %d file(s) released from quarantine included", lbl, len(items))
    return included


def _check_and_publish(spec, staging, summary, records, instances, run_id, flow_run_id, versions, logger) -> None:
    participants = sorted(_existing_participants(staging))  # subjects with images, this run's or earlier
    if not participants:
        raise NothingToPublish(
            "no series could be converted, so there is no dataset to publish: see the series, studies and "
            "inclusions listed in this summary"
        )
    finalise_dataset(staging, spec.dataset_name or spec.project, participants, {"Name": "pacs2bids", "Version": __version__})
    report = validate_dataset(staging)
    summary.validator_warnings = _warning_counts(report.warnings)
    if report.errors:
        raise ValidationFailed(
            f"bids-validator found {len(report.errors)} error(s): " + "; ".join(_issue_text(e) for e in report.errors[:10])
        )
    for r in records:
        r.validate_status = "valid"
        r.publish_status = "published"
    summary.published = True
    summary.finish()
    summary.write(staging / META / "runs" / f"run-{run_id}.json")
    record_lineage(staging, records, run_id, spec.project, flow_run_id, __version__,
                   heuristic_sha256(spec.heuristic, spec.sidecar_fields),
                   instances)
    # the last gate: after the lineage tables and the run summary are written, so they are scanned too
    write_marker(staging, spec.project, spec.secret_bytes)  # whose dataset this is (keyed, not the key)
    _close_run_log(staging)  # the log is scanned and published as it is now: nothing is appended after the scan
    hits = scan_for_leaks(spec, staging)
    if hits:
        summary.published = False
        where = "; ".join(f"{h.path} ({h.field}, {h.kind})" for h in hits[:10])
        raise LeakDetected(f"{len(hits)} identifying value(s) found before publishing: {where}")
    publish_dataset(staging, spec.output, run_id)


def _skip_already_published(spec: ProjectSpec, studies: list[StudyRef], summary: RunSummary, logger) -> list[StudyRef]:
    """The register of extractions done (E4): a study whose every series was already published
    whole, by the same heuristic, is not retrieved again. Pseudonymised UIDs are recomputed from the query with
    the project key and compared with the published dataset's lineage."""
    if not (spec.output / ".pacs2bids" / "lineage").is_dir():
        return studies
    from pacs2bids.lineage import read_lineage

    current = heuristic_sha256(spec.heuristic, spec.sidecar_fields)
    done = {
        r["pseudo_series_uid"]: r["instances_received"]
        for r in read_lineage(spec.output).to_pylist()
        if r["publish_status"] == "published" and r["convert_status"] in ("converted", "skipped")
        and r["heuristic_sha256"] == current
    }
    keyed = Keyed(spec.secret_bytes, spec.project)
    kept = []
    for study in studies:
        # per study, not per series: a session is converted whole, so that run numbers and
        # scans.tsv stay consistent when only part of it was published before
        published = [
            s for s in study.series
            if (n := done.get(keyed.uid(s.series_instance_uid))) is not None
            and (s.announced_instances is None or n >= s.announced_instances)
        ]
        if study.series and len(published) == len(study.series):
            summary.already_published += len(published)
            summary.subjects.add(study.subject)
        else:
            kept.append(study)
    if summary.already_published:
        logger.info("%d series already published by an earlier run: not retrieved again", summary.already_published)
    return kept


def _record(keyed, study: StudyRef, rs, res=None, **kw) -> LineageRecord:
    """One lineage row; before pseudonymisation (``res`` None) the pseudonymised UIDs are
    computed with the project key, so that a failed series is still named."""
    return LineageRecord(
        subject=study.subject,
        session=study.session,
        pseudo_study_uid=res.pseudo_study_uid if res else keyed.uid(study.study_instance_uid),
        pseudo_series_uid=res.pseudo_series_uid if res else keyed.uid(rs.series.series_instance_uid),
        series_number=rs.series.series_number,
        instances_announced=rs.series.announced_instances,
        instances_received=rs.received,
        retrieve_status=kw.pop("retrieve_status", rs.status),
        pseudonymise_status=kw.pop("pseudonymise_status", "pseudonymised" if res else None),
        **kw,
    )


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _warning_counts(warnings: list[dict]) -> list[str]:
    """One line per validator code, with how many places it was raised at."""
    from collections import Counter

    counts = Counter(w.get("code") or w.get("key") or "?" for w in warnings)
    return [f"{code} ({n} place{'s' if n > 1 else ''})" for code, n in counts.most_common()]


def _issue_text(issue: dict) -> str:
    code = issue.get("code") or issue.get("key") or "?"
    where = issue.get("location") or issue.get("file") or ""
    msg = " ".join(str(issue.get("message") or issue.get("reason") or "").split())
    return f"{code} {where} {msg[:160]}".strip()


def _existing_participants(staging: Path) -> set[str]:
    return {p.name.removeprefix("sub-") for p in staging.glob("sub-*") if p.is_dir()}


def _write_json(path: Path, data) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def _close_run_log(staging: Path) -> None:
    lib = logging.getLogger("pacs2bids")
    for handler in list(lib.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(staging):
            lib.removeHandler(handler)
            handler.close()


def _attach_run_log(path: Path) -> logging.Handler:
    """Keep the library's log of this run with the dataset (it is leak-scanned like the rest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lib = logging.getLogger("pacs2bids")
    lib.addHandler(handler)
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)
    return handler
