"""Convert one pseudonymised study (one BIDS session) to BIDS with heudiconv + dcm2niix.

``convert_session`` reads only ``dicom_dir`` (the pseudonymised copy, one folder per series),
drops objects dcm2niix cannot convert (SR, presentation states, raw data: heudiconv fails the
whole session on some of them), runs the heudiconv CLI once for the session, and maps every
output back to the series it came from through heudiconv's own tables (``dicominfo*.tsv``,
``*.edit.txt``). Requirements C1, C2 (dcm2niix through HeuDiConv).
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
import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

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


def convert_session(dicom_dir: Path, bids_root: Path, *, subject: str, session: str | None,
                    heuristic: str, work_dir: Path) -> ConversionResult:
    """Convert the series under ``dicom_dir`` (one study) into ``bids_root``.

    Takes the pseudonymised DICOM folder of one study, the BIDS root being built, the subject
    and session labels (without ``sub-``/``ses-``; give a session whenever the subject has
    several studies), a heuristic name (shipped in ``heuristics/``) or path, and a private
    working folder. Returns one :class:`ConvertedSeries` per series found (non-image objects
    and series the heuristic leaves out are ``skipped`` with their reason). Raises
    :class:`ConversionError` (with heudiconv's stderr tail) when heudiconv or dcm2niix fails,
    FileNotFoundError for an unknown heuristic.
    """
    dicom_dir, bids_root, work_dir = Path(dicom_dir).resolve(), Path(bids_root).resolve(), Path(work_dir).resolve()
    heur = heuristic_file(heuristic).resolve()
    module = _load_module(heur)
    custom = callable(getattr(module, "grouping", None))
    label = f"{subject}" + (f"_ses-{session}" if session else "")
    stage = work_dir / f"heudiconv-input-{label}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    bids_root.mkdir(parents=True, exist_ok=True)
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
    env = dict(os.environ, NIPYPE_NO_ET="1", NO_ET="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    log.info("converting %d files of %s with heudiconv (heuristic %s)", kept, label, heur.name)
    proc = subprocess.run(cmd, cwd=work_dir, env=env, capture_output=True, text=True)
    log_file = work_dir / f"heudiconv-{label}.log"
    log_file.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-_TAIL:]
        raise ConversionError(
            f"heudiconv failed (exit {proc.returncode}) on sub-{label} with heuristic {heur.name}; "
            f"full log in {log_file}. stderr tail:\n{tail}")

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
                status, reason = "failed", f"heudiconv produced no image for {prefix} (see {log_file.name})"
        for k, uid in enumerate(uids):
            results.append(ConvertedSeries(uid, (sn + k) if (sn is not None and len(uids) > 1) else sn,
                                           desc, status, list(outs), reason))
    # keep heudiconv's tables with the work folder, out of the dataset
    dest = work_dir / f"heudiconv-info-{label}"
    if dest.exists():
        shutil.rmtree(dest)
    if info.exists():
        shutil.move(str(info), str(dest))
    shutil.rmtree(stage, ignore_errors=True)
    for res in results:
        if res.status == "skipped":
            log.info("series %s (%s) left out: %s", res.series_number, res.series_description, res.reason)
    return ConversionResult(results)
