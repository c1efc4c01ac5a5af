"""``heuristic: auto``: dcm2niix once on the session, every image named by the classifier from its
sidecar, each series judged (converted, left out, failed) and the kept images placed through
:mod:`pacs2bids.bids`."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pacs2bids.bids import acq_time, add_intended_for, clear_session, place_image, session_dir, write_scans
from pacs2bids.convert.dcm2niix import Dcm2niixRun, SessionSeries, dcm2niix_session
from pacs2bids.convert.classify import classify_session
from pacs2bids.convert.series import ConversionResult, ConvertedSeries, keep_log
from pacs2bids.errors import ConversionError

log = logging.getLogger(__name__)

_SPLIT = ("dcm2niix split this series into {n} images (geometry, echo or transfer syntax changes within one "
          "series): BIDS has no name for that, so it is left out. Split it into series at the source, or give it a "
          "rule in a project heuristic")
_CLASH = ("the classifier gave two images of this session the same BIDS name; left out. Give the series a rule in a "
          "project heuristic")
NO_IMAGE = "dcm2niix wrote no image for this series"
_ASL_NO_CONTEXT = ("ASL without its label/control order: BIDS requires an aslcontext.tsv the classifier did not give "
                   "(the validator would refuse the whole dataset); give the order in a project heuristic")


def _unmet_fields(d, given: Mapping[str, Any]) -> str | None:
    """Why a named image cannot be published as named, or None: BIDS requires sidecar fields (or an
    aslcontext.tsv) that the images do not hold (``Decision.missing``) and that neither conversion
    nor the project (``given``: the spec's ``sidecar_fields`` for this suffix) fills in. The
    validator would refuse the whole dataset for one such file."""
    if d.suffix == "asl" and not getattr(d, "aslcontext", None):
        return _ASL_NO_CONTEXT
    absent = [k for k in getattr(d, "missing", ()) if k != "aslcontext.tsv" and k not in d.output.sidecar
              and k not in given]
    if absent:
        return (f"BIDS requires {', '.join(absent)} for a {d.suffix} image and the images do not hold "
                f"{'it' if len(absent) == 1 else 'them'} (the validator would refuse the whole dataset); "
                f"left out: give {'it' if len(absent) == 1 else 'them'} in the spec's sidecar_fields.{d.suffix}, "
                "if the protocol fixes them")
    return None


@dataclass
class Verdict:
    """What becomes of one DICOM series of a session: ``converted`` (``kept``: the decisions with a
    BIDS name), ``skipped`` (every image left out by the classifier) or ``failed`` (split, name
    clash, or no image at all: ``reason`` starts with :data:`NO_IMAGE`). A series dcm2niix stacked
    into another's image has ``stacked_with`` (that series) and shares its verdict."""

    series: SessionSeries
    status: str
    kept: list = field(default_factory=list)
    reason: str = ""
    stacked_with: SessionSeries | None = None


def judge_session(run: Dcm2niixRun, decisions: list, subject: str, session: str | None,
                  fills: Mapping[str, Mapping[str, Any]] | None = None) -> list[Verdict]:
    """One :class:`Verdict` per image series of ``run`` (same order), from the classifier's decisions;
    ``fills`` (per suffix) are the sidecar fields the project gives (:func:`pacs2bids.bids.place_image` writes them)."""
    fills = fills or {}

    def _unmet(d) -> str | None:
        return _unmet_fields(d, fills.get(d.suffix or "", {}))

    by_series: dict[str, list] = {}
    for d in decisions:
        by_series.setdefault(d.output.series_uid, []).append(d)
    split: dict[str, int] = {}  # images dcm2niix could only tell apart by their first file: not named
    for uid, ds in by_series.items():
        suffixes = [run.suffix[d.output.stem.name] for d in ds]
        if len(ds) > 1 and len(set(suffixes)) < len(suffixes) and any(d.relpath(subject, session) for d in ds):
            split[uid] = len(ds)
    names: dict[str, list] = {}
    for d in decisions:
        rel = d.relpath(subject, session)
        if rel and d.output.series_uid not in split:
            names.setdefault(rel, []).append(d)
    clash = {d.output.series_uid for same in names.values() if len(same) > 1 for d in same}
    verdicts: list[Verdict] = []
    for k, s in enumerate(run.series):
        ds = by_series.get(s.uid, [])
        kept = [d for d in ds if d.relpath(subject, session) and not _unmet(d)]
        if k in run.merged:
            verdicts.append(Verdict(s, "", stacked_with=run.series[run.merged[k]]))
        elif s.uid in split:
            verdicts.append(Verdict(s, "failed", reason=_SPLIT.format(n=split[s.uid])))
        elif s.uid in clash:
            verdicts.append(Verdict(s, "failed", reason=_CLASH))
        elif kept:
            left = sorted({_unmet(d) or d.reason for d in ds if d not in kept})
            verdicts.append(Verdict(s, "converted", kept,
                                    ("other images of this series left out: " + "; ".join(left)) if left else ""))
        elif ds:
            why = sorted({(_unmet(d) if d.relpath(subject, session) else None) or d.reason for d in ds})
            verdicts.append(Verdict(s, "skipped", reason="; ".join(why) or "left out by the classifier"))
        else:
            verdicts.append(Verdict(s, "failed", reason=NO_IMAGE))
    host = {v.series.uid: v for v in verdicts if v.stacked_with is None}
    for v in verdicts:
        if v.stacked_with is not None:
            h = host[v.stacked_with.uid]
            v.status, v.reason = h.status, h.reason or f"stacked by dcm2niix with series {v.stacked_with.number} into one image"
    return verdicts


def _move_kept(d, rel: str, bids_root: Path, given: Mapping[str, Any] | None = None) -> list[str]:
    """Place one named image (a classifier decision) at ``rel`` through :func:`pacs2bids.bids.place_image`."""
    return place_image(d.output.stem, rel, bids_root, task=d.entities.get("task"), given=given,
                       aslcontext=getattr(d, "aslcontext", None))


def _place(verdicts: list[Verdict], bids_root: Path, subject: str, session: str | None,
           fills: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Move the kept images of a session into ``bids_root`` (replacing an earlier conversion of it),
    with their IntendedFor and scans.tsv; returns {series UID: files written}."""
    stale = clear_session(bids_root, subject, session)
    if stale:
        log.info("%s: %d file(s) of an earlier conversion of this session replaced",
                 session_dir(subject, session), len(stale))
    scans: dict[str, str] = {}
    written: dict[str, list[str]] = {}
    for v in verdicts:
        for d in v.kept:
            files = _move_kept(d, d.relpath(subject, session), bids_root, fills.get(d.suffix, {}))
            image = next((f for f in files if f.endswith((".nii.gz", ".nii"))), None)
            if image:
                rel = Path(image).relative_to(session_dir(subject, session)).as_posix()
                scans[rel] = acq_time(d.output.sidecar, v.series.date)
            written.setdefault(v.series.uid, []).extend(files)
    if written:
        add_intended_for(bids_root, subject, session)
        write_scans(bids_root, subject, session, scans)
    return written


def convert_auto(dicom_dir: Path, bids_root: Path, *, subject: str, session: str | None, work_dir: Path,
                 log_dir: Path, fills: Mapping[str, Mapping[str, Any]]) -> ConversionResult:
    """``heuristic: auto`` for one session (see :func:`pacs2bids.convert.convert_session`)."""
    dicom_dir, bids_root, work_dir = Path(dicom_dir).resolve(), Path(bids_root).resolve(), Path(work_dir).resolve()
    label = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    work_dir.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f"dcm2niix-{label}-", dir=work_dir))  # never shared between sessions
    try:
        run = dcm2niix_session([dicom_dir], private)
        results = list(run.skipped)
        if not run.series:
            log.warning("no image objects to convert in %s", label)
            return ConversionResult(results)
        log.info("dcm2niix read %d series of %s", len(run.series), label)
        kept_log = ""

        def failed_log() -> str:
            nonlocal kept_log
            kept_log = kept_log or keep_log(log_dir, f"dcm2niix-{label}", run.log, bids_root)
            return kept_log

        if not run.outputs and run.returncode != 0:
            raise ConversionError(f"dcm2niix failed (exit {run.returncode}) on {label} and wrote no image; "
                                  f"its log is kept in {failed_log()}")
        verdicts = judge_session(run, classify_session(run.outputs) if run.outputs else [], subject, session, fills)
        written = _place(verdicts, bids_root, subject, session, fills)
        for v in verdicts:
            owner = (v.stacked_with or v.series).uid
            outs = sorted(written.get(owner, [])) if v.status == "converted" else []
            reason = v.reason
            if reason.startswith(NO_IMAGE):
                reason = f"{NO_IMAGE}; its log is kept in {failed_log()}"
            s = v.series
            if s.left_out:
                reason = f"{reason}; {s.left_out}" if reason else s.left_out
            results.append(ConvertedSeries(s.uid, s.number, s.description, v.status, outs, reason))
        for res in results:
            if res.status != "converted":
                log.info("%s series %s %s: %s", label, res.series_number, res.status, res.reason)
        return ConversionResult(results)
    finally:
        shutil.rmtree(private, ignore_errors=True)
