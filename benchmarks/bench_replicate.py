"""Incremental replication against a full extraction (issue 14, Figures), in one run:

    .venv/bin/python benchmarks/bench_replicate.py [--studies 100] [--new 10] [--limits 1,2] [--quick] [--json FILE]

Starts Orthanc on loopback and loads ``--studies`` synthetic studies: copies of one real series of
the bundled sample (dcm_qa_nih mr_0003), each with new Study/Series/SOP Instance UIDs and a patient
of its own (the copy helper of bench_e2e), dated 30 days ago. The inclusion list names those
patients and ``--new`` more, who have no study yet. Then, in one Prefect (ephemeral) process, times:

1. the first ``replicate_project``: a full extraction of every study (no watermark yet);
2. a no-op ``replicate_project`` (goal: <= 10 s);
3. a no-op ``extract_project``: the same, asking for everything (what replication saves; not with ``--quick``);
4. for each ``--limits`` value (``pacs.max_associations``): a full extraction of the same studies on 1,
   then on 2 Dask worker processes, each into a fresh folder (``bench_scaleout.py``: it also records
   the PACS-side peak of open connections and checks the dataset equals the first run's);
5. ``replicate_project`` after ``--new`` studies, one per new patient, dated today, reached the PACS.

Prints the times, each one's ratio to the full extraction, and the ratio 2 workers / 1 worker per
limit. Times exclude Prefect's start-up (its server starts once, before). Exit code 1 when a
scale-out run went over its limit or published another dataset. Figures: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from datetime import date, timedelta
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_steps import _copy  # noqa: E402 (the corpus copy helper: new UIDs and patient per copy)
from pacs2bids.orthanc import Orthanc  # noqa: E402

SECRET_ENV = "PACS2BIDS_BENCH_REPL_SECRET"
SERIES = Path("dcm_qa_nih") / "In" / "20180918Si" / "mr_0003"


def studies(src: list[bytes], first: int, count: int, day: date) -> list[bytes]:
    """``count`` studies (copies ``first`` .. ``first + count - 1`` of the series), StudyDate ``day``."""
    out = []
    for k in range(first, first + count):
        for data in src:
            ds = _copy(data, k)
            ds.PatientID = f"BENCH-{k:04d}"
            ds.StudyDate = day.strftime("%Y%m%d")
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            out.append(buf.getvalue())
    return out


def write_spec(folder: Path, o: Orthanc, patients: int, extra: str = "", limit: int | None = None) -> Path:
    """The project's spec in ``folder`` (output ``folder/out``); ``limit``: ``pacs.max_associations``
    (else its default, 2); ``extra``: more top-level YAML (e.g. a ``task_runner``)."""
    limit_line = f"  max_associations: {limit}\n" if limit else ""
    rows = "".join(f"BENCH-{k:04d},{k:04d}\n" for k in range(1, patients + 1))
    (folder / "inclusions.csv").write_text("patient_id,subject\n" + rows)
    spec = folder / "spec.yaml"
    spec.write_text(
        f"project: bench-repl\npacs:\n  dimse: {{ae_title: {o.aet}, host: 127.0.0.1, port: {o.dicom_port}, "
        "retrieve: c-get}\n" + limit_line + "selection:\n  inclusions: inclusions.csv\n  modalities: [MR]\n"
        f"pseudonymization:\n  secret_env: {SECRET_ENV}\nheuristic: auto\noutput: {folder / 'out'}\n" + extra)
    return spec


def timed(fn, *args) -> tuple[float, dict]:
    t = time.perf_counter()
    summary = fn(*args)
    return time.perf_counter() - t, summary


def _noop(replicate_project, spec: str, profile: bool) -> tuple[float, dict]:
    """The no-op replication, timed (and profiled on stderr with ``profile``)."""
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    seconds, s = timed(replicate_project, spec)
    if prof:
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    assert s["unchanged"], s
    return seconds, s


def measure(n: int, new: int, tmp: Path, profile: bool = False, limits: list[int] | None = None,
            quick: bool = False) -> dict:
    """Every figure, in this process, on one PACS; the scale-out (``limits``; none: skipped) runs
    before the new studies arrive, so it extracts the same ``n`` studies as the first run."""
    from prefect.testing.utilities import prefect_test_harness

    from bench_scaleout import dataset_files, scaleout
    from pacs2bids.config import load_spec
    from pacs2bids.flows.extract import extract_project
    from pacs2bids.flows.replicate import replicate_project

    sample = Path(str(resources.files("pacs2bids") / "data" / "sample"))
    src = [p.read_bytes() for p in sorted((sample / SERIES).glob("*.dcm"))]
    o = Orthanc(workdir=tmp / "orthanc").start()
    try:
        o.upload(studies(src, 1, n, date.today() - timedelta(days=30)))
        spec = str(write_spec(tmp, o, n + new))
        fig: dict = {"studies": n, "new": new, "quick": quick}
        with prefect_test_harness(server_startup_timeout=180):
            fig["full"], s = timed(replicate_project, spec)
            assert s["published"] and s["studies"] == n, s["errors"]
            fig["noop_replicate"], s = _noop(replicate_project, spec, profile)
            fig["noop_stages"] = s["stage_seconds"]
            if not quick:
                fig["noop_extract"], s = timed(extract_project, spec)
                assert s["unchanged"], s
            if limits:
                reference = dataset_files(load_spec(spec).output)
                fig["scaleout"] = scaleout(write_spec, o, tmp / "scaleout", n + new, limits, reference)
            o.upload(studies(src, n + 1, new, date.today()))
            fig["new_replicate"], s = timed(replicate_project, spec)
            assert s["published"] and s["studies"] == new, (s["studies"], s["errors"])
        return fig
    finally:
        o.stop()


def table(fig: dict) -> str:
    from bench_scaleout import table as scaleout_table

    full = fig["full"]
    rows = [("full extraction (first replication)", full), ("no-op replication (goal <= 10 s)", fig["noop_replicate"]),
            ("no-op extraction (asks for everything)", fig.get("noop_extract")),
            (f"replication with {fig['new']} new studies", fig["new_replicate"])]
    out = [f"{fig['studies']} studies, C-GET, 1 process, thread runner (4), pacs.max_associations 2",
           f"{'step':<42} {'s':>8} {'/ full':>7}"]
    out += [f"{name:<42} {sec:>8.1f} {sec / full:>7.3f}" for name, sec in rows if sec is not None]
    out.append("no-op replication, its timed stages (s): " + json.dumps(fig.get("noop_stages", {})))
    out.append(f"no-op replication goal <= 10 s: {'PASS' if fig['noop_replicate'] <= 10 else 'MISS'}")
    if "scaleout" in fig:
        out.append(scaleout_table(fig["scaleout"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--new", type=int, default=10)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--profile", action="store_true", help="print the no-op replication's profile on stderr")
    ap.add_argument("--limits", default="1,2",
                    help="pacs.max_associations values of the scale-out figures (comma-separated; 'none': skip it)")
    ap.add_argument("--quick", action="store_true", help="skip the no-op extraction (for the smoke test)")
    args = ap.parse_args(argv)
    limits = [] if args.limits == "none" else [int(x) for x in args.limits.split(",")]
    os.environ.setdefault(SECRET_ENV, "bench-replication-secret-0123456789")
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    with tempfile.TemporaryDirectory(prefix="bench-repl-") as tmp:
        fig = measure(args.studies, args.new, Path(tmp), args.profile, limits, args.quick)
    print(table(fig))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    runs = fig.get("scaleout", {}).get("runs", [])
    return 1 if any(r["limit_held"] is False or not r["same_files"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
