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

import sys
import tempfile
from collections import defaultdict
from importlib import resources
from pathlib import Path

from pacs2bids.convert.corpus import classify_corpus

REPO = Path(__file__).resolve().parents[1]


def measure(root: Path, work: Path) -> dict:
    run = classify_corpus(root, work)
    per_series: dict[tuple[str, str], list] = defaultdict(list)
    modality: dict[tuple[str, str], str] = {}
    for o in run.outputs:
        per_series[(o.session, o.series_uid)].append(o.decision)
        modality[(o.session, o.series_uid)] = o.modality
    mr = {k: v for k, v in per_series.items() if modality[k] == "MR"}
    named = [k for k, ds in mr.items() if all(d.datatype for d in ds)]
    by_rule = [k for k, ds in mr.items() if k not in named and
               all(d.datatype or d.reason.startswith(("derived image", "localizer")) for d in ds)]
    unclassified = {k: sorted({d.reason for d in ds if not d.datatype})
                    for k, ds in mr.items() if k not in named and k not in by_rule}
    return {"mr": len(mr), "named": len(named), "by_rule": len(by_rule), "unclassified": unclassified,
            "other": len(per_series) - len(mr), "convert_s": run.convert_s, "classify_s": run.classify_s}


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
