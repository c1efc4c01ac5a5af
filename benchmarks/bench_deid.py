"""Throughput of pacs2bids.deid against a bare pydicom read+write of the same files.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'     # dicognito, pinned
    .venv/bin/python benchmarks/bench_deid.py [folder-of-dicom] [--limit N] [--rounds R] [--workers N]

Defaults to the Siemens, GE and Philips series of the shared corpus (../shared/data/dicom);
prints files/s and MB/s for each and the ratio. If ``dicognito`` is importable, it is timed
too (same files, its default settings). The tools run in turn, ``R`` rounds, and each keeps
its best round: a machine shared with other work slows whichever tool runs at that moment.
``pacs2bids.deid`` runs in this process (``workers=1``); ``--workers N`` (N > 1) adds a row: the
same files as one series, in batches to N worker processes (:mod:`pacs2bids.deid.pool`, started
before the timing), with the ratio to the bare read + write on one core and the scaling.
``--base SRC`` adds a row for another version of pacs2bids (its ``src`` folder, say a ``git
archive`` of an earlier commit), timed in a child process on the same files in the same rounds
(its start-up outside the timing): before and after, in one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser
from pacs2bids.deid.pool import executor
from pacs2bids.dicomfiles import iter_dicom_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "data" / "dicom"


def collect(root: Path, limit: int, work: Path) -> list[Path]:
    files = []
    for p, data in iter_dicom_bytes(root):
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        if ds.get("Modality") != "MR" or not str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.4"):
            continue
        f = work / "in" / f"{len(files):06d}.dcm"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        files.append(f)
        if len(files) >= limit:
            break
    return files


def bare(files: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        pydicom.dcmread(f).save_as(out / f"{i}.dcm")


def ours(files: list[Path], out: Path, work: Path, workers: int = 1) -> None:
    settings = PseudonymizationSettings(workers=workers)
    p = Pseudonymiser("bench", b"benchmark-secret-0123456789", settings, work / "keys")  # a new key store
    p.pseudonymise_series(files, out, subject="01", session=None, quarantine_dir=work / "q")


def dicognito_run(files: list[Path], out: Path) -> None:
    from dicognito.anonymizer import Anonymizer  # type: ignore[import-not-found]

    out.mkdir(parents=True, exist_ok=True)
    anon = Anonymizer()
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        anon.anonymize(ds)
        ds.save_as(out / f"{i}.dcm")


def base_run(src: Path, files: list[Path], out: Path, work: Path) -> tuple[float, float]:
    """``ours`` with the pacs2bids under ``src``, in a child process: the wall and CPU seconds it timed."""
    code = ("import sys, time, warnings; from pathlib import Path; warnings.simplefilter('ignore'); "
            f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_deid as b; "
            "files = [Path(l) for l in Path(sys.argv[1]).read_text().splitlines()]; "
            "t, c = time.perf_counter(), time.process_time(); b.ours(files, Path(sys.argv[2]), Path(sys.argv[3])); "
            "print(time.perf_counter() - t, time.process_time() - c)")
    listing = work.parent / "files.txt"
    listing.write_text("\n".join(str(f) for f in files))
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", code, str(listing), str(out), str(work)], env=env,
                          capture_output=True, text=True, check=True)
    wall, cpu = done.stdout.split()[-2:]
    return float(wall), float(cpu)


def timed(fn, *args) -> tuple[float, float]:
    """Wall-clock and CPU seconds of this process (the CPU time is less shaken by other work on
    the machine; it leaves out the worker processes)."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--limit", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="add a row for N worker processes (N > 1)")
    ap.add_argument("--base", type=Path, help="add a row for the pacs2bids under this src folder (before)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-deid-") as tmp:
        work = Path(tmp)
        files = collect(args.root, args.limit, work)
        if not files:
            print(f"no MR files under {args.root}", file=sys.stderr)
            return 2
        mb = sum(f.stat().st_size for f in files) / 1e6
        tools = {
            "pydicom read+write": lambda r: timed(bare, files, work / f"bare{r}"),
            "pacs2bids.deid": lambda r: timed(ours, files, work / f"ours{r}", work / f"r{r}"),
        }
        if args.base:
            tools["deid (base)"] = lambda r: base_run(args.base.resolve(), files, work / f"base{r}", work / f"b{r}")
        if args.workers > 1:
            executor(args.workers).submit(int).result()  # the pool's processes started, outside the timing
            tools[f"deid --workers {args.workers}"] = lambda r: timed(
                ours, files, work / f"pool{r}", work / f"p{r}", args.workers)
        if importlib.util.find_spec("dicognito") is not None:
            tools["dicognito"] = lambda r: timed(dicognito_run, files, work / f"dicognito{r}")
        else:
            print("dicognito not installed: skipped")
        best = {name: float("inf") for name in tools}
        cpu = {name: float("inf") for name in tools}
        for r in range(args.rounds):
            for name, run in tools.items():
                wall, used = run(r)
                best[name], cpu[name] = min(best[name], wall), min(cpu[name], used)
        base, base_cpu = best["pydicom read+write"], cpu["pydicom read+write"]
        print(f"{len(files)} files, {mb:.1f} MB, best of {args.rounds} rounds (wall clock; CPU of the timing process)")
        for name, secs in best.items():
            own = "" if name.startswith("deid --workers") else f"  CPU x{cpu[name] / base_cpu:5.2f}"
            print(f"{name:22s} {len(files) / secs:8.1f} files/s {mb / secs:8.1f} MB/s  x{secs / base:5.2f} of bare pydicom"
                  + own)
        if args.workers > 1:
            one, many = best["pacs2bids.deid"], best[f"deid --workers {args.workers}"]
            print(f"{args.workers} workers: x{one / many:4.2f} the speed of one (x{many * args.workers / base:4.2f} "
                  f"of bare pydicom per core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
