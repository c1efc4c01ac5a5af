"""A corpus of DICOM series classified as the classifier's tests and benchmark measure it.

Every series (grouped by StudyInstanceUID and SeriesInstanceUID; the Philips enhanced export, in a
folder named ``enh``, kept apart from its classic twin) is converted once with dcm2niix into its own
folder, and each study's outputs are classified together, as one session. Reference folders
(``Ref``) are skipped; gzipped files are decompressed first.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from pacs2bids.convert.classify import Decision, classify_session
from pacs2bids.convert.dcm2niix import child_env, dcm2niix_exe
from pacs2bids.convert.facts import read_output
from pacs2bids.errors import ConversionError


@dataclass(frozen=True)
class ClassifiedOutput:
    """One image dcm2niix wrote for a series of the corpus, and its decision."""

    session: str              # StudyInstanceUID (+ "enh" for the Philips enhanced export): one BIDS session
    series_uid: str
    folder: str               # folder of the series' first file, relative to the corpus root
    series_number: int | None
    modality: str
    decision: Decision


@dataclass
class CorpusRun:
    outputs: list[ClassifiedOutput] = field(default_factory=list)
    convert_s: float = 0.0    # dcm2niix, every series
    classify_s: float = 0.0   # the classifier, every session


def _header(p: Path):
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p) as f:
                return pydicom.dcmread(f, stop_before_pixels=True)
        return pydicom.dcmread(p, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError):
        return None


def _series(root: Path) -> tuple[dict[tuple[str, str], list[Path]], dict[tuple[str, str], tuple[str, int | None, str]]]:
    series: dict[tuple[str, str], list[Path]] = defaultdict(list)
    where: dict[tuple[str, str], tuple[str, int | None, str]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or "Ref" in rel.parts:
            continue
        ds = _header(p)
        if ds is None or "SeriesInstanceUID" not in ds:
            continue
        key = (f"{ds.StudyInstanceUID}{'enh' if 'enh' in rel.parts else ''}", str(ds.SeriesInstanceUID))
        series[key].append(p)
        sn = ds.get("SeriesNumber")
        where.setdefault(key, (str(rel.parent), int(sn) if sn not in (None, "") else None, str(ds.get("Modality", ""))))
    return series, where


def _link(files: list[Path], src: Path) -> None:
    for p in files:
        if p.name.endswith(".gz"):
            with gzip.open(p) as f, open(src / p.name[:-3], "wb") as g:
                shutil.copyfileobj(f, g)
        else:
            (src / p.name).symlink_to(p)


def classify_corpus(root: Path, work: Path, *, images: bool = True) -> CorpusRun:
    """Convert every series under ``root`` (into ``work``) and classify each session's outputs;
    ``images=False``: sidecars only (``dcm2niix -b o``). Raises ConversionError naming the folder
    when dcm2niix fails on a series (exit 2, "no images", is not a failure)."""
    series, where = _series(root)
    sessions: dict[str, list[tuple[tuple[str, str], object]]] = defaultdict(list)
    run = CorpusRun()
    t0 = time.perf_counter()
    for n, (key, files) in enumerate(sorted(series.items())):
        src, out = work / "in" / f"{n:04d}", work / "out" / f"{n:04d}"
        src.mkdir(parents=True)
        out.mkdir(parents=True)
        _link(files, src)
        proc = subprocess.run([dcm2niix_exe(), "-b", "y" if images else "o", "-z", "n", "-f", "s%s", "-o", str(out),
                               str(src)], capture_output=True, text=True, env=child_env())
        if proc.returncode not in (0, 2):
            raise ConversionError(f"dcm2niix failed (exit {proc.returncode}) on {where[key][0]}: {proc.stderr[-500:]}")
        for js in sorted(out.glob("*.json")):
            sessions[key[0]].append((key, read_output(js.with_suffix(""), key[1], where[key][1])))
    t1 = time.perf_counter()
    for session, items in sessions.items():
        for (key, _), d in zip(items, classify_session([o for _, o in items])):
            folder, number, modality = where[key]
            run.outputs.append(ClassifiedOutput(session, key[1], folder, number, modality, d))
    run.convert_s, run.classify_s = t1 - t0, time.perf_counter() - t1
    return run
