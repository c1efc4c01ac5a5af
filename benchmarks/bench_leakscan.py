"""The leak scan and its rules, this tree against a base commit, in one process (issue 12).

    .venv/bin/python benchmarks/bench_leakscan.py --root DATASET --keys KEYSTORE [--project P] [--base COMMIT]
    .venv/bin/python benchmarks/bench_leakscan.py --memory [--uids 3000,30000] [--base COMMIT]

``--root``: a dataset written by a real run (``pacs2bids demo``, or the output of a ``bench_e2e.py`` run) and
its key store (the secret from ``$PACS2BIDS_BENCH_SECRET``, else the benchmarks' own). The rules are built
from the key store, the base's rules and scan and this tree's (each built from the key store's values, as the run's task) alternate ``--rounds`` times (the first round of each
warms the page cache); printed: seconds of each, the read-once floor (every byte of every file read once),
and the hits of each (they must be the same, but for false blocks the new code avoids).

``--memory``: rules built from a synthetic key store (N original UIDs, and the names, IDs, dates and
accession numbers of N/25 patients), by the base and by this tree, each under ``tracemalloc``: the peak and
what the rules keep, in MB, with the word lists loaded before (they are the same at any size).

The base's ``leakscan.py`` and ``leakrules.py`` are read with ``git show BASE:...`` into a temporary package
(the rest of pacs2bids is this tree's).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SECRET = "bench-fixed-secret-0123456789abcdef"


def load_base(commit: str, where: Path):
    """The base commit's leak scan modules, as a package ``leakbase`` (leakscan, leakrules, and leakfind
    where the base has it)."""
    pkg = where / "leakbase"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    texts = {}
    for name in ("leakscan", "leakrules", "leakfind"):
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:src/pacs2bids/deid/{name}.py"],
                               capture_output=True, text=True)
        if shown.returncode == 0:
            texts[name] = shown.stdout
    copied = "|".join(texts)
    for name, text in texts.items():
        # the other modules are this tree's: every relative import but of those copied here
        text = re.sub(r"^(\s*)from \.\.(\w+) import", r"\1from pacs2bids.\2 import", text, flags=re.M)
        text = re.sub(rf"^(\s*)from \.(?!(?:{copied})\b)(\w+) import", r"\1from pacs2bids.deid.\2 import",
                      text, flags=re.M)
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(where))
    return importlib.import_module("leakbase.leakscan"), importlib.import_module("leakbase.leakrules")


def synthetic_identifiers(n_uids: int, seed: int = 1) -> set[str]:
    """``n_uids`` original UIDs (vendor roots, as a key store holds them) and the values of ``n_uids // 25``
    patients: name, ID, birth date, accession number, physician."""
    rng = random.Random(seed)
    roots = ["1.3.12.2.1107.5.2.43", "1.2.840.113619.2.55.3", "1.3.46.670589.11.0.0", "2.25"]
    ids = {f"{rng.choice(roots)}.{rng.randint(1, 99999)}.{rng.randint(10**17, 10**21)}.{rng.randint(1, 10**6)}"
           for _ in range(n_uids)}
    for i in range(max(1, n_uids // 25)):
        ids |= {f"PATIENT{i:05d}X^JEAN^^^", f"IPP{rng.randint(10**7, 10**8)}", f"19{rng.randint(40, 99)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}",
                f"ACC{rng.randint(10**6, 10**7)}", f"DOCTOR{i % 40:02d}^MARIE", f"Hopital {i % 7} Lyon"}
    return ids


def _file_with_a_hit(folder: Path, uid: str) -> Path:
    """A folder holding one DICOM file of the bundled sample whose ImageComments hold ``uid`` (the scan then
    names its element, as for a class UID the key store holds: one file of the run's dataset)."""
    import pydicom

    folder.mkdir(parents=True)
    sample = sorted((REPO / "src/pacs2bids/data/sample/PACSMAN_data/dicomseries").glob("*.dcm"))[0]
    ds = pydicom.dcmread(sample)
    ds.ImageComments = f"see {uid}"
    ds.save_as(folder / "a.dcm")
    return folder


def measure_memory(build, ids: set[str]) -> tuple[float, float, float]:
    """(seconds, peak MB, kept MB) of ``build(ids)`` under tracemalloc."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    rules = build(ids)
    took = time.perf_counter() - t
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del rules
    return took, (peak - base) / 1e6, (cur - base) / 1e6


def read_floor(root: Path) -> float:
    t = time.perf_counter()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as fh:
                    while fh.read(1 << 20):
                        pass
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="6c4a227")
    ap.add_argument("--root", type=Path)
    ap.add_argument("--keys", type=Path)
    ap.add_argument("--project", default="bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--uids", default="3000,30000")
    args = ap.parse_args(argv)
    from pacs2bids.deid import leakrules, leakscan

    with tempfile.TemporaryDirectory() as tmp:
        old_scan, old_rules = load_base(args.base, Path(tmp))
        for rules in (leakrules, old_rules):  # the word lists: loaded once, before, by code that keeps them
            getattr(rules, "common_words", lambda: None)()
        if args.memory:
            for n in (int(x) for x in args.uids.split(",")):
                ids = synthetic_identifiers(n)
                hit = _file_with_a_hit(Path(tmp) / f"hit{n}", min(ids))
                for label, build, scan in (("base", old_rules.build_rules, old_scan.scan_for_leaks),
                                           ("new", leakrules.build_rules, leakscan.scan_for_leaks)):
                    took, peak, kept = measure_memory(build, ids)
                    print(f"{n:>7} UIDs {label:>4}: build {took:6.2f} s, peak {peak:7.1f} MB, kept {kept:7.1f} MB")
                    took, peak, kept = measure_memory(lambda i: scan(hit, build(i)), ids)
                    print(f"{'':>12} {label:>4}: build + scan of a file with a hit {took:6.2f} s, peak {peak:7.1f} MB")
        if args.root:
            scan_speed(args, old_scan, old_rules, leakscan, leakrules)
    return 0


def scan_speed(args, old_scan, old_rules, leakscan, leakrules) -> None:
    from pacs2bids.deid.keystore import KeyStore

    secret = os.environ.get("PACS2BIDS_BENCH_SECRET", DEFAULT_SECRET).encode()
    ids = KeyStore(args.keys, project=args.project, secret=secret).identifiers()
    builds = {"base": old_rules.build_rules, "new": leakrules.build_rules}
    scans = {"base": old_scan.scan_for_leaks, "new": leakscan.scan_for_leaks}
    times: dict[str, list[float]] = {"base": [], "new": [], "floor": []}
    hits = {}
    for _ in range(args.rounds):
        times["floor"].append(read_floor(args.root))
        for label in ("base", "new"):
            t = time.perf_counter()  # as the run's task: rules built from the key store's values, then the scan
            hits[label] = scans[label](args.root, builds[label](ids))
            times[label].append(time.perf_counter() - t)
    print(f"{len(ids)} identifiers; {args.rounds} rounds: " + "; ".join(
        f"{k} {' / '.join(f'{x:.2f}' for x in v)} s (median {statistics.median(v):.2f})" for k, v in times.items()))
    print(f"speed-up (medians): {statistics.median(times['base']) / statistics.median(times['new']):.2f}x; "
          f"new / floor: {statistics.median(times['new']) / statistics.median(times['floor']):.1f}x")
    for label, found in hits.items():
        print(f"hits {label}: {len(found)} {sorted((h.path, h.field) for h in found)[:10]}")


if __name__ == "__main__":
    raise SystemExit(main())
