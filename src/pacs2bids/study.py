"""One study from the PACS to the staging dataset: the unit of distributed work (no engine).

:func:`extract_study` retrieves a study into its own raw folder, pseudonymises its series in
parallel into the staging ``sourcedata/``, converts the session into the staging dataset, and
writes the de-identification records, the provenance of each converted series and the study's
per-instance lineage part (merged by :func:`pacs2bids.lineage.merge_instance_parts`). It
returns a small :class:`StudyResult` of plain values; one study's failure never raises.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, convert, retrieve
from .config import ProjectSpec
from .deid import Pseudonymiser
from .deid.keyed import Keyed
from .derivatives.deface_study import deface_study
from .dicomfiles import iter_dicom_files
from .lineage import instance_records, write_instance_part
from .model import StudyRef
from .bids import write_series_provenance
from .provdoc import PROV_DIR
from .recorder import Outcomes, Recorder, reason
from .run import META, RunContext, label, session_dir

log = logging.getLogger(__name__)
DEID_WORKERS = 4  # series pseudonymised at once within a study


@dataclass
class StudyResult:
    """What one study did, pseudonymised: small and serialisable (plain values only).

    ``retrieval`` holds the outcomes up to pseudonymisation, ``conversion`` those of the
    converter: the run lists every study's first before any study's second."""

    label: str
    retrieval: Outcomes = field(default_factory=Outcomes)
    conversion: Outcomes = field(default_factory=Outcomes)
    raw_done: list[str] = field(default_factory=list)  # raw series folders to delete once published (E6)
    instances_part: str | None = None  # the study's per-instance lineage part, relative to staging
    seconds: dict[str, float] = field(default_factory=dict)  # retrieve, pseudonymise, convert
    received_bytes: int = 0  # the sizes of the study's raw files, from their ledgers (the run's MB/s)
    times: dict[str, str] = field(default_factory=dict)  # UTC start/end of each stage, for the PROV record
    part: str | None = None  # with remote staging: where the study's part waits to be assembled (staging.py)
    clock: dict[str, float] = field(default_factory=dict)  # epoch seconds of each stage's bounds (the run's timeline)


#: What one instance of a series at risk of burned-in text costs, in instances of an ordinary image:
#: its pixels are read by OCR (tesseract, twice per frame: 1-2 s on a busy core, where the rest of a
#: study's work costs ~20 ms per instance), so a 1-instance ultrasound study outlasts a 100-instance MR one.
OCR_INSTANCES = 100
#: In a study whose SOPClassesInStudy holds a Secondary Capture class, a series of at most this many
#: instances counts as at risk whatever its modality: screenshots, dose reports and exam summaries come
#: as a few images, often under the study's modality (the shared corpus's CT "exam summary": 6 SC images
#: with Modality CT); a C-FIND series query cannot tell which series holds them.
SC_SERIES_MAX = 16


def study_cost(study: StudyRef) -> int:
    """The study's expected work, in instances (the query's announced counts; unknown counts 0):
    a series whose modality puts its pixels at risk (:data:`pacs2bids.deid.pixels.RISKY_MODALITIES`:
    ultrasound, secondary capture...) or whose SOP class (when the series query answered it) is a
    Secondary Capture counts :data:`OCR_INSTANCES` per instance; so does, when some series' class is
    unknown, a series of at most :data:`SC_SERIES_MAX` instances of a study whose SOPClassesInStudy
    holds a Secondary Capture class."""
    from .deid.pixels import RISKY_MODALITIES
    from .sopclasses import SECONDARY_CAPTURE_PREFIX

    known = all(s.sop_class for s in study.series)  # each series' class answered: no guess
    captures = not known and any(c.startswith(SECONDARY_CAPTURE_PREFIX) for c in study.sop_classes)

    def ocr(s) -> bool:
        n = s.announced_instances or 0
        return ((s.modality or "").upper() in RISKY_MODALITIES or s.sop_class.startswith(SECONDARY_CAPTURE_PREFIX)
                or (captures and 0 < n <= SC_SERIES_MAX))

    return sum((s.announced_instances or 0) * (OCR_INSTANCES if ocr(s) else 1) for s in study.series)


def longest_first(studies: list[StudyRef]) -> list[int]:
    """The order to submit ``studies`` in (their indices): most expected work first
    (:func:`study_cost`), then most series, then the query's order. The classic LPT schedule: the
    longest study, the run's critical path, starts at once instead of after the smaller ones have
    taken the workers (issue 12)."""
    def size(i: int) -> tuple[int, int]:
        return -study_cost(studies[i]), -len(studies[i].series)
    return sorted(range(len(studies)), key=size)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pseudonymiser(spec: ProjectSpec) -> Pseudonymiser:
    """The project's pseudonymiser (key, settings and key store from the spec)."""
    return Pseudonymiser(
        project=spec.project, secret=spec.secret_bytes, settings=spec.pseudonymization, key_store=spec.resolved_key_store
    )


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def extract_study(spec: ProjectSpec, study: StudyRef, ctx: RunContext, *, progress=None, log=log) -> StudyResult:
    """Retrieve, pseudonymise and convert one study into ``ctx.staging``; see the module docstring.

    ``progress(series, received, announced)`` is called as instances arrive; ``log`` takes the
    study's progress lines (pseudonymised labels and reasons only)."""
    keyed = Keyed(spec.secret_bytes, spec.project)
    result = StudyResult(label(study.subject, study.session))
    early = Recorder(keyed, result.retrieval)
    started = time.monotonic()
    result.times["retrieve_started"] = _now()
    result.clock["retrieve_started"] = time.time()
    deid = _StudyDeid(spec, study, ctx)
    try:  # each series is pseudonymised as soon as it is complete, while the next one arrives
        retrieved = retrieve.retrieve_study(spec, study, ctx.raw_root, progress=progress, on_complete=deid.submit)
    except Exception as exc:  # one study's failure never stops the others
        deid.abandon()
        early.study_failed(study, reason(exc))
        log.error("%s: retrieval failed: %s", result.label, reason(exc))
        return result
    finally:
        result.seconds["retrieve"] = time.monotonic() - started
        result.times["retrieve_ended"] = _now()
        result.clock["retrieve_ended"] = time.time()
    log.info("%s: %d series retrieved", result.label, len(retrieved))
    result.received_bytes = sum(e.get("size") or 0
                                for rs in retrieved for e in retrieve.read_ledger(rs.folder).values())
    started = time.monotonic()  # what pseudonymisation takes beyond the retrieval it overlapped
    deids = _pseudonymise(study, ctx, retrieved, deid, early, result)
    result.seconds["pseudonymise"] = time.monotonic() - started
    result.times["pseudonymise_ended"] = result.times["convert_started"] = _now()
    result.clock["pseudonymise_ended"] = time.time()
    started = time.monotonic()
    if deids:
        _convert(spec, study, ctx, deids, Recorder(keyed, result.conversion), result, log)
    result.seconds["convert"] = time.monotonic() - started
    result.clock["convert_ended"] = time.time()
    if deids and spec.derivatives.deface is not None:  # after conversion, within the study (issue 15)
        _deface(ctx, result, log)
    return result


class _StudyDeid:
    """The pseudonymisation of one study's series, each started as soon as it is complete
    (:func:`pacs2bids.retrieve.retrieve_study`'s ``on_complete``, in the retrieving thread) or
    once retrieval is over. Up to :data:`DEID_WORKERS` series at once, each sending its files in
    batches to the run's worker processes (:mod:`pacs2bids.deid.pool`). Every series starts
    from what was known before the study (:meth:`Pseudonymiser.known`, with the study's date from
    the query), whichever finished first: the outputs do not depend on the timing."""

    def __init__(self, spec: ProjectSpec, study: StudyRef, ctx: RunContext):
        self.spec, self.study, self.ctx = spec, study, ctx
        self.src = session_dir(ctx.staging / "sourcedata", study.subject, study.session)
        self._known = None
        self.started: dict[str, tuple] = {}  # raw series folder -> (retrieved series, future)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=DEID_WORKERS, thread_name_prefix="pacs2bids-deid")

    def out_dir(self, rs) -> Path:
        number = rs.series.series_number if rs.series.series_number is not None else 0
        return self.src / f"{number:03d}-{rs.folder.name[:12]}"

    def _one(self, rs):
        p = pseudonymiser(self.spec)  # one each, as one task each had
        with self.lock:  # taken by the first series to start, before any of the study has finished
            if self._known is None:
                self._known = p.known(self.study.subject, [self.study.study_date or ""])
        return p.pseudonymise_series(iter_dicom_files(rs.folder), self.out_dir(rs), subject=self.study.subject,
                                     session=self.study.session, quarantine_dir=self.ctx.quarantine, known=self._known)

    def submit(self, rs) -> None:
        """Start pseudonymising a complete series (once)."""
        with self.lock:
            if str(rs.folder) not in self.started:
                self.started[str(rs.folder)] = (rs, self.pool.submit(self._one, rs))

    def result(self, rs):
        """The series' :class:`~pacs2bids.deid.record.SeriesDeidResult` (started now if it was not)."""
        self.submit(rs)
        return self.started[str(rs.folder)][1].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Retrieval failed: wait for the series started, and take their files out of staging
        (the study is reported failed and publishes nothing)."""
        self.close()
        for rs, _ in self.started.values():
            shutil.rmtree(self.out_dir(rs), ignore_errors=True)


def _pseudonymise(study: StudyRef, ctx: RunContext, retrieved: list, deid: _StudyDeid, rec: Recorder,
                  result: StudyResult) -> list[tuple]:
    """Fold the pseudonymisation of the study's complete series, in the study's order, into the
    records and lineage; returns ``(retrieved, pseudonymised)`` of the series that still hold
    files to convert."""
    complete = []
    for rs in retrieved:
        for name, why in rs.quarantined:
            rec.quarantined(study, name, why)
        if rs.status != "complete":
            rec.not_retrieved_whole(study, rs)
        else:
            complete.append(rs)
            deid.submit(rs)
    keyed = rec.keyed
    instances, deids = [], []
    try:
        for rs in complete:
            try:
                res = deid.result(rs)
            except Exception as exc:
                rec.pseudonymisation_failed(study, rs, reason(exc))
                continue
            for name, why in res.quarantined:
                rec.quarantined(study, name, why)
            # each sourcedata file paired with the received file it came from (its ledger entry)
            instances += instance_records(
                ctx.staging, res.written, res.sources, retrieve.read_ledger(rs.folder), subject=study.subject,
                session=study.session, pseudo_study_uid=res.pseudo_study_uid,
                pseudo_series_uid=res.pseudo_series_uid, received_digest=keyed.received_digest,
            )
            write_json(ctx.staging / META / "deid" / result.label
                       / f"series-{res.series_number}-{res.pseudo_series_uid[-12:]}.json", res.record)
            if not res.written:
                rec.nothing_left(study, rs, res, "; ".join(r for _, r in res.dropped[:1])
                                 or "nothing left after pseudonymisation")
                result.raw_done.append(str(rs.folder))
                continue
            deids.append((rs, res))
    finally:
        deid.close()
    result.instances_part = write_instance_part(ctx.staging, result.label, instances)
    return deids


def _dropped_note(res) -> str:
    """Objects of an image series left out (Philips raw data, say): listed, not silent."""
    kinds = sorted({why for _, why in res.dropped})
    return (f"{len(res.dropped)} non-image object(s) of this series left out: "
            + ", ".join(f"{why} x{sum(1 for _, w in res.dropped if w == why)}" for why in kinds))


def _convert(spec: ProjectSpec, study: StudyRef, ctx: RunContext, deids: list[tuple], rec: Recorder,
             result: StudyResult, log) -> None:
    """Convert the session, then record each series' outcome and write its provenance."""
    try:
        converted = convert.convert_session(
            session_dir(ctx.staging / "sourcedata", study.subject, study.session), ctx.staging,
            subject=study.subject, session=study.session, heuristic=spec.heuristic,
            work_dir=ctx.scratch / result.label, sidecar_fields=spec.sidecar_fields,
        )
    except Exception as exc:
        for rs, res in deids:
            rec.conversion_failed(study, rs, res, reason(exc))
        log.error("%s: conversion failed: %s", result.label, reason(exc))
        return
    by_uid = {c.series_uid: c for c in converted.series}
    done = 0
    for rs, res in deids:
        c = by_uid.get(res.pseudo_series_uid)
        status = c.status if c else "skipped"
        why = c.reason if c else "not seen by the converter"
        if res.dropped:
            why = f"{why}; {_dropped_note(res)}" if why else _dropped_note(res)
        if status != "failed":
            result.raw_done.append(str(rs.folder))
        outputs = list(c.outputs) if c else []
        prov = _provenance(spec, ctx, result, rs, res, outputs) if status == "converted" else None
        rec.converted(study, rs, res, status, why, outputs, prov)
        done += status == "converted"
    log.info("%s: %d of %d series converted", result.label, done, len(deids))


def _provenance(spec: ProjectSpec, ctx: RunContext, result: StudyResult, rs, res, outputs: list[str]) -> str:
    """Write the PROV record of a converted series; returns its path relative to staging."""
    t, now = result.times, _now()
    prov = write_series_provenance(
        ctx.staging / PROV_DIR / result.label / f"prov-series{res.series_number}x{res.pseudo_series_uid[-12:]}.jsonld",
        pseudo_study_uid=res.pseudo_study_uid,
        pseudo_series_uid=res.pseudo_series_uid,
        instance_count=len(res.written),
        instances=list(res.written),
        outputs=[ctx.staging / o for o in outputs],
        bids_root=ctx.staging,
        heuristic=spec.heuristic,
        flow_run_id=ctx.flow_run_id,
        run_id=ctx.run_id,
        started=ctx.started,
        finished=now,
        stages={"retrieve": {"started": t.get("retrieve_started"), "ended": t.get("retrieve_ended"),
                             "parameters": {"instances_received": rs.received, "transports": sorted(
                                 {str(e.get("transport")) for e in retrieve.read_ledger(rs.folder).values()})}},
                # series are pseudonymised as they arrive: the stage spans the retrieval and after it
                "pseudonymise": {"started": t.get("retrieve_started"), "ended": t.get("pseudonymise_ended"),
                                 "parameters": {"method": res.record.get("method", {})
                                                if isinstance(res.record, dict) else {}}},
                "convert": {"started": t.get("convert_started"), "ended": now}},
        # fields the project gave where the images hold none (spec sidecar_fields)
        extra={"sidecar_fields_given": spec.sidecar_fields} if spec.sidecar_fields else {},
    )
    return prov.relative_to(ctx.staging).as_posix()


def _deface(ctx: RunContext, result: StudyResult, log) -> None:
    """Deface the study's chosen images into derivatives/pacs2bids-deface (failures recorded, never raised)."""
    started = time.monotonic()
    outputs = [o for s in result.conversion.series if s.status == "converted" for o in s.outputs]
    entries = deface_study(ctx, result.label, outputs, __version__)
    Recorder(outcomes=result.conversion).derived(entries)
    result.seconds["deface"] = time.monotonic() - started
    if entries:
        log.info("%s: %d of %d image(s) defaced", result.label, sum(e["status"] == "defaced" for e in entries),
                 len(entries))


def remove_raw(folders: list[str]) -> None:
    """Delete the raw series folders whose research copy is published (E6), then each study
    folder left empty (only once every series of the study is gone)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    for study_folder in {Path(f).parent for f in folders}:
        try:
            study_folder.rmdir()
        except OSError:
            pass
