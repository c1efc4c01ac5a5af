"""Retrieval throughput: pacs2bids's C-GET, C-MOVE and WADO-RS against dcmtk getscu/movescu, or its floors.

Starts a local Orthanc on loopback, loads ../shared/data/dicom when present (else the bundled
sample), then retrieves every study with each method in the same run and prints MB/s,
instances/s and the ratio to dcmtk (getscu for C-GET and WADO-RS, movescu for C-MOVE). Our time
is the retrieval's (``retrieve_study`` of every study), the query before it is not counted.

    python benchmarks/bench_retrieve.py [--sample] [--only c-get,wado-rs,...]
    python benchmarks/bench_retrieve.py --floors [--sample] [--only wado-rs] [--base COMMIT --rounds N]

``--floors`` sets our retrieval beside its floors (issue 12), in one process, on the corpus and
then on the sample (``--sample``: the sample alone): raw WADO-RS of every study (bytes read and
dropped) beside ``retrieve_study`` over DICOMweb, and one pynetdicom association C-GETting every
study (files written) beside ``retrieve_study`` over C-GET with ``max_associations: 1``. Ratio:
the floor's time over ours (1.0: as fast as the floor); goals 0.8 (DICOMweb) and 0.9 (C-GET).
Over DICOMweb each round also times the keep floor (``e2e_steps.wado_keep_floor``: the same
transfer, each instance written to its own file and hashed, in the simplest code) and prints the
CPU seconds Orthanc spent serving each one: on a machine the PACS shares, what is left for us.
``--link-mbit N`` (root, Linux) shapes loopback to N Mbit/s (``tc`` token bucket on ``lo``, removed
at the end) for the DICOMweb rounds: the transfer at a hospital link's speed instead of memory's.
``--base COMMIT``: each round times the floor, then pacs2bids at COMMIT and this tree, each in a
child process (same Orthanc, one after the other): before and after in one run.
``--receive [--rounds N]``: the WADO-RS receive path alone, without a server (``receive``); run it
with ``PYTHONPATH`` set to an older tree to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pacs2bids.pacs import close_pools
from pacs2bids.config import load_spec
from pacs2bids.dicomfiles import iter_dicom_bytes
from pacs2bids.orthanc import Orthanc, free_port
from pacs2bids.query import find_studies
from pacs2bids.retrieve import retrieve_study

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_steps as steps  # noqa: E402  (the benchmarks' own helper module, beside this file)

REPO = Path(__file__).resolve().parents[1]
GOALS = {"wado-rs": 0.8, "c-get": 0.9}  # issue 12: our throughput over the floor's
CORPUS = REPO.parent / "shared" / "data" / "dicom"
SAMPLE = REPO / "src" / "pacs2bids" / "data" / "sample"
CPU: dict[str, float] = {}  # method -> CPU seconds of the last run_ours


def load(o: Orthanc, root: Path) -> tuple[list[str], list[str]]:
    """Upload every DICOM file under ``root``; returns (patient ids, study uids)."""
    import pydicom
    from io import BytesIO

    pids, studies, blobs = set(), set(), []
    for _path, data in iter_dicom_bytes(root):
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
        pid, study = str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")
        if not (pid and study):  # not reachable by an inclusion row: left out of the comparison
            continue
        pids.add(pid)
        studies.add(study)
        blobs.append(data)
    o.upload(blobs)
    return sorted(pids), sorted(studies)


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix == ".dcm"]
    return len(files), sum(p.stat().st_size for p in files)


def run_ours(o: Orthanc, method: str, pids: list[str], work: Path, move_port: int) -> tuple[float, int, int]:
    work.mkdir(parents=True)
    (work / "inc.csv").write_text("patient_id,subject\n" + "".join(f"{p},S{i}\n" for i, p in enumerate(pids)))
    if method == "wado-rs":
        pacs = f"  dicomweb:\n    url: {o.dicomweb_url}\n"
    else:
        pacs = (f"  dimse:\n    ae_title: {o.aet}\n    host: 127.0.0.1\n    port: {o.dicom_port}\n"
                f"    retrieve: {method}\n    storage_port: {move_port}\n    max_associations: 1\n")
    (work / "spec.yaml").write_text(f"project: BENCH\npacs:\n{pacs}selection:\n  inclusions: inc.csv\n"
                                    "  modalities: []\noutput: out\n")
    spec = load_spec(work / "spec.yaml", environ={"PACS2BIDS_PROJECT_SECRET": "b" * 32})
    studies = find_studies(spec).studies
    t0, c0 = time.perf_counter(), time.process_time()
    statuses: dict[str, int] = {}
    for study in studies:
        for r in retrieve_study(spec, study, work / "raw"):
            statuses[r.status] = statuses.get(r.status, 0) + 1
    if set(statuses) != {"complete"}:
        print(f"warning: pacs2bids {method}: series {statuses}", file=sys.stderr)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    close_pools()
    n, size = tree_size(work / "raw")
    CPU[method] = cpu  # this process's CPU (every thread) for the retrieval: steadier than the wall under load
    return elapsed, n, size


def run_dcmtk(o: Orthanc, tool: str, studies: list[str], work: Path) -> tuple[float, int, int]:
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    for uid in studies:  # one association per study, as a script would do
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}"]
        if tool == "getscu":
            cmd = ["getscu", "-aet", "PACS2BIDS", "-aec", o.aet, "-S", *keys, "-od", str(work), "127.0.0.1",
                   str(o.dicom_port)]
        else:
            cmd = ["movescu", "-aet", "PACS2BIDS", "-aec", o.aet, "-aem", "PACS2BIDS", "--port", str(o.move_port), "+xa",
                   "-S", *keys, "-od", str(work), "127.0.0.1", str(o.dicom_port)]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)
        if done.returncode:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            print(f"warning: {tool} exited {done.returncode} on one study: {tail}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    files = [p for p in work.iterdir() if p.is_file()]
    return elapsed, len(files), sum(p.stat().st_size for p in files)


def run_ours_in(code: Path | None, o: Orthanc, method: str, pids: list[str], work: Path) -> tuple[float, int, int]:
    """:func:`run_ours` in a child process, importing pacs2bids from ``code`` (an older tree,
    ``e2e_steps.base_package``) or, when None, the installed one; both children alike."""
    job = work.with_suffix(".json")
    job.write_text(json.dumps({"url": o.dicomweb_url, "aet": o.aet, "port": o.dicom_port, "method": method,
                               "pids": pids, "work": str(work), "move_port": free_port()}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code or ""), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, "--child", str(job)], env=env, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode:
        raise RuntimeError(f"bench child failed: {done.stderr[-2000:]}")
    elapsed, n, size, CPU[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return elapsed, n, size


def _child(job: Path) -> int:
    from types import SimpleNamespace

    j = json.loads(job.read_text())
    o = SimpleNamespace(dicomweb_url=j["url"], aet=j["aet"], dicom_port=j["port"])
    print(json.dumps([*run_ours(o, j["method"], j["pids"], Path(j["work"]), j["move_port"]), CPU[j["method"]]]))
    return 0


def floors(root: Path, tmp: Path, methods: list[str], base: Path | None = None,
           rounds: int = 1, link_mbit: int | None = None) -> list[tuple[str, float, float]]:
    """Our retrieval beside its floors on one Orthanc holding ``root``; prints and returns
    (transport, floor seconds, our seconds). With ``base`` (an older pacs2bids tree), each
    round times the floor, then the base and this tree in child processes, one after the other."""
    with Orthanc(workdir=tmp / "orthanc") as o:
        corpus = steps.load_corpus(o, root, 1)
        print(f"data: {root} ({corpus.instances} instances, {corpus.size / 1e6:.0f} MB, "
              f"{len(corpus.study_patient)} studies) on Orthanc {o.get('/system')['Version']}", flush=True)
        got, keep = [], []
        for r in range(rounds):
            for method in methods:
                if method == "wado-rs":
                    with shaped_loopback(link_mbit):
                        served = orthanc_cpu(o)
                        floor_s, _ = steps.wado_floor(o, corpus)
                        served = orthanc_cpu(o) - served
                        keep_s, _files, keep_cpu = steps.wado_keep_floor(o, corpus, tmp / f"keep-floor-{r}")
                    keep.append((floor_s, served, keep_s, keep_cpu))
                else:
                    floor_s, _ = steps.cget_floor(o, corpus, tmp / f"c-get-floor-{r}")
                codes = [("base", base), ("ours", None)] if base else [("ours", False)]
                codes = codes[::-1] if r % 2 else codes  # who comes second meets the first's writeback
                for label, code in codes:
                    work = tmp / f"{method}-{label}-{r}"
                    with shaped_loopback(link_mbit if method == "wado-rs" else None):
                        if code is False:
                            ours_s, n, size = run_ours(o, method, corpus.patients, work, free_port())
                        else:
                            ours_s, n, size = run_ours_in(code, o, method, corpus.patients, work)
                    if n != corpus.instances:
                        print(f"warning: {label} {method} wrote {n} of {corpus.instances} instances", file=sys.stderr)
                    got.append((method if label == "ours" else f"{method} (base)", floor_s, ours_s, CPU[method]))
                    # kept until the end (the temporary folder's clean-up): on ext4 without a journal (this
                    # machine's), a file created within 60-360 s of deletions in its block group scans past
                    # each deleted inode (ext4 recently_deleted()): deleting a round's 2,725 files made the
                    # next round's file creations (and only ours: the WADO-RS floor writes none) cost more
        print(f"{'transport':<16} {'floor s':>8} {'ours s':>8} {'ours CPU s':>10} {'ours MB/s':>9} {'x floor':>8}  goal")
        for method, floor_s, ours_s, cpu in got:
            ratio, goal = floor_s / ours_s, GOALS[method.split()[0]]
            print(f"{method:<16} {floor_s:8.2f} {ours_s:8.2f} {cpu:10.2f} {corpus.size / 1e6 / ours_s:9.1f} "
                  f"{ratio:8.2f}  >= {goal} {'PASS' if ratio >= goal else 'MISS'}", flush=True)
        if keep:
            print("the WADO-RS floor beside the keep floor (each instance also written to its own file and hashed, "
                  "simplest code), and the CPU Orthanc spent serving the floor:")
            print(f"{'round':<6} {'floor s':>8} {'Orthanc CPU s':>13} {'keep floor s':>12} {'its CPU s':>9} "
                  f"{'keep x floor':>12}")
            for r, (floor_s, served, keep_s, keep_cpu) in enumerate(keep):
                print(f"{r:<6} {floor_s:8.2f} {served:13.2f} {keep_s:12.2f} {keep_cpu:9.2f} {floor_s / keep_s:12.2f}",
                      flush=True)
        return [(m, f, o) for m, f, o, _c in got]


def orthanc_cpu(o: Orthanc) -> float:
    """CPU seconds (user + system) the Orthanc process has used so far (Linux /proc; 0 elsewhere)."""
    proc = getattr(o, "_proc", None)
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (AttributeError, OSError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class shaped_loopback:
    """Loopback shaped to ``mbit`` Mbit/s for the block (``tc`` token bucket filter on ``lo``,
    root only), removed on leaving: the transfer at a network link's speed, not memory's. Only
    loopback is touched; whatever else uses it meanwhile is slowed too (run it alone)."""

    def __init__(self, mbit: int | None):
        self.mbit = mbit

    def __enter__(self):
        if self.mbit:
            if os.geteuid() != 0 or not shutil.which("tc"):
                raise SystemExit("--link-mbit needs root and tc (Debian iproute2)")
            subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{self.mbit}mbit",
                            "burst", "1mb", "latency", "100ms"], check=True)
        return self

    def __exit__(self, *exc):
        if self.mbit:
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def receive(root: Path, rounds: int) -> None:
    """The WADO-RS receive path alone, no server: every study of ``root`` as one multipart answer
    in memory (parts with their Content-Length, as Orthanc sends them), fed in 1 MiB chunks
    through the reader thread, the study router and the series sinks into files, as
    ``retrieve_study`` does. Prints wall and CPU seconds per round: our own cost, without the
    transfer's."""
    import io

    import pydicom

    from pacs2bids.pacs import dicomweb
    from pacs2bids.pacs.transport import _take
    from pacs2bids.retrieve import StudySink
    from pacs2bids.sink import SeriesSink

    boundary, studies = "bench-boundary", {}
    for _path, data in iter_dicom_bytes(root):
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        if ds.get("StudyInstanceUID") and ds.get("SeriesInstanceUID"):
            studies.setdefault(str(ds.StudyInstanceUID), []).append((str(ds.SeriesInstanceUID), data))

    class Answer:
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}

        def __init__(self, items):
            self.body = b"".join([f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(d)}"
                                  f"\r\n\r\n".encode() + d + b"\r\n" for _se, d in items] + [f"--{boundary}--".encode()])

        def iter_content(self, n):
            yield from (self.body[i:i + n] for i in range(0, len(self.body), n))

        def close(self):
            pass

    answers = {uid: Answer(items) for uid, items in studies.items()}
    print(f"receive path: {sum(map(len, studies.values()))} instances, {len(studies)} studies of {root}", flush=True)
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            for k, (uid, items) in enumerate(studies.items()):
                sinks = {}
                for n, se in enumerate(sorted({se for se, _d in items})):
                    (Path(tmp) / f"{k}" / f"{n}").mkdir(parents=True)
                    sinks[se] = SeriesSink(b"k" * 32, uid, se, Path(tmp) / f"{k}" / f"{n}", Path(tmp) / "q",
                                           transport="wado-rs")
                router, answer = StudySink(uid, sinks, {se: None for se in sinks}), answers[uid]
                for part in dicomweb._read_ahead(dicomweb._multipart_parts(answer, Path(tmp)), answer):
                    _take(router, part)
                for sink in sinks.values():
                    sink.save()
            print(f"round {r}: wall {time.perf_counter() - t0:.2f} s, CPU {time.process_time() - c0:.2f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", action="store_true", help="use the bundled sample even if the corpus is there")
    ap.add_argument("--only", default="c-get,c-move,wado-rs", help="methods of ours to run")
    ap.add_argument("--floors", action="store_true", help="our retrieval beside raw WADO-RS and one-association C-GET")
    ap.add_argument("--base", metavar="COMMIT", help="with --floors: also time pacs2bids at this commit, each "
                    "round in child processes alternating with this tree")
    ap.add_argument("--rounds", type=int, default=1, help="with --floors: rounds of floor, (base,) ours")
    ap.add_argument("--link-mbit", type=int, help="with --floors: loopback shaped to this many Mbit/s for the "
                    "DICOMweb rounds (tc on lo; root)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--receive", action="store_true", help="the WADO-RS receive path alone, no server (--rounds)")
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child)
    if args.receive:
        receive(SAMPLE if args.sample or not CORPUS.is_dir() else CORPUS, args.rounds)
        return 0
    if args.floors:
        roots = [SAMPLE] if args.sample or not CORPUS.is_dir() else [CORPUS, SAMPLE]
        methods = [m for m in ("wado-rs", "c-get") if m in args.only.split(",")]
        for root in roots:
            with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as tmp:
                base = steps.base_package(args.base, Path(tmp) / "base") if args.base else None
                floors(root, Path(tmp), methods, base, args.rounds, args.link_mbit)
        return 0
    root = SAMPLE if args.sample or not CORPUS.is_dir() else CORPUS
    if not shutil.which("getscu"):
        print("dcmtk is not installed (apt-get install dcmtk)", file=sys.stderr)
        return 2
    move_port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as tmp, \
            Orthanc(workdir=Path(tmp) / "orthanc", modalities={"PACS2BIDS": ("127.0.0.1", move_port)}) as o:
        o.move_port = move_port
        pids, studies = load(o, root)
        print(f"data: {root} ({len(studies)} studies, {len(pids)} patients) on Orthanc {o.get('/system')['Version']}")
        rows = []
        dcmtk = {}
        for tool in ("getscu", "movescu"):
            dcmtk[tool] = run_dcmtk(o, tool, studies, Path(tmp) / tool)
            rows.append((f"dcmtk {tool}", *dcmtk[tool], None))
        for method in args.only.split(","):
            t, n, size = run_ours(o, method, pids, Path(tmp) / method, move_port)
            ref = dcmtk["movescu" if method == "c-move" else "getscu"]
            rows.append((f"pacs2bids {method}", t, n, size, (size / t) / (ref[2] / ref[0])))
        print(f"{'method':<20} {'seconds':>8} {'instances':>9} {'MB':>8} {'MB/s':>8} {'inst/s':>8} {'x dcmtk':>8}")
        for name, t, n, size, ratio in rows:
            print(f"{name:<20} {t:8.2f} {n:9d} {size / 1e6:8.1f} {size / 1e6 / t:8.2f} {n / t:8.1f} "
                  f"{'' if ratio is None else f'{ratio:8.2f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
