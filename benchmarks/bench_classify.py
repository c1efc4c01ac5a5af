"""Share of MR series that classify.py names, per corpus (issue 9, "Figures").

    .venv/bin/python benchmarks/bench_classify.py [ROOT ...]

Default roots: the bundled sample, ../shared/data/dicom and ../shared/data/dicom-vendors (those present).
Every DICOM series (grouped by StudyInstanceUID and SeriesInstanceUID; the Philips enhanced export kept
apart from its classic twin, as their README asks) is converted once with dcm2niix into a temporary folder,
each study's outputs are classified together, and per corpus it prints:

- MR series: series with Modality MR that dcm2niix wrote at least one image for;
- named: every output of the series got a BIDS name;
- left out by rule: derived images and localizers (not raw data, so not counted against the share);
- unclassified: anything else, with its reason (what a project heuristic must add);
- the share: named / (MR series - left out by rule).
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from pacs2bids.convert.classify import classify_session, read_output

REPO = Path(__file__).resolve().parents[1]


def _header(p: Path):
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p) as f:
                return pydicom.dcmread(f, stop_before_pixels=True)
        return pydicom.dcmread(p, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError):
        return None


def measure(root: Path, work: Path) -> dict:
    dcm2niix = shutil.which("dcm2niix")
    if not dcm2niix:
        sys.exit("dcm2niix is not on PATH: use the project's .venv (pip install dcm2niix)")
    series: dict[tuple[str, str], list[Path]] = defaultdict(list)
    modality: dict[tuple[str, str], str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or "Ref" in rel.parts:
            continue
        ds = _header(p)
        if ds is None or "SeriesInstanceUID" not in ds:
            continue
        key = (f"{ds.StudyInstanceUID}{'enh' if 'enh' in rel.parts else ''}", str(ds.SeriesInstanceUID))
        series[key].append(p)
        modality.setdefault(key, str(ds.get("Modality", "")))
    sessions: dict[str, list] = defaultdict(list)
    t0 = time.perf_counter()
    for n, (key, files) in enumerate(sorted(series.items())):
        src, out = work / "in" / f"{n:04d}", work / "out" / f"{n:04d}"
        src.mkdir(parents=True)
        out.mkdir(parents=True)
        for p in files:
            if p.name.endswith(".gz"):
                with gzip.open(p) as f, open(src / p.name[:-3], "wb") as g:
                    shutil.copyfileobj(f, g)
            else:
                (src / p.name).symlink_to(p)
        subprocess.run([dcm2niix, "-b", "y", "-z", "n", "-f", "s%s", "-o", str(out), str(src)],
                       capture_output=True, check=False)
        for js in sorted(out.glob("*.json")):
            sessions[key[0]].append((key, read_output(js.with_suffix(""), key[1], None)))
    t1 = time.perf_counter()
    per_series: dict[tuple[str, str], list] = defaultdict(list)
    for items in sessions.values():
        for (key, _), d in zip(items, classify_session([o for _, o in items])):
            per_series[key].append(d)
    t2 = time.perf_counter()
    mr = {k: v for k, v in per_series.items() if modality[k] == "MR"}
    named = [k for k, ds in mr.items() if all(d.datatype for d in ds)]
    by_rule = [k for k, ds in mr.items() if k not in named and
               all(d.datatype or d.reason.startswith(("derived image", "localizer")) for d in ds)]
    unclassified = {k: sorted({d.reason for d in ds if not d.datatype})
                    for k, ds in mr.items() if k not in named and k not in by_rule}
    return {"mr": len(mr), "named": len(named), "by_rule": len(by_rule), "unclassified": unclassified,
            "other": len(per_series) - len(mr), "convert_s": t1 - t0, "classify_s": t2 - t1}


def main(argv: list[str]) -> None:
    roots = [Path(a) for a in argv] or [
        Path(str(resources.files("pacs2bids") / "data" / "sample")),
        REPO.parent / "shared" / "data" / "dicom",
        REPO.parent / "shared" / "data" / "dicom-vendors",
    ]
    for root in roots:
        if not root.is_dir():
            print(f"{root}: not here, skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(root, Path(tmp))
        counted = r["mr"] - r["by_rule"]
        share = r["named"] / counted if counted else 1.0
        print(f"{root}: {r['mr']} MR series, {r['named']} named, {r['by_rule']} left out by rule "
              f"(derived/localizer), {len(r['unclassified'])} unclassified -> {share:.0%} of MR series named; "
              f"{r['other']} non-MR series; dcm2niix {r['convert_s']:.1f} s, classify {r['classify_s'] * 1000:.0f} ms")
        for reasons in r["unclassified"].values():
            for reason in reasons:
                print(f"    unclassified: {reason}")


if __name__ == "__main__":
    main(sys.argv[1:])
