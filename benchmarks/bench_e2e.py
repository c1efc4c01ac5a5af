"""End to end against its floors: one Orthanc, the floors, the anchors and ``pacs2bids run``, in one run.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'      # dicognito, pinned
    .venv/bin/python benchmarks/bench_e2e.py [--corpus shared|sample] [--copies 1,10] [--studies N] [--quick] [--transports dicomweb,c-get] [--base COMMIT] [--json FILE]

Starts Orthanc on loopback (DICOMweb on), loads the corpus (``--copies N``: N copies, each with new
Study/Series/SOP Instance UIDs and patient IDs; ``--studies N``: its first N studies only), then times
- the floors: raw WADO-RS of every study (bytes dropped); one pynetdicom association C-GETting every
  study (files written); a bare pydicom read + write of every file; dcm2niix ``-z y`` of every series
  folder; every byte read once (beside the leak scan);
- the anchors (skipped by ``--quick``): dcmtk getscu study by study, dicognito, plain heudiconv;
- ``pacs2bids run SPEC --json`` over DICOMweb and over C-GET: wall time (Prefect start-up included) and
  peak RSS; each stage from the summary's ``stage_seconds`` beside its floor ("n/a" while absent).
It prints one table per corpus size, the issue's goals with PASS/MISS, and with several ``--copies`` the
time per study and peak RSS of each size. Details and latest figures: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_steps as steps  # noqa: E402  (the benchmark's own helper module, beside this file)
from pacs2bids.orthanc import Orthanc, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPORA = {"shared": REPO.parent / "shared" / "data" / "dicom", "sample": REPO / "src" / "pacs2bids" / "data" / "sample"}
STAGES = ("query", "retrieve", "pseudonymise", "convert", "released", "finalise", "validate", "lineage", "leak_scan",
          "publish")
TRANSPORTS = ("dicomweb", "c-get")
GOALS = {"dicomweb": 1.5, "c-get": 1.1}  # issue 12: x the sum of the floors (DICOMweb), x the transfer floor (C-GET)


def stage_floor(stage: str, transport: str) -> str | None:
    """The floor a stage is set beside (None: it has none)."""
    return {"retrieve": "wado_rs" if transport == "dicomweb" else "c_get", "pseudonymise": "pydicom_rw",
            "convert": "dcm2niix", "leak_scan": "read_once"}.get(stage)


def end_to_end_floor(floors: dict, transport: str) -> float:
    """DICOMweb: transfer, read + write every file once, dcm2niix. C-GET: the transfer alone (the PACS bounds it)."""
    if transport == "dicomweb":
        return floors["wado_rs"] + floors["pydicom_rw"] + floors["dcm2niix"]
    return floors["c_get"]


def measure(root: Path, copies: int, studies: int, quick: bool, tmp: Path,
            transports: tuple[str, ...] = TRANSPORTS, base: Path | None = None) -> dict:
    """Everything, for one corpus size, on one fresh Orthanc. Without C-GET among ``transports``, its
    floor is not taken (None) and the bare pydicom floor reads the uploaded files kept on disk."""
    cget = "c-get" in transports
    with Orthanc(workdir=tmp / "orthanc") as o:
        corpus = steps.load_corpus(o, root, copies, studies, keep=None if cget else tmp / "cget")
        print(f"corpus: {root} x{copies}: {corpus.instances} instances, {corpus.size / 1e6:.0f} MB, "
              f"{len(corpus.study_patient)} studies, {len(corpus.patients)} patients", flush=True)
        floors, anchors = {}, {}
        floors["wado_rs"], _ = steps.wado_floor(o, corpus)
        floors["c_get"] = steps.cget_floor(o, corpus, tmp / "cget")[0] if cget else None
        floors["pydicom_rw"], _ = steps.pydicom_floor(tmp / "cget", tmp / "rw")
        floors["dcm2niix"], _ = steps.dcm2niix_floor(tmp / "rw", tmp / "nii")
        floors["read_once"], _ = steps.read_floor(tmp / "rw")
        if not quick and cget:
            for key, run in (("getscu", lambda: steps.getscu_anchor(o, corpus, tmp / "getscu")),
                             ("dicognito", lambda: steps.dicognito_anchor(tmp / "cget", tmp / "dicognito")),
                             ("heudiconv", lambda: steps.heudiconv_anchor(tmp / "cget", tmp / "heudiconv"))):
                try:
                    anchors[key], _ = run()
                except (RuntimeError, subprocess.SubprocessError) as exc:  # an anchor failing is no reason to stop
                    print(f"bench_e2e: anchor {key} failed, reported n/a: {exc}", file=sys.stderr)
                    anchors[key] = None
        runs = {}
        for transport in transports:
            for key, code in ((f"{transport} (base)", base), (transport, None)) if base else ((transport, None),):
                spec = steps.write_spec(tmp / f"run-{key.replace(' ', '')}", o, corpus, transport, free_port())
                runs[key] = steps.pacs2bids_run(spec, code)
                print(f"pacs2bids run over {key}: {runs[key]['seconds']:.1f} s, {runs[key]['cpu_seconds']:.1f} s "
                      f"of CPU, exit {runs[key]['exit_code']} ({runs[key]['state']})", flush=True)
                print(timeline(runs[key].get("timeline")), flush=True)
    return {"copies": copies, "studies": len(corpus.study_patient), "patients": len(corpus.patients),
            "instances": corpus.instances, "megabytes": corpus.size / 1e6, "floors": floors, "anchors": anchors,
            "runs": runs, "goals": goals(floors, runs)}


def timeline(rows: list[dict] | None) -> str:
    """The run's studies in the order submitted: instances, then each stage's start-end (s after the
    first submission); empty for a version without the summary's timeline."""
    def span(s):
        return f"{s[0]:6.1f}-{s[1]:6.1f}" if s else "      n/a     "
    return "\n".join(f"  {r['study']:<28} {r['instances']:>5} inst  retrieve {span(r['retrieve'])}  "
                     f"pseudonymise {span(r['pseudonymise'])}  convert {span(r['convert'])}" for r in rows or [])


def goals(floors: dict, runs: dict) -> dict:
    out = {}
    for key in runs:
        transport = key.split(" ")[0]
        ratio = runs[key]["seconds"] / end_to_end_floor(floors, transport)
        out[key] = {"ratio": ratio, "goal": GOALS[transport], "pass": ratio <= GOALS[transport]}
    return out


FLOOR_ROWS = (("wado_rs", "floor: raw WADO-RS, every study"), ("c_get", "floor: pynetdicom C-GET, one association"),
              ("pydicom_rw", "floor: pydicom read + write"), ("dcm2niix", "floor: dcm2niix -z y, every series"),
              ("read_once", "floor: every byte read once"))
ANCHOR_ROWS = (("getscu", "anchor: dcmtk getscu, study by study", "c_get"),
               ("dicognito", "anchor: dicognito", "pydicom_rw"),
               ("heudiconv", "anchor: heudiconv convertall", "dcm2niix"))


def _row(step: str, seconds: float | None, floor: float | None, beside: str = "") -> str:
    secs = "n/a" if seconds is None else f"{seconds:.2f}"
    ratio = "" if seconds is None or not floor else f"{seconds / floor:.2f}x"
    return f"{step:<44} {secs:>9} {ratio:>9}  {beside}"


def table(fig: dict) -> str:
    floors = fig["floors"]
    lines = [f"{'step':<44} {'seconds':>9} {'x floor':>9}  floor", "-" * 90]
    lines += [_row(label, floors[key], floors[key], key) for key, label in FLOOR_ROWS if floors[key] is not None]
    for key, label, floor in ANCHOR_ROWS:
        if key in fig["anchors"]:
            lines.append(_row(label, fig["anchors"][key], floors[floor], floor))
    for key in fig["runs"]:
        run, transport = fig["runs"][key], key.split(" ")[0]
        beside = "wado_rs + pydicom_rw + dcm2niix" if transport == "dicomweb" else "c_get"
        lines.append(_row(f"pacs2bids run, {key}", run["seconds"], end_to_end_floor(floors, transport), beside))
        stages = run["stage_seconds"] or {}
        for stage in STAGES:
            floor = stage_floor(stage, transport)
            lines.append(_row(f"  stage {stage}", stages.get(stage), floors.get(floor), floor or ""))
    lines.append("-" * 90)
    for key in fig["runs"]:
        lines.append(f"peak RSS, pacs2bids run {key}: {fig['runs'][key]['peak_rss_mb']:.0f} MB")
    for key, goal in fig["goals"].items():
        what = "the sum of the floors" if key.startswith("dicomweb") else "the transfer floor"
        lines.append(f"GOAL end to end over {key} <= {goal['goal']}x {what}: {goal['ratio']:.2f}x "
                     f"{'PASS' if goal['pass'] else 'MISS'}")
    return "\n".join(lines)


def scaling(figures: list[dict]) -> str:
    transports = list(figures[0]["runs"])
    lines = [f"{'copies':>6} {'studies':>7} " + " ".join(f"{t + ' s/study':>17} {t + ' peak MB':>17}"
                                                          for t in transports)]
    for fig in figures:
        cells = [f"{fig['runs'][t]['seconds'] / fig['studies']:17.2f} {fig['runs'][t]['peak_rss_mb']:17.0f}"
                 for t in transports]
        lines.append(f"{fig['copies']:6d} {fig['studies']:7d} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", choices=sorted(CORPORA), default=None,
                    help="shared (../shared/data/dicom; the default when present) or sample (the bundled one)")
    ap.add_argument("--copies", default="1", help="corpus copies, e.g. 1 or 1,10 (each size on a fresh Orthanc)")
    ap.add_argument("--studies", type=int, default=0, help="keep only the corpus's first N studies (0: all)")
    ap.add_argument("--quick", action="store_true", help="skip the slow anchors (getscu, dicognito, heudiconv)")
    ap.add_argument("--transports", default=",".join(TRANSPORTS),
                    help="pacs2bids runs to time: dicomweb, c-get or both (without c-get, its floor and the "
                         "anchors are skipped)")
    ap.add_argument("--base", metavar="COMMIT", help="also time pacs2bids as it was at this commit of this "
                    "repository (before and after in one run), each run just before the current code's")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    ap.add_argument("--sample", type=Path, metavar="DIR", help="profile the current code's runs: where their "
                    "process's CPU goes, per thread and function (benchmarks/sampler.py), one report each in DIR")
    ap.add_argument("--memory", type=Path, metavar="DIR", help="where the current code's runs hold memory over "
                    "time, under tracemalloc (benchmarks/memprobe.py; slower), one report each in DIR")
    args = ap.parse_args(argv)
    transports = tuple(t for t in TRANSPORTS if t in args.transports.split(","))
    unknown = set(args.transports.split(",")) - set(TRANSPORTS)
    if unknown or not transports:
        print(f"bench_e2e: --transports takes {', '.join(TRANSPORTS)} (comma-separated), not {args.transports}",
              file=sys.stderr)
        return 2
    name = args.corpus or ("shared" if CORPORA["shared"].is_dir() else "sample")
    root = CORPORA[name]
    if not root.is_dir():
        print(f"bench_e2e: the {name} corpus {root} is not there", file=sys.stderr)
        return 2
    missing = [tool for tool in ("getscu",) if not args.quick and not shutil.which(tool)]
    if missing:
        print("bench_e2e: dcmtk is not installed (apt-get install dcmtk), or run with --quick", file=sys.stderr)
        return 2
    copies = [int(c) for c in args.copies.split(",")]
    if args.sample:
        args.sample.mkdir(parents=True, exist_ok=True)
        os.environ[steps.SAMPLE_ENV] = str(args.sample.resolve())
    if args.memory:
        args.memory.mkdir(parents=True, exist_ok=True)
        os.environ[steps.MEMORY_ENV] = str(args.memory.resolve())
    figures = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-code-") as code:
        os.environ["PREFECT_HOME"] = str(steps.migrated_prefect_home(Path(code) / "prefect"))
        base = steps.base_package(args.base, Path(code) / "base") if args.base else None
        for n in copies:
            with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
                figures.append(measure(root, n, args.studies, args.quick, Path(tmp), transports, base))
            print(table(figures[-1]), flush=True)
    if len(figures) > 1:
        print("\nscaling (time per study and peak RSS of the run):\n" + scaling(figures))
    if args.json:
        args.json.write_text(json.dumps({"corpus": name, "quick": args.quick, "studies": args.studies, "base": args.base,
                                          "transports": list(transports), "sizes": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
