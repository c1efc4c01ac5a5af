"""Cost of opening the matching key once per series task, as a project grows.

    .venv/bin/python benchmarks/bench_keystore.py [--series 250] [--uids 2000]

Builds a key store of ``--series`` series records, each with ``--uids`` original UIDs and a
few names and IDs (as a series of that many instances teaches it), then times, in the same
process:

- cold (the baseline): a Pseudonymiser constructed in a process that has not read the store
  yet: every line decrypted and folded, as every series task did before the per-process cache;
- warm: the same once another series was recorded, in a process that has read the store
  before (what a series task pays now: the new journal lines only).

Prints both, in seconds, and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser
from pacs2bids.deid.keystore import KeyStore

SECRET = b"benchmark-secret-0123456789abcdef"


def record(ks: KeyStore, i: int, uids: int) -> None:
    ks.record_series(
        f"{i % 500:03d}",
        patient_ids=[f"PID{i:08d}"],
        patient_names=[f"NAME{i}^GIVEN{i}"],
        studies={f"1.2.826.0.1.3680043.2.1125.{i}": {"date": "20240101"}},
        identifiers=[f"PID{i:08d}", f"NAME{i}^GIVEN{i}", f"ACC{i:07d}"]
        + [f"1.2.826.0.1.3680043.2.1125.{i}.{j}" for j in range(uids)],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=250)
    ap.add_argument("--uids", type=int, default=2000)
    args = ap.parse_args()
    settings = PseudonymizationSettings()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "keys"
        writer = KeyStore(store, project="bench", secret=SECRET)
        for i in range(args.series):
            record(writer, i, args.uids)
        n = len(writer.identifiers())
        KeyStore.forget_cache()

        t = time.perf_counter()
        Pseudonymiser("bench", SECRET, settings, store)
        cold = time.perf_counter() - t

        record(writer, args.series, args.uids)  # another series task recorded meanwhile
        t = time.perf_counter()
        p = Pseudonymiser("bench", SECRET, settings, store)
        warm = time.perf_counter() - t
        assert len(p.identifiers()) == n + args.uids + 3

    print(f"key store: {args.series} series, {n} identifiers")
    print(f"  cold open (baseline, no cache): {cold:8.3f} s")
    print(f"  warm open (one series appended): {warm:8.3f} s")
    print(f"  ratio cold/warm: {cold / warm:6.1f}x")


if __name__ == "__main__":
    main()
