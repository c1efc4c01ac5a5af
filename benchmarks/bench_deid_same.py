"""Same outputs, byte for byte: pacs2bids.deid of this tree against another (``--base SRC``).

    .venv/bin/python benchmarks/bench_deid_same.py --base DIR/src [--new DIR2/src] [root ...]

Every series (files grouped by folder and Series Instance UID) of the roots (default: the shared
corpus, the vendors corpus and the bundled sample) is pseudonymised by one project, in order,
once with the default profile and once with ``rtnLongFullDatesOpt`` + ``cleanDescOpt``, by each
version in its own child process (``PYTHONPATH``). Each child prints one digest per series: the
SHA-256 of every output file with its name, the series result (its record, names, dropped and
quarantined files) and, at the end, the key store's folded document. The two listings must be
equal; the first difference is printed (digests only: no value of the files).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = [REPO.parent / "shared" / "data" / "dicom", REPO.parent / "shared" / "data" / "dicom-vendors",
         REPO / "src" / "pacs2bids" / "data" / "sample"]
PROFILES = {"default": [], "dates+desc": ["rtnLongFullDatesOpt", "cleanDescOpt"]}


def stage(roots: list[Path], work: Path) -> list[Path]:
    """Copy every DICOM file of ``roots`` (gzip opened) into one folder per series; the folders, in order."""
    import pydicom
    from pacs2bids.dicomfiles import iter_dicom_bytes

    folders: dict[tuple, Path] = {}
    for root in roots:
        for path, data in iter_dicom_bytes(root):
            try:
                uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).get("SeriesInstanceUID", ""))
            except Exception:  # noqa: BLE001 - an unreadable file is a series of its own
                uid = path.name
            key = (str(path.parent), uid)
            folder = folders.setdefault(key, work / f"{len(folders):04d}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{len(list(folder.iterdir())):05d}.dcm").write_bytes(data)
    return list(folders.values())


def _plain(obj):
    return sorted(obj) if isinstance(obj, (set, frozenset)) else str(obj)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_plain).encode()).hexdigest()[:16]


def run(folders: list[Path], out: Path, options: list[str]) -> None:
    """Pseudonymise every folder as one series of one project; print one digest line per series."""
    from pacs2bids.config import PseudonymizationSettings
    from pacs2bids.deid import Pseudonymiser

    warnings.simplefilter("ignore")
    p = Pseudonymiser("same", b"same-outputs-secret-0123456789", PseudonymizationSettings(options=options, workers=1),
                      out / "keys")
    for k, folder in enumerate(folders):
        target = out / "series" / folder.name
        res = p.pseudonymise_series(sorted(folder.iterdir()), target, subject=f"{k % 7:02d}", session=None,
                                    quarantine_dir=out / "q" / folder.name)
        files = sorted((f.name, hashlib.sha256(f.read_bytes()).hexdigest()[:16]) for f in target.iterdir())
        d = res.to_dict()
        d["written"] = [Path(w).name for w in d["written"]]
        print(folder.name, _digest(files), _digest(d), len(files), flush=True)
    with p.key_store._locked(exclusive=False):
        print("keystore", _digest(p.key_store._load().doc), flush=True)


def child(src: Path, folders: list[Path], out: Path, options: list[str]) -> list[str]:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_deid_same as b; "
            "from pathlib import Path; import json; "
            "b.run([Path(x) for x in json.loads(sys.argv[1])], Path(sys.argv[2]), json.loads(sys.argv[3]))")
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", code, json.dumps([str(f) for f in folders]), str(out),
                           json.dumps(options)], env=env, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="*", type=Path, default=ROOTS)
    ap.add_argument("--base", type=Path, required=True, help="the src folder of the other version")
    ap.add_argument("--new", type=Path, default=REPO / "src", help="the src folder of this version (default: this tree)")
    args = ap.parse_args(argv)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="deid-same-") as tmp:
        work = Path(tmp)
        folders = stage(args.roots, work / "in")
        print(f"{len(folders)} series, {sum(len(list(f.iterdir())) for f in folders)} files", flush=True)
        for name, options in PROFILES.items():
            times = {}
            lines = {}
            for who, src in (("base", args.base.resolve()), ("new", args.new.resolve())):
                t = time.perf_counter()
                lines[who] = child(src, folders, work / f"{who}-{name}", options)
                times[who] = time.perf_counter() - t
            diff = [(a, b) for a, b in zip(lines["base"], lines["new"]) if a != b]
            diff += [("missing", x) for x in lines["base"][len(lines["new"]):]]
            bad += len(diff)
            print(f"{name}: {len(lines['new'])} lines, {len(diff)} differ; base {times['base']:.0f} s, "
                  f"new {times['new']:.0f} s", flush=True)
            for a, b in diff[:5]:
                print(f"  base {a}\n  new  {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
