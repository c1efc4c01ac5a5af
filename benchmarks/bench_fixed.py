"""A run's fixed costs beside their floors (issue 12): the query, the leak scan and the lineage tables, in one run.

    .venv/bin/python benchmarks/bench_fixed.py [--corpus sample|shared] [--studies N] [--json FILE]
    .venv/bin/python benchmarks/bench_fixed.py --run [--base COMMIT] [--corpus sample|shared] [--studies N] [--json FILE]

Starts Orthanc on loopback (DICOMweb on), loads the corpus (``benchmarks/e2e_steps.load_corpus``), then times:
- query: ``pacs2bids.query.find_studies`` of every patient of the corpus, over C-FIND and over QIDO-RS, with the
  PACS's gate backed by a Prefect global concurrency limit as in a run (Prefect ephemeral, in a temporary
  PREFECT_HOME), as it is and by the path before issue 12 (a search by date and one without per row, one series
  search per study, one gate slot per QIDO-RS request), each with its number of searches. Floor: one study-level
  C-FIND per row on one association, no gate (the fewest round trips that can find the studies);
- leak scan: the corpus pseudonymised (``pacs2bids.deid.Pseudonymiser``, one folder per series) into a staging
  folder, scanned for the key store's identifiers (``scan_for_leaks``; 0 hits expected). Floor: every byte of
  every file read once (``e2e_steps.read_floor``). Before issue 12, the scan searched every file with two
  case-folding patterns: that alone is timed too;
- lineage: ``record_lineage`` of one instance row per pseudonymised file (one part per series, merged; every file
  hashed). Floor: the SHA-256 of every file, once;
- Prefect: an empty flow in its own process (import, ephemeral server start-up, one flow run), on a new
  PREFECT_HOME and again: the fixed cost every ``pacs2bids run`` pays before its first stage.

With ``--run``, instead: one ``pacs2bids run`` over DICOMweb of the corpus, taken apart phase by phase
(``benchmarks/fixed_run.py``: imports, Prefect's server start-up, the flow run's creation, each stage, what the
flow does besides, the process's end) with Prefect's API requests counted; twice, on a new PREFECT_HOME then on
the same one again (each run into its own output). ``--run --base COMMIT``: after that first run, the commit's
pacs2bids (exported, first on PYTHONPATH) and this tree's alternate, twice each, on the same PREFECT_HOME.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_steps as steps  # noqa: E402  (the benchmark's own helper module, beside this file)
import waited  # noqa: E402
import pydicom  # noqa: E402

from pacs2bids import query  # noqa: E402
from pacs2bids.checksum import sha256_file  # noqa: E402
from pacs2bids.config import PseudonymizationSettings, load_spec  # noqa: E402
from pacs2bids.deid import Pseudonymiser, scan_for_leaks  # noqa: E402
from pacs2bids.deid.leakrules import build_rules  # noqa: E402
from pacs2bids.dicomfiles import iter_dicom_bytes  # noqa: E402
from pacs2bids.lineage import InstanceRecord, record_lineage, write_instance_part  # noqa: E402
from pacs2bids.orthanc import Orthanc  # noqa: E402
from pacs2bids.pacs import close_pools, gate, services  # noqa: E402
from pacs2bids.pacs.dicomweb import WebPacs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPORA = {"shared": REPO.parent / "shared" / "data" / "dicom", "sample": REPO / "src" / "pacs2bids" / "data" / "sample"}
SECRET = b"bench-fixed-secret-0123456789abcdef"


def _spec(folder: Path, o: Orthanc, patients: list[str], transport: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inclusions.csv").write_text("patient_id,subject\n" + "".join(
        f"{p},S{i:03d}\n" for i, p in enumerate(patients)))
    pacs = (f"  dicomweb: {{url: {o.dicomweb_url}}}\n" if transport == "dicomweb" else
            f"  dimse: {{ae_title: {o.aet}, host: 127.0.0.1, port: {o.dicom_port}, retrieve: c-get}}\n")
    (folder / "spec.yaml").write_text(
        f"project: bench\npacs:\n{pacs}selection:\n  inclusions: inclusions.csv\n  modalities: []\n"
        "pseudonymization:\n  secret_env: PACS2BIDS_BENCH_SECRET\noutput: out\n")
    return load_spec(folder / "spec.yaml", environ={"PACS2BIDS_BENCH_SECRET": SECRET.decode()})


class _Before:
    """The query's path before issue 12, on the same code: no answer taken as whole, no series batch,
    one gate slot per request."""

    def __init__(self):
        self.real = query.open_transport

    def __call__(self, spec):
        transport = self.real(spec)
        every = transport.find_every_study
        transport.find_every_study = lambda key, value: (every(key, value)[0], False)
        transport.find_series_of = lambda uids: None
        transport.one_connection = nullcontext
        return transport


def _counting():
    """Count C-FIND requests and QIDO-RS pages (each an HTTP request)."""
    count = [0]
    real_find, real_page = services.find, WebPacs._page

    def find(*a, **kw):
        count[0] += 1
        return real_find(*a, **kw)

    def page(self, *a, **kw):
        count[0] += 1
        return real_page(self, *a, **kw)

    services.find, WebPacs._page = find, page
    return count


def measure_query(o: Orthanc, patients: list[str], tmp: Path) -> dict:
    """Query time and requests, as it is and before, per transport, beside the floor."""
    from pacs2bids.tasks.pacs_limit import use_pacs_limit  # Prefect: only here

    count = _counting()
    out: dict = {}
    spec = _spec(tmp / "floor", o, patients, "dimse")
    t = time.perf_counter()
    for p in patients:  # the floor: one study-level C-FIND per row, one association, no gate
        ds = pydicom.Dataset()
        ds.QueryRetrieveLevel, ds.PatientID, ds.StudyInstanceUID = "STUDY", p, ""
        services.find(spec.pacs.dimse, ds)
    out["floor"] = time.perf_counter() - t
    close_pools()
    for transport in ("dimse", "dicomweb"):
        spec = _spec(tmp / transport, o, patients, transport)
        use_pacs_limit(spec)
        for name, opener in (("before", _Before()), ("now", query.open_transport)):
            real, query.open_transport = query.open_transport, opener
            count[0] = 0
            try:
                t = time.perf_counter()
                found = query.find_studies(spec)
                seconds = time.perf_counter() - t
            finally:
                query.open_transport = real
                close_pools()
            out[f"{transport}_{name}"] = {"seconds": seconds, "requests": count[0], "studies": len(found.studies)}
        gate.set_gate(spec.pacs, None)
    return out


def _raw_series(root: Path, studies: int, dest: Path) -> dict[str, tuple[str, list[Path]]]:
    """The corpus written as plain files, one folder per series: series -> (patient, files)."""
    series: dict[str, tuple[str, list[Path]]] = {}
    kept: set[str] = set()
    for _path, data in iter_dicom_bytes(root):
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["PatientID", "StudyInstanceUID", "SeriesInstanceUID"])
        study, uid, patient = (str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID"))
        if not (study and uid and patient) or (studies and study not in kept and len(kept) >= studies):
            continue
        kept.add(study)
        folder = dest / f"{len(series) if uid not in series else list(series).index(uid):04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{len(series.get(uid, ('', []))[1]):05d}.dcm"
        path.write_bytes(data)
        series.setdefault(uid, (patient, []))[1].append(path)
    return series


def measure_scan_and_lineage(root: Path, studies: int, tmp: Path) -> dict:
    series = _raw_series(root, studies, tmp / "raw")
    staging = tmp / "staging"
    p = Pseudonymiser("bench", SECRET, PseudonymizationSettings(), tmp / "keys")
    subjects = {patient: f"{i:03d}" for i, patient in enumerate(sorted({pt for pt, _ in series.values()}))}
    parts = []
    for n, (patient, files) in enumerate(series.values()):
        sub = subjects[patient]
        res = p.pseudonymise_series(files, staging / "sourcedata" / f"sub-{sub}" / f"{n:04d}", subject=sub,
                                    session=None, quarantine_dir=tmp / "quarantine")
        records = [InstanceRecord(sub, None, res.pseudo_study_uid, res.pseudo_series_uid, w.stem,
                                  w.relative_to(staging).as_posix(), "c-get", None) for w in res.written]
        if part := write_instance_part(staging, f"{n:04d}", records):
            parts.append(part)
    out: dict = {"files": sum(1 for f in staging.rglob("*") if f.is_file()),
                 "megabytes": sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) / 1e6}
    out["read_once"], _ = steps.read_floor(staging)
    t = time.perf_counter()
    for f in sorted(staging.rglob("*.dcm")):
        sha256_file(f)
    out["sha256_once"] = time.perf_counter() - t
    t = time.perf_counter()
    record_lineage(staging, [], parts, run_id="bench", project="bench", flow_run_id=None, pacs2bids_version="bench",
                   heuristic_sha256=None)
    out["lineage"] = time.perf_counter() - t
    t = time.perf_counter()
    rules = build_rules(p.identifiers())
    out["rules"] = time.perf_counter() - t
    t = time.perf_counter()
    out["leak_hits"] = len(scan_for_leaks(staging, rules))
    out["leak_scan"] = time.perf_counter() - t
    folding = build_rules(p.identifiers(), keep_strings=True)  # with every string: the patterns
    t = time.perf_counter()
    for f in staging.rglob("*"):  # what the scan did per file before issue 12: two case-folding passes
        if f.is_file():
            data = f.read_bytes()
            for pattern in (folding.pattern, folding.common_pattern):
                if pattern is not None:
                    pattern.search(data)
    out["two_folding_passes"] = time.perf_counter() - t
    return out


_EMPTY_FLOW = """
import time
t = time.perf_counter()
from prefect import flow
flow(lambda: None, name="empty")()
print(time.perf_counter() - t)
"""


def measure_prefect(tmp: Path) -> dict:
    """An empty flow in its own process, as ``pacs2bids run`` starts one: Prefect's import, its ephemeral
    server's start-up and one flow run. First on a new PREFECT_HOME (database created), then again."""
    import subprocess

    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-empty")}
    out = {}
    for name in ("first", "again"):
        done = subprocess.run([sys.executable, "-c", _EMPTY_FLOW], env=env, capture_output=True, text=True, timeout=600)
        out[name] = float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    return out


def measure_run(o: Orthanc, corpus, tmp: Path, rounds: tuple[str, ...] = ("first", "again"),
                base: Path | None = None) -> dict:
    """``fixed_run.py`` in its own process per round (same PREFECT_HOME); the process's wall time and peak RSS
    from outside, its phases from inside (the difference: interpreter start and exit, the server's stop).
    A round named ``base...`` imports pacs2bids from ``base`` (:func:`e2e_steps.base_package`)."""
    import subprocess

    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-run"), steps.SECRET_ENV: SECRET.decode(),
           "NIPYPE_NO_ET": "1"}
    out = {}
    for name in rounds:
        env.pop("PYTHONPATH", None)
        if name.startswith("base") and base is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(base), *filter(None, [os.environ.get("PYTHONPATH")])])
        spec = steps.write_spec(tmp / f"run-{name}", o, corpus, "dicomweb", 0)
        result = tmp / f"run-{name}.json"
        with open(tmp / f"run-{name}.log", "wb") as log:  # waited.py: the run's peak, not this process's
            code, wall, peak, _cpu = waited.run([sys.executable, str(Path(__file__).with_name("fixed_run.py")),
                                                 str(spec), str(result)], env=env, stdout=log, stderr=subprocess.STDOUT)
        if code or not result.is_file():
            tail = (tmp / f"run-{name}.log").read_text(errors="replace").splitlines()[-10:]
            raise RuntimeError(f"timed run {name} failed:\n" + "\n".join(tail))
        data = json.loads(result.read_text())
        data["process_wall"], data["peak_rss_mb"] = round(wall, 3), peak
        data["phases"]["interpreter start and exit"] = round(wall - data["total_in_process"], 3)
        data["exit"] = _exit_marks(result.with_suffix(".exit.json"))
        out[name] = data
    return out


def _exit_marks(path: Path) -> dict:
    """Seconds from the run's return to each stage of the interpreter's exit (``fixed_run._time_the_exit``)."""
    try:
        marks = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    start = marks.pop("main returned", None)
    return {k: round(v - start, 3) for k, v in sorted(marks.items(), key=lambda kv: kv[1])} if start else {}


def before_first_study(run: dict) -> float:
    """Seconds from the process's start to the query's end (the studies are submitted next): the phases up to
    the query, and the interpreter's start (the process's wall time less the time inside, less the exit)."""
    phases, total = run["phases"], 0.0
    for name, seconds in phases.items():
        if name.startswith("studies"):
            break
        total += seconds
    ended = run.get("exit", {}).get("atexit handlers end", 0.0)
    return total + max(0.0, phases.get("interpreter start and exit", 0.0) - ended)


def report_run(runs: dict) -> str:
    names = list(runs)
    lines = ["| phase of one `pacs2bids run` | " + " | ".join(f"{n} s" for n in names) + " |",
             "| --- |" + " ---: |" * len(names)]
    for phase in runs[names[0]]["phases"]:
        lines.append(f"| {phase} | " + " | ".join(f"{runs[n]['phases'].get(phase, 0.0):.2f}" for n in names) + " |")
    lines.append("| **before the first study** (from the process's start to the query's end) | " + " | ".join(
        f"**{before_first_study(runs[n]):.2f}**" for n in names) + " |")
    lines.append("| **process wall time** | " + " | ".join(f"**{runs[n]['process_wall']:.2f}**" for n in names) + " |")
    lines.append("| peak RSS MB | " + " | ".join(f"{runs[n]['peak_rss_mb']:.0f}" for n in names) + " |")
    late = "modules imported once the server answered, before the studies"
    lines.append(f"| {late} | " + " | ".join(runs[n].get(late, "").partition(":")[0] for n in names) + " |")
    for mark in runs[names[0]].get("exit", {}):
        lines.append(f"| exit: {mark}, s after the run returned | " + " | ".join(
            f"{runs[n].get('exit', {}).get(mark, 0.0):.2f}" for n in names) + " |")
    kinds = sorted({k for n in names for k in runs[n]["api_requests"]})
    lines += ["", "| Prefect API requests (count, summed s) | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for k in kinds:
        cells = [runs[n]["api_requests"].get(k, [0, 0.0]) for n in names]
        lines.append(f"| {k} | " + " | ".join(f"{c[0]}, {c[1]:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def report(q: dict, s: dict, pf: dict | None = None) -> str:
    lines = ["| step | seconds | requests | x its floor |", "| --- | ---: | ---: | ---: |",
             f"| floor: one study C-FIND per row, no gate | {q['floor']:.2f} | | |"]
    for transport in ("dimse", "dicomweb"):
        for name in ("before", "now"):
            r = q[f"{transport}_{name}"]
            lines.append(f"| query {transport}, {name} ({r['studies']} studies) | {r['seconds']:.2f} | {r['requests']} | "
                         f"{r['seconds'] / q['floor']:.1f} |")
    lines += [f"| floor: every byte read once ({s['files']} files, {s['megabytes']:.0f} MB) | {s['read_once']:.2f} | | |",
              f"| leak scan ({s['leak_hits']} hits; rules built in {s['rules']:.2f} s) | {s['leak_scan']:.2f} | | "
              f"{s['leak_scan'] / s['read_once']:.1f} |",
              f"| before: two case-folding pattern passes over every file | {s['two_folding_passes']:.2f} | | "
              f"{s['two_folding_passes'] / s['read_once']:.1f} |",
              f"| floor: SHA-256 of every DICOM file once | {s['sha256_once']:.2f} | | |",
              f"| lineage tables | {s['lineage']:.2f} | | {s['lineage'] / s['sha256_once']:.1f} |"]
    for name, what in (("first", "new database"), ("again", "its database made")):
        if pf and pf.get(name) is not None:
            lines.append(f"| Prefect: an empty flow in its own process ({what}) | {pf[name]:.2f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="shared" if CORPORA["shared"].is_dir() else "sample")
    ap.add_argument("--studies", type=int, default=0, help="the first N studies only")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--run", action="store_true", help="time one pacs2bids run phase by phase instead")
    ap.add_argument("--base", metavar="COMMIT", help="with --run: after a first run, this commit's pacs2bids and this "
                    "tree's, alternating, twice each (--rounds), on the same PREFECT_HOME")
    ap.add_argument("--rounds", type=int, default=2, help="with --base: runs of each, alternating (default 2)")
    args = ap.parse_args(argv)
    root = CORPORA[args.corpus]
    with tempfile.TemporaryDirectory(prefix="bench-fixed-") as d:
        tmp = Path(d)
        os.environ["PREFECT_HOME"] = str(tmp / "prefect")  # before Prefect is imported (measure_query)
        os.environ.setdefault("DO_NOT_TRACK", "1")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a loaded machine
        with Orthanc(workdir=tmp / "orthanc") as o:
            corpus = steps.load_corpus(o, root, 1, args.studies)
            patients = sorted(set(corpus.study_patient.values()))
            print(f"corpus: {root}: {corpus.instances} instances, {corpus.size / 1e6:.0f} MB, "
                  f"{len(corpus.study_patient)} studies, {len(patients)} patients", flush=True)
            if args.run:
                base = steps.base_package(args.base, tmp / "base") if args.base else None
                pairs = [(f"base {i}", f"new {i}") if i > 1 else ("base", "new") for i in range(1, args.rounds + 1)]
                rounds = ("first", *[r for pair in pairs for r in pair]) if base else ("first", "again")
                runs = measure_run(o, corpus, tmp, rounds, base)
                print(report_run(runs))
                if args.json:
                    args.json.write_text(json.dumps({"corpus": args.corpus, "runs": runs}, indent=2))
                return 0
            q = measure_query(o, patients, tmp)
        s = measure_scan_and_lineage(root, args.studies, tmp)
        pf = measure_prefect(tmp)
    print(report(q, s, pf))
    if args.json:
        args.json.write_text(json.dumps({"corpus": args.corpus, "query": q, "scan": s, "prefect": pf}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
