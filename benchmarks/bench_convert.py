"""The conversion stage against dcm2niix alone, on the same series, in one run.

    .venv/bin/python benchmarks/bench_convert.py [--repeat 3] [--corpus ../shared/data/dicom]

For each session (one XA30 session from ``dcm_qa_xa30i``, Siemens and Philips field maps, GE
EPI, Philips DTI; from ``../shared/data/dicom-vendors``: Siemens mosaic, Philips enhanced and ASL,
Canon/Toshiba, XA60, slice timing; and the bundled sample's studies), the DICOM is first copied decompressed into
a temporary folder, then, alternately, ``--repeat`` times each:

- dcm2niix alone: ``dcm2niix -b y -z y`` on the session folder (the baseline);
- the conversion stage: :func:`pacs2bids.convert.convert_session` with ``heuristic: auto``
  (header scan, dcm2niix once, classification, files moved to their BIDS names, scans.tsv,
  IntendedFor).

Prints the best time of each, their ratio (goal <= 1.5), and the share of image series the
stage converted (what names them is pacs2bids.convert.classify). The last line sums every session.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _bidscheck import DCM2NIIX_EXE, copy_decompressed  # noqa: E402

from pacs2bids.convert import convert_session  # noqa: E402

SESSIONS = [
    ("xa30", "dcm_qa_xa30i"),
    ("siemens-fmap", "dcm_qa_fmap/In/Siemens"),
    ("philips-fmap", "dcm_qa_fmap/In/Philips"),
    ("ge-epi", "dcm_qa_nih/In/20180918GE"),
    ("philips-dti", "dcm_qa_philips_dwi"),
]
VENDORS = [("mosaic", "dcm_qa_mosaic"), ("philips-enh", "dcm_qa_philips_enh"), ("philips-asl", "dcm_qa_philips_asl"),
           ("toshiba", "dcm_qa_toshiba"), ("xa60", "dcm_qa_xa60"), ("stc", "dcm_qa_stc")]
SAMPLE = ["dcm_qa_ge", "dcm_qa_nih", "dcm_qa_philips", "dcm_qa_fmap"]


def best(fn, repeat: int) -> tuple[float, object]:
    times, last = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - t0)
    return min(times), last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "dicom"))
    ap.add_argument("--vendors", default=str(REPO.parent / "shared" / "data" / "dicom-vendors"))
    args = ap.parse_args()
    corpus, vendors = Path(args.corpus), Path(args.vendors)
    sample = Path(str(resources.files("pacs2bids") / "data" / "sample"))
    todo = [(name, corpus / rel) for name, rel in SESSIONS if (corpus / rel).is_dir()]
    todo += [(name, vendors / rel) for name, rel in VENDORS if (vendors / rel).is_dir()]
    todo += [(f"sample-{f.removeprefix('dcm_qa_')}", sample / f) for f in SAMPLE]
    if len(todo) == len(SAMPLE):
        print(f"(corpus not found at {corpus}: sample only)")
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        print(f"{'session':<16}{'series':>7}{'dcm2niix s':>12}{'stage s':>10}{'ratio':>8}{'converted':>11}")
        total_d = total_s = 0.0
        for name, src in todo:
            dicom = copy_decompressed(src, tmp / name / "dicom")

            def direct():
                out = tmp / name / "direct"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                subprocess.run([DCM2NIIX_EXE, "-b", "y", "-z", "y", "-o", str(out), str(dicom)],
                               capture_output=True, check=True)

            def stage():
                root = tmp / name / "bids"
                shutil.rmtree(root, ignore_errors=True)
                return convert_session(dicom, root, subject="b", session="1", heuristic="auto",
                                       work_dir=tmp / name / "work")

            d = s = float("inf")
            result = None
            for _ in range(args.repeat):  # alternate, so that both see the same machine load
                d = min(d, best(direct, 1)[0])
                t, result = best(stage, 1)
                s = min(s, t)
            images = [x for x in result.series if not x.reason.startswith("non-image")]
            done = sum(x.status == "converted" for x in images)
            total_d, total_s = total_d + d, total_s + s
            print(f"{name:<16}{len(images):>7}{d:>12.2f}{s:>10.2f}{s / d:>8.2f}{done:>6}/{len(images):<4}")
        print(f"{'all':<16}{'':>7}{total_d:>12.2f}{total_s:>10.2f}{total_s / total_d:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
