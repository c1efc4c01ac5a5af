"""Convert one pseudonymised study (one BIDS session) to BIDS.

``convert_session`` reads only ``dicom_dir`` (the pseudonymised copy, one folder per series).
With ``heuristic: auto`` it runs dcm2niix once on the session in a private scratch folder, maps
each image back to its DICOM series (outputs are named after their first file, ``-f %b``), has
:func:`pacs2bids.classify.classify_session` name every image from its sidecar, moves the kept ones
to their BIDS paths, and writes the session's ``*_scans.tsv`` and the field maps' ``IntendedFor``.
With a project's own heudiconv heuristic it runs the heudiconv CLI on the session in a private
output folder, maps every output back through heudiconv's tables (``dicominfo*.tsv``,
``*.edit.txt``), and moves the session's files into the dataset. Objects dcm2niix cannot
convert (SR, presentation states, raw data) are reported as skipped. Requirements C1, C2.
"""
from __future__ import annotations

import ast
import csv
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial

from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.errors import ConversionError
from pacs2bids.heuristic_path import heuristic_file

log = logging.getLogger(__name__)

# PS3.4 B.5 storage SOP classes holding images dcm2niix can convert (MR, CT, PET, SC, ...).
# Anything else (SR, presentation states, raw data, encapsulated documents) is filtered out.
IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR family
    "1.2.840.10008.5.1.4.1.1.2",  # CT family
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.20",  # NM
)
_NON_IMAGE_EXACT = {"1.2.840.10008.5.1.4.1.1.4.2"}  # MR Spectroscopy
_OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".json", ".bval", ".bvec")
_TAIL = 3000


@dataclass
class ConvertedSeries:
    """What happened to one (pseudonymised) series."""

    series_uid: str
    series_number: int | None
    series_description: str
    status: str  # "converted" | "skipped" | "failed"
    outputs: list[str] = field(default_factory=list)  # relative to bids_root
    reason: str = ""


@dataclass
class ConversionResult:
    series: list[ConvertedSeries]


def is_image_sop_class(uid: str) -> bool:
    """True for the storage SOP classes whose pixel data dcm2niix turns into NIfTI (PS3.4 B.5)."""
    uid = str(uid)
    if uid in _NON_IMAGE_EXACT:
        return False
    return any(uid == p or uid.startswith(p + ".") for p in IMAGE_SOP_PREFIXES)


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"pacs2bids_heuristic_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _stage_inputs(dicom_dir: Path, stage: Path) -> tuple[int, dict[str, ConvertedSeries]]:
    """Link the image files of ``dicom_dir`` under ``stage``; return (count, filtered-out series)."""
    filtered: dict[str, ConvertedSeries] = {}
    kept = 0
    for i, path in enumerate(iter_dicom_files(dicom_dir)):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                "SOPClassUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality"])
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.warning("skipping unreadable file %s: %s", path.name, exc)
            continue
        sop = str(ds.get("SOPClassUID", ""))
        if not is_image_sop_class(sop):
            uid = str(ds.get("SeriesInstanceUID", ""))
            if uid not in filtered:
                sn = ds.get("SeriesNumber")
                filtered[uid] = ConvertedSeries(
                    uid, int(sn) if sn not in (None, "") else None, str(ds.get("SeriesDescription", "")),
                    "skipped", [], f"non-image object ({getattr(ds.SOPClassUID, 'name', sop) if 'SOPClassUID' in ds else 'no SOP class'})")
            continue
        rel = path.relative_to(dicom_dir)
        target = stage / rel.parent / f"{i:06d}_{rel.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), target)
        kept += 1
    return kept, filtered


def _heudiconv_cmd(stage: Path, bids_root: Path, subject: str, session: str | None, heur: Path,
                   custom_grouping: bool) -> list[str]:
    if importlib.util.find_spec("heudiconv") is None:
        raise ConversionError("heudiconv is not installed: pip install heudiconv (and dcm2niix)")
    # heudiconv's own command line, through a runner that makes its sidecar date check precise
    exe = [sys.executable, "-m", "pacs2bids.heudiconv_runner"]
    # --minmeta: skip heudiconv's dcmstack embedding, which re-reads every DICOM and dominated the run
    # time (XA30 session: 94 s -> see report), and would copy whole DICOM headers into the sidecars.
    cmd = [*exe, "--files", str(stage), "-s", subject, "-f", str(heur), "-c", "dcm2niix", "-b",
           "--minmeta", "--overwrite", "-o", str(bids_root)]
    if session:
        cmd += ["-ss", session]
    if custom_grouping:
        cmd += ["-g", "custom"]
    return cmd


def _info_dir(bids_root: Path, subject: str, session: str | None) -> Path:
    d = bids_root / ".heudiconv" / subject
    if session:
        d = d / f"ses-{session}"
    return d / "info"


def _read_tables(info: Path, subject: str, session: str | None) -> tuple[list[dict], dict[str, str]]:
    """heudiconv's dicominfo rows and {series_id: template} from its conversion table."""
    ses_suffix = f"_ses-{session}" if session else ""
    rows: list[dict] = []
    dicominfo = info / f"dicominfo{ses_suffix}.tsv"
    if dicominfo.exists():
        with open(dicominfo, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    table: dict[str, str] = {}
    edit = info / f"{subject}{ses_suffix}.edit.txt"
    if edit.exists():
        text = edit.read_text()
        if text.lstrip().startswith("OrderedDict("):  # heuristics returning an OrderedDict
            from collections import OrderedDict

            parsed = eval(text, {"__builtins__": {}, "OrderedDict": OrderedDict})  # noqa: S307 (our own table)
        else:
            parsed = ast.literal_eval(text)
        for key, ids in parsed.items():
            template = key[0] if isinstance(key, tuple) else key
            for sid in ids:
                table[str(sid)] = template
    return rows, table


def _fill(template: str, subject: str, session: str | None) -> str:
    sub = f"sub-{subject}"
    ses_dir = f"{sub}/ses-{session}" if session else sub
    ses_prefix = f"{sub}_ses-{session}" if session else sub
    out = template.replace("{bids_subject_session_dir}", ses_dir).replace("{bids_subject_session_prefix}", ses_prefix)
    out = out.replace("{subject}", subject).replace("{session}", f"ses-{session}" if session else "")
    return out.replace("{item:01d}", "1").replace("{item}", "1")


def _outputs_for(bids_root: Path, prefix: str) -> list[Path]:
    """Files heudiconv wrote for one template: the prefix itself or prefix + a suffix it added."""
    folder = (bids_root / prefix).parent
    stem = Path(prefix).name
    if not folder.is_dir():
        return []
    pat = re.compile(re.escape(stem) + r"(\d+|_part-\w+|_echo-\d+)?(" + "|".join(re.escape(s) for s in _OUTPUT_SUFFIXES) + r")$")
    # heudiconv inserts echo-/part- entities before the suffix; match those names too
    base, _, suffix = stem.rpartition("_")
    pat2 = re.compile(re.escape(base) + r"(_echo-\d+|_part-(mag|phase))+_" + re.escape(suffix) + r"\d*("
                      + "|".join(re.escape(s) for s in _OUTPUT_SUFFIXES) + r")$")
    return sorted(p for p in folder.iterdir() if pat.match(p.name) or pat2.match(p.name))


def _fix_fieldmap_names(bids_root: Path, outputs: list[Path], prefix: str) -> list[Path]:
    """A GE/Philips B0 series gives two images (magnitude, field map in Hz) that heudiconv names
    ``_fieldmap1``/``_fieldmap2``: rename them ``_magnitude`` and ``_fieldmap`` (BIDS fmap case 3)."""
    stem = Path(prefix).name
    if not stem.endswith("_fieldmap"):
        return outputs
    numbered = sorted({p.name[len(stem):].split(".")[0] for p in outputs} - {""})
    if not numbered:
        return outputs
    renamed: list[Path] = []
    scans_renames: dict[str, str] = {}
    for num in numbered:
        js = bids_root / (prefix + num + ".json")
        meta = json.loads(js.read_text()) if js.exists() else {}
        is_hz = str(meta.get("Units", "")).lower() == "hz" or "FIELDMAP" in [str(x).upper() for x in meta.get("ImageType", [])]
        new_stem = stem if is_hz else stem[: -len("_fieldmap")] + "_magnitude"
        for p in outputs:
            if p.name.startswith(stem + num + "."):
                ext = p.name[len(stem + num):]
                target = p.with_name(new_stem + ext)
                p.rename(target)
                renamed.append(target)
                scans_renames[p.name] = target.name
    _rename_in_scans(bids_root, prefix, scans_renames)
    return sorted(renamed)


def _split_outputs(outputs: list[Path], prefix: str) -> int:
    """How many images dcm2niix made from one template beyond the first, when it numbered them
    (``_bold1``, ``_bold2``...; field maps are renamed before this check). 0: named as BIDS wants.
    GRE field-map echoes are BIDS names: ``_magnitude1``/``_magnitude2``, ``_phase1``/``_phase2``."""
    stem = Path(prefix).name
    if stem.endswith(("_magnitude", "_phase")):
        return 0
    numbered = {re.match(r"\d+", p.name[len(stem):]).group() for p in outputs
                if p.name.startswith(stem) and re.match(r"\d+\.", p.name[len(stem):])}
    return len(numbered)


def _remove_outputs(bids_root: Path, prefix: str, outputs: list[Path]) -> None:
    """Delete one template's outputs and their rows in scans.tsv."""
    names = {p.name for p in outputs}
    for p in outputs:
        p.unlink(missing_ok=True)
    sess_dir = (bids_root / prefix).parent.parent
    for scans in sess_dir.glob("*_scans.tsv"):
        lines = scans.read_text().splitlines(keepends=True)
        scans.write_text("".join(l for l in lines if l.split("\t", 1)[0].rsplit("/", 1)[-1] not in names))
    # nothing left of the session (or subject): no folder, so no empty subject in the dataset
    for folder in (sess_dir, sess_dir.parent):
        files = [f for f in folder.rglob("*") if f.is_file()]
        if folder.name.startswith(("sub-", "ses-")) and all(
            f.name.endswith("_scans.tsv") and len(f.read_text().splitlines()) <= 1 for f in files
        ):
            shutil.rmtree(folder)


def _rename_in_scans(bids_root: Path, prefix: str, renames: dict[str, str]) -> None:
    sess_dir = (bids_root / prefix).parent.parent
    for scans in sess_dir.glob("*_scans.tsv"):
        text = scans.read_text()
        for old, new in renames.items():
            text = text.replace("/" + old + "\t", "/" + new + "\t")
        scans.write_text(text)


def _convert_heudiconv(dicom_dir: Path, bids_root: Path, *, subject: str, session: str | None,
                       heuristic: str, work_dir: Path, log_dir: Path) -> ConversionResult:
    """A project's own heudiconv heuristic: heudiconv's CLI on the session, in a private output
    folder whose session files are then moved into ``bids_root``."""
    dicom_dir, final_root, work_dir = Path(dicom_dir).resolve(), Path(bids_root).resolve(), Path(work_dir).resolve()
    heur = heuristic_file(heuristic).resolve()
    module = _load_module(heur)
    custom = callable(getattr(module, "grouping", None))
    label = f"{subject}" + (f"_ses-{session}" if session else "")
    work_dir.mkdir(parents=True, exist_ok=True)
    # Everything heudiconv writes goes to folders of this call alone: sessions converted in
    # parallel used to share the dataset root, where heudiconv reads and rewrites its top-level
    # files (participants.tsv, dataset_description.json, task templates) and .heudiconv/<subject>/:
    # the intermittent "heudiconv failed (exit 1)" on a subject's second session.
    private = Path(tempfile.mkdtemp(prefix=f"heudiconv-{label}-", dir=work_dir))
    stage, bids_root = private / "input", private / "bids"
    stage.mkdir()
    bids_root.mkdir()
    kept, filtered = _stage_inputs(dicom_dir, stage)
    results: list[ConvertedSeries] = list(filtered.values())
    if kept == 0:
        log.warning("no image objects to convert in %s", dicom_dir.name)
        return ConversionResult(results)

    info = _info_dir(bids_root, subject, session)
    stale = info.parent if session else info
    if stale.exists():  # heudiconv would reuse a stale conversion table found there
        shutil.rmtree(stale)
    cmd = _heudiconv_cmd(stage, bids_root, subject, session, heur, custom)
    # NO_ET / NIPYPE_NO_ET: heudiconv and nipype would otherwise look for updates over the network
    # dcm2niix is found on PATH by nipype: put this interpreter's bin first (pip's dcm2niix wheel)
    env = child_env()  # never the project secret
    log.info("converting %d files of %s with heudiconv (heuristic %s)", kept, label, heur.name)
    proc = subprocess.run(cmd, cwd=work_dir, env=env, capture_output=True, text=True)
    log_text = proc.stdout + "\n--- stderr ---\n" + proc.stderr
    if proc.returncode != 0:
        kept = _keep_log(log_dir, f"heudiconv-sub-{label}", log_text, final_root)
        shutil.rmtree(private, ignore_errors=True)
        tail = (proc.stderr or proc.stdout)[-_TAIL:]
        raise ConversionError(
            f"heudiconv failed (exit {proc.returncode}) on sub-{label} with heuristic {heur.name}; "
            f"full log kept in {kept}. stderr tail:\n{tail}")

    rows, table = _read_tables(info, subject, session)
    reasons: dict[str, str] = {}
    if hasattr(module, "plan") and hasattr(module, "features_of"):
        feats = [dict(ast.literal_eval(r["custom"])) if r.get("custom") not in (None, "", "None") else {} for r in rows]
        try:
            named, left_out = module.plan(feats)
            reasons = {rows[i]["series_id"]: r for i, r in left_out}
        except Exception as exc:  # reasons are a side output: conversion already happened
            log.warning("could not recompute the heuristic's reasons: %s", exc)
    for r in rows:
        sid = r["series_id"]
        feats = dict(ast.literal_eval(r["custom"])) if r.get("custom") not in (None, "", "None") else {}
        uids = list(feats.get("series_uids") or [r.get("series_uid", "")])
        sn = feats.get("series_number") if feats else None
        if sn is None and not feats:
            try:
                sn = int(sid.split("-")[0])
            except ValueError:
                sn = None
        desc = r.get("series_description", "")
        template = table.get(sid)
        if template is None:
            status, outs, reason = "skipped", [], reasons.get(sid, "not selected by the heuristic")
        else:
            prefix = _fill(template, subject, session)
            found = _fix_fieldmap_names(bids_root, _outputs_for(bids_root, prefix), prefix)
            outs = [str(p.relative_to(bids_root)) for p in found]
            split = _split_outputs(found, prefix)
            if split:
                _remove_outputs(bids_root, prefix, found)
                status, outs = "failed", []
                reason = (f"dcm2niix split this series into {split} images (geometry, echo or transfer syntax changes "
                          "within one series): BIDS has no name for that, so it is left out. Split it into series "
                          "at the source, or give it a rule in a project heuristic")
            elif any(o.endswith((".nii", ".nii.gz")) for o in outs):
                status, reason = "converted", ""
            else:
                kept = _keep_log(log_dir, f"heudiconv-sub-{label}", log_text, final_root)
                status, reason = "failed", f"heudiconv produced no image for {prefix}; its log is kept in {kept}"
        for k, uid in enumerate(uids):
            results.append(ConvertedSeries(uid, (sn + k) if (sn is not None and len(uids) > 1) else sn,
                                           desc, status, list(outs), reason))
    # only the session's own files join the dataset; heudiconv's tables and top-level templates stay behind
    _move_session(bids_root, final_root, subject, session)
    shutil.rmtree(private, ignore_errors=True)
    for res in results:
        if res.status == "skipped":
            log.info("series %s (%s) left out: %s", res.series_number, res.series_description, res.reason)
    return ConversionResult(results)


# -- shared by both paths ------------------------------------------------------------------------
def _keep_log(log_dir: Path, name: str, text: str, bids_root: Path) -> str:
    """Write a failed conversion's log under ``log_dir`` (the run's records, leak-scanned before
    publishing); returns its path relative to ``bids_root`` when inside it, for the reason."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    path.write_text(text)
    try:
        return path.relative_to(bids_root).as_posix()
    except ValueError:
        return str(path)


def _session_rel(subject: str, session: str | None) -> Path:
    return Path(f"sub-{subject}") / (f"ses-{session}" if session else "")


_DATATYPES = ("anat", "func", "dwi", "fmap", "perf", "pet", "beh", "mrs", "micr", "nirs", "eeg", "meg", "ieeg", "motion")


def clear_session(bids_root: Path, subject: str, session: str | None) -> list[str]:
    """Remove what an earlier conversion of this session left in ``bids_root`` (its datatype
    folders and scans.tsv; never sourcedata/ nor another session): a session is converted whole,
    so an image named differently this time leaves no stale copy. Returns the files removed."""
    sess = bids_root / _session_rel(subject, session)
    removed = []
    for d in _DATATYPES:
        if (sess / d).is_dir():
            removed += [f.relative_to(bids_root).as_posix() for f in (sess / d).rglob("*") if f.is_file()]
            shutil.rmtree(sess / d)
    scans = sess / (f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_scans.tsv")
    if scans.exists():
        scans.unlink()
        removed.append(scans.relative_to(bids_root).as_posix())
    return removed


def _move_session(src_root: Path, dest_root: Path, subject: str, session: str | None) -> None:
    """Move the files of one session (``sub-X/[ses-Y/]``) from ``src_root`` into ``dest_root``,
    replacing files of the same name."""
    src = src_root / _session_rel(subject, session)
    clear_session(dest_root, subject, session)
    if not src.is_dir():
        return
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        dest = dest_root / f.relative_to(src_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dest))


def child_env() -> dict[str, str]:
    """The environment a converter needs (:func:`pacs2bids.childenv.child_env`, the allow-list
    every child gets: never the project secret), with this interpreter's folder first on PATH
    (pip's dcm2niix wheel) and nipype's network check off."""
    from pacs2bids.childenv import child_env as allowed

    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", os.defpath)
    return allowed(PATH=path, NIPYPE_NO_ET="1", NO_ET="1")


def dcm2niix_exe() -> str:
    """dcm2niix beside this interpreter (pip's wheel), else on PATH."""
    exe = Path(sys.executable).parent / "dcm2niix"
    found = str(exe) if exe.exists() else shutil.which("dcm2niix")
    if not found:
        raise ConversionError("dcm2niix is not installed: pip install dcm2niix (or apt install dcm2niix)")
    return found


def is_auto(heuristic: str | None) -> bool:
    """``auto`` (the default): classify dcm2niix's sidecars (pacs2bids.classify), no heudiconv."""
    return heuristic in (None, "", "auto")


def convert_session(dicom_dir: Path, bids_root: Path, *, subject: str, session: str | None,
                    heuristic: str, work_dir: Path, log_dir: Path | None = None,
                    sidecar_fields: Mapping[str, Mapping[str, Any]] | None = None) -> ConversionResult:
    """Convert the series under ``dicom_dir`` (one study) into ``bids_root``.

    Takes the pseudonymised DICOM folder of one study, the BIDS root being built, the subject
    and session labels (without ``sub-``/``ses-``; give a session whenever the subject has
    several studies), a heuristic (``auto``: dcm2niix once on the session, each output named by
    :func:`pacs2bids.classify.classify_session`; any other name or path: a heudiconv heuristic
    run through heudiconv), and a private working folder. Logs of failed conversions are kept in
    ``log_dir`` (default ``bids_root/.pacs2bids/logs``) and named in the reasons. With ``auto``,
    ``sidecar_fields`` (per BIDS suffix, the spec's ``sidecar_fields``) fills sidecar fields the
    images do not hold, never those they do. Returns one
    :class:`ConvertedSeries` per series found (non-image objects and series left out are
    ``skipped`` with their reason). Raises :class:`ConversionError` when the converter fails as
    a whole, FileNotFoundError for an unknown heuristic.
    """
    log_dir = Path(log_dir) if log_dir is not None else Path(bids_root) / ".pacs2bids" / "logs"
    if is_auto(heuristic):
        return _convert_dcm2niix(dicom_dir, bids_root, subject=subject, session=session, work_dir=work_dir,
                                 log_dir=log_dir, fills=sidecar_fields or {})
    return _convert_heudiconv(dicom_dir, bids_root, subject=subject, session=session, heuristic=heuristic,
                              work_dir=work_dir, log_dir=log_dir)


# -- heuristic "auto": dcm2niix once per session, named from its sidecars ------------------------
_IMAGE_EXTS = (".nii.gz", ".nii", ".json", ".bval", ".bvec")
_CONVERT_LINE = re.compile(r"^Convert (\d+) DICOM as (.+?) \(")
_DATE_TAGS = ("AcquisitionDate", "SeriesDate", "ContentDate", "StudyDate")


@dataclass
class SessionSeries:
    """One DICOM series of a session, as read from its (pseudonymised) headers."""

    uid: str
    number: int | None
    description: str
    files: list[Path] = field(default_factory=list)
    date: str = ""  # YYYYMMDD of the (shifted) acquisition, "" when unreadable


def _read_ids(path: Path):
    """The few header elements a session scan needs (they all precede (0020,0011), so the rest of
    the header, private CSA blocks included, is not parsed)."""
    with open(path, "rb") as fp:
        return read_partial(fp, stop_when=lambda tag, vr, length: tag > 0x00200011)


def _same_series(path: Path, uid: bytes, sop: bytes) -> bool:
    """True when ``path``'s header holds this series UID and SOP class (a byte search of its first
    64 KiB; a UID followed by another digit or dot is a different UID)."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(65536)
    except OSError:
        return False
    for needle in (uid, sop):
        at = head.find(needle)
        if at < 0 or head[at + len(needle): at + len(needle) + 1] in (b".", *[bytes([c]) for c in b"0123456789"]):
            return False
    return True


def scan_session(dicom_dir: Path) -> tuple[list[SessionSeries], list[ConvertedSeries]]:
    """The image series under ``dicom_dir`` (in series-number order) and the non-image ones,
    already reported as ``skipped``. A file whose folder's previous file was of the same series
    (checked by a byte search) is not parsed again: sourcedata holds one folder per series."""
    series: dict[str, SessionSeries] = {}
    filtered: dict[str, ConvertedSeries] = {}
    last: tuple[Path, bytes, bytes, str] | None = None  # folder, uid, sop class, uid of the previous file
    for path in iter_dicom_files(dicom_dir):
        if last and last[0] == path.parent and _same_series(path, last[1], last[2]):
            if last[3] in series:
                series[last[3]].files.append(path)
            continue
        try:
            ds = _read_ids(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            log.warning("skipping unreadable file %s: %s", path.name, type(exc).__name__)
            last = None
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        sop = str(ds.get("SOPClassUID", ""))
        last = (path.parent, uid.encode(), sop.encode(), uid) if uid and sop else None
        sn = ds.get("SeriesNumber")
        try:
            number = int(sn) if sn not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        if not is_image_sop_class(sop):
            if uid not in filtered:
                what = getattr(ds.SOPClassUID, "name", sop) if "SOPClassUID" in ds else "no SOP class"
                filtered[uid] = ConvertedSeries(uid, number, str(ds.get("SeriesDescription", "")), "skipped", [],
                                                f"non-image object ({what})")
            continue
        s = series.get(uid)
        if s is None:
            date = next((str(ds.get(t) or "") for t in _DATE_TAGS if str(ds.get(t) or "").strip()), "")
            s = series[uid] = SessionSeries(uid, number, str(ds.get("SeriesDescription", "")), [], date)
        s.files.append(path)
    ordered = sorted(series.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))
    return ordered, [f for u, f in filtered.items() if u not in series]


def stage_series(series: list[SessionSeries], stage: Path) -> dict[str, int]:
    """Link each series' files under ``stage/sNNNN/`` named ``sNNNNfMMMMM`` (for sessions whose file
    names are not unique); returns {link name: series index}. Hard links (symbolic ones across
    file systems): a symbolic link costs 50 times more here."""
    hard = True
    names: dict[str, int] = {}
    for k, s in enumerate(series):
        folder = stage / f"s{k:04d}"
        folder.mkdir(parents=True)
        for i, f in enumerate(s.files):
            target = folder / f"s{k:04d}f{i:05d}"
            names[target.name] = k
            if hard:
                try:
                    os.link(f, target)
                    continue
                except OSError:
                    hard = False
            os.symlink(Path(f).resolve(), target)
    return names


@dataclass
class Dcm2niixRun:
    """One dcm2niix run on a session, mapped back to its DICOM series."""

    series: list[SessionSeries]  # image series, in series-number order
    skipped: list[ConvertedSeries]  # non-image series
    outputs: list  # pacs2bids.classify.Dcm2niixOutput, one per sidecar written
    merged: dict[int, int]  # series index stacked by dcm2niix into another series' image -> that index
    suffix: dict[str, str]  # output stem name -> what dcm2niix appended to its first file's name
    returncode: int
    log: str


_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _dcm2niix_cmd(src: Path, out: Path, sidecar_only: bool) -> list[str]:
    # -f %b: each output is named after its first DICOM file, so it maps back to that file's series
    return [dcm2niix_exe(), "-b", "o" if sidecar_only else "y", "-z", "y", "-f", "%b", "-o", str(out), str(src)]


def dcm2niix_session(roots: list[Path], private: Path, *, sidecar_only: bool = False) -> Dcm2niixRun:
    """Run dcm2niix once on the DICOM under ``roots`` (one session) into ``private/out``.

    When the session is one folder whose file names are all distinct (sourcedata: one file per
    pseudonymised SOP Instance UID), dcm2niix reads it in place while the headers are scanned;
    otherwise the files are linked into ``private/in`` under names of their own first. Its
    output (stdout and stderr) is in :attr:`Dcm2niixRun.log`."""
    private.mkdir(parents=True, exist_ok=True)
    out = private / "out"
    out.mkdir()
    files = [Path(dp) / n for root in roots for dp, _, names in os.walk(root, followlinks=True) for n in names]
    direct = len(roots) == 1 and len({f.name for f in files}) == len(files) and all(
        _SAFE_NAME.match(f.name) for f in files)
    log_path = private / "dcm2niix.log"
    with open(log_path, "w") as fh:
        if direct:
            proc = subprocess.Popen(_dcm2niix_cmd(roots[0], out, sidecar_only), stdout=fh, stderr=subprocess.STDOUT,
                                    env=child_env(), cwd=private)
            try:
                series, skipped = scan_session(roots[0])  # meanwhile
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            names = _name_keys(series)
            if names is None:  # two files' names differ only by their extension: name the links instead
                proc.kill()
                proc.wait()
                shutil.rmtree(out)
                out.mkdir()
                (private / "in").mkdir()
                names = stage_series(series, private / "in")
                proc = subprocess.Popen(_dcm2niix_cmd(private / "in", out, sidecar_only), stdout=fh,
                                        stderr=subprocess.STDOUT, env=child_env(), cwd=private)
        else:
            series, skipped = [], []
            for root in roots:
                a, b = scan_session(root)
                series += a
                skipped += b
            series.sort(key=lambda s: (s.number is None, s.number or 0, s.uid))
            (private / "in").mkdir()
            names = stage_series(series, private / "in")
            proc = subprocess.Popen(_dcm2niix_cmd(private / "in", out, sidecar_only), stdout=fh,
                                    stderr=subprocess.STDOUT, env=child_env(), cwd=private)
        returncode = proc.wait()
    log_text = f"$ dcm2niix (exit {returncode})\n" + log_path.read_text(errors="replace")
    outputs, merged, suffix = collect_outputs(series, out, log_text, names)
    return Dcm2niixRun(series, skipped, outputs, merged, suffix, returncode, log_text)


def _name_keys(series: list[SessionSeries]) -> dict[str, int] | None:
    """{file name as dcm2niix's %b may give it: series index}. %b drops the extension's letters
    ("x.dcm" -> "x."); the name without extension and the whole name are kept too. None when
    two files of different series would give the same key."""
    keys: dict[str, int] = {}
    for k, s in enumerate(series):
        for f in s.files:
            stem, dot, ext = f.name.rpartition(".")
            for key in {f.name, stem + dot, stem} - {""} if dot else {f.name}:
                if keys.setdefault(key, k) != k:
                    return None
    return keys


def _owner(stem: str, names: dict[str, int]) -> tuple[int, str] | None:
    """(series index, what dcm2niix appended) for an output named after one of ``names``."""
    for i in range(len(stem), 0, -1):
        k = names.get(stem[:i])
        if k is not None:
            return k, stem[i:]
    return None


def collect_outputs(series: list[SessionSeries], out: Path, log_text: str, names: dict[str, int]
                    ) -> tuple[list, dict[int, int], dict[str, str]]:
    """One :class:`~pacs2bids.classify.Dcm2niixOutput` per sidecar dcm2niix wrote in ``out``,
    {index of a series dcm2niix stacked into another one's image: index of that series}, and
    {output stem name: what dcm2niix appended to its first file's name}.

    dcm2niix stacks some series into one image (Siemens XA "MFSPLIT": one series per volume);
    the image is named after one of them, and the others are found by the number of files
    dcm2niix reports for it ("Convert N DICOM as ..."): the neighbouring series (in series
    order) left without an image of their own whose files make up the difference. Sidecar-only
    runs print no such count: there, the following series of the same description left without
    an image are taken as stacked."""
    from pacs2bids.classify import read_output

    outputs = []
    suffix: dict[str, str] = {}
    converted: dict[int, int] = {}
    for line in log_text.splitlines():
        m = _CONVERT_LINE.match(line.strip())
        if m:
            own = _owner(Path(m.group(2)).name, names)
            if own:
                converted[own[0]] = converted.get(own[0], 0) + int(m.group(1))
    for js in sorted(out.glob("*.json")):
        stem = js.name[: -len(".json")]
        own = _owner(stem, names)
        if own is None:
            continue  # a file the header scan did not take (unreadable, or not an image)
        k, suffix[stem] = own
        s = series[k]
        outputs.append(read_output(js.with_name(stem), s.uid, s.number))
    seen = {_owner(o.stem.name, names)[0] for o in outputs}
    orphan = [k not in seen for k in range(len(series))]
    merged: dict[int, int] = {}
    for k in sorted(converted):
        want = converted[k]
        if want <= len(series[k].files):
            continue
        found = None
        lo = k
        while found is None and lo >= 0 and (lo == k or orphan[lo]):
            total = sum(len(series[j].files) for j in range(lo, k + 1))
            hi = k
            while total < want and hi + 1 < len(series) and orphan[hi + 1]:
                hi += 1
                total += len(series[hi].files)
            if total == want:
                found = [j for j in range(lo, hi + 1) if j != k]
            lo -= 1
        for j in found or []:
            merged[j] = k
            orphan[j] = False
    if not converted:  # -b o prints no "Convert N DICOM" line: a run of same-named series without image
        for j in range(1, len(series)):
            if orphan[j] and (not orphan[j - 1] or j - 1 in merged) and series[j].description and \
                    series[j].description == series[j - 1].description:
                merged[j] = merged.get(j - 1, j - 1)
                orphan[j] = False
    return outputs, merged, suffix


def _acq_time(sidecar: dict, date: str) -> str:
    """scans.tsv acq_time (BIDS datetime, YYYY-MM-DDThh:mm:ss[.ffffff]) from the DICOM's (shifted)
    date and the sidecar's AcquisitionTime; n/a when either is missing or malformed."""
    t = str(sidecar.get("AcquisitionTime") or "")
    d = re.sub(r"\D", "", date or "")
    mt = re.fullmatch(r"(\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?", t)
    if len(d) != 8 or not mt or not (1 <= int(d[4:6]) <= 12 and 1 <= int(d[6:8]) <= 31):
        return "n/a"
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}T{mt.group(1)}:{mt.group(2)}:{mt.group(3)}{mt.group(4) or ''}"


def write_scans(bids_root: Path, subject: str, session: str | None, rows: dict[str, str]) -> Path | None:
    """Write (or update) the session's ``*_scans.tsv``: {path relative to the session folder: acq_time}.
    Rows of files that no longer exist are dropped."""
    sess = bids_root / _session_rel(subject, session)
    name = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_scans.tsv"
    path = sess / name
    merged: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines()[1:]:
            parts = line.split("\t")
            if parts and parts[0]:
                merged[parts[0]] = parts[1] if len(parts) > 1 else "n/a"
    merged.update(rows)
    merged = {k: v for k, v in merged.items() if (sess / k).exists()}
    if not merged:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("filename\tacq_time\n" + "".join(f"{k}\t{v}\n" for k, v in sorted(merged.items())))
    return path


def add_intended_for(bids_root: Path, subject: str, session: str | None) -> list[str]:
    """Give every field map of the session (not its magnitude images) an ``IntendedFor`` listing
    the session's func, dwi and perf images, as BIDS URIs. Returns the sidecars changed."""
    sess = bids_root / _session_rel(subject, session)
    targets = sorted(p.relative_to(bids_root).as_posix() for d in ("func", "dwi", "perf")
                     for p in (sess / d).glob("*.nii*") if (sess / d).is_dir())
    changed = []
    for js in sorted((sess / "fmap").glob("*.json")) if (sess / "fmap").is_dir() else []:
        if re.search(r"_magnitude\d?\.json$", js.name):
            continue
        meta = json.loads(js.read_text())
        if targets:
            meta["IntendedFor"] = [f"bids::{t}" for t in targets]
        else:
            meta.pop("IntendedFor", None)
        js.write_text(json.dumps(meta, indent=2) + "\n")
        changed.append(js.relative_to(bids_root).as_posix())
    return changed


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
    ``fills`` (per suffix) are the sidecar fields the project gives (:func:`_move_kept` writes them)."""
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
    """Move one named image's files to ``rel`` + their extensions; TaskName and aslcontext.tsv as BIDS
    asks, and the fields the project gives (``given``) where the sidecar lacks them."""
    files = []
    for ext in _IMAGE_EXTS:
        src = d.output.stem.with_name(d.output.stem.name + ext)
        if src.exists():
            dest = bids_root / (rel + ext)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dest))
            files.append(rel + ext)
    task = d.entities.get("task")
    side = bids_root / (rel + ".json")
    if side.exists() and (task or given):
        meta = json.loads(side.read_text())
        added = {k: v for k, v in (given or {}).items() if k not in meta}  # never over what the images say
        if task and not meta.get("TaskName"):  # BIDS requires TaskName beside every task-<label> image
            added["TaskName"] = task
        if added:
            meta.update(added)
            side.write_text(json.dumps(meta, indent=2) + "\n")
    context = getattr(d, "aslcontext", None)
    if context and rel.endswith("_asl"):
        (bids_root / (rel[: -len("_asl")] + "_aslcontext.tsv")).write_text(
            "volume_type\n" + "".join(f"{v}\n" for v in context))
        files.append(rel[: -len("_asl")] + "_aslcontext.tsv")
    return files


def _convert_dcm2niix(dicom_dir: Path, bids_root: Path, *, subject: str, session: str | None, work_dir: Path,
                      log_dir: Path, fills: Mapping[str, Mapping[str, Any]]) -> ConversionResult:
    from pacs2bids.classify import classify_session

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
        log.info("converted %d series of %s with dcm2niix", len(run.series), label)
        kept_log = ""

        def failed_log() -> str:
            nonlocal kept_log
            kept_log = kept_log or _keep_log(log_dir, f"dcm2niix-{label}", run.log, bids_root)
            return kept_log

        if not run.outputs and run.returncode != 0:
            raise ConversionError(f"dcm2niix failed (exit {run.returncode}) on {label} and wrote no image; "
                                  f"its log is kept in {failed_log()}")
        verdicts = judge_session(run, classify_session(run.outputs) if run.outputs else [], subject, session, fills)
        stale = clear_session(bids_root, subject, session)
        if stale:
            log.info("%s: %d file(s) of an earlier conversion of this session replaced", label, len(stale))
        scans: dict[str, str] = {}
        written: dict[str, list[str]] = {}
        for v in verdicts:
            for d in v.kept:
                files = _move_kept(d, d.relpath(subject, session), bids_root, fills.get(d.suffix, {}))
                image = next((f for f in files if f.endswith((".nii.gz", ".nii"))), None)
                if image:
                    rel = Path(image).relative_to(_session_rel(subject, session)).as_posix()
                    scans[rel] = _acq_time(d.output.sidecar, v.series.date)
                written.setdefault(v.series.uid, []).extend(files)
        if written:
            add_intended_for(bids_root, subject, session)
            write_scans(bids_root, subject, session, scans)
        for v in verdicts:
            owner = (v.stacked_with or v.series).uid
            outs = sorted(written.get(owner, [])) if v.status == "converted" else []
            reason = v.reason
            if reason.startswith(NO_IMAGE):
                reason = f"{NO_IMAGE}; its log is kept in {failed_log()}"
            s = v.series
            results.append(ConvertedSeries(s.uid, s.number, s.description, v.status, outs, reason))
        for res in results:
            if res.status != "converted":
                log.info("%s series %s %s: %s", label, res.series_number, res.status, res.reason)
        return ConversionResult(results)
    finally:
        shutil.rmtree(private, ignore_errors=True)
