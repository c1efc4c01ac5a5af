"""The PACS limit's gate (tasks/pacs_limit.py): this tree's against another commit's, alternated in one process.

    .venv/bin/python benchmarks/bench_gate.py [--base COMMIT] [--rounds 3] [--connections 4] [--limit 2]

One Prefect API server is started as ``pacs2bids run`` starts its own (:class:`pacs2bids.prefectserver.RunServer`,
loopback). Each round, ``--connections`` threads each take a slot 3 times, hold it 50 ms (a small study's
retrieval) and give it back, through a limit of ``--limit`` slots: per version, the round's wall time and the
median wait for a slot and median release. The base's ``tasks/pacs_limit.py`` is read with ``git show``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_round(gate, connections: int, takes: int = 3, hold: float = 0.05) -> tuple[float, float, float]:
    """(wall time, median wait, median release) of ``connections`` threads taking ``takes`` slots each."""
    seen: list[tuple[float, float]] = []
    lock = threading.Lock()

    def connection() -> None:
        for _ in range(takes):
            asked = time.monotonic()
            release = gate()
            waited = time.monotonic() - asked
            time.sleep(hold)
            given = time.monotonic()
            release()
            with lock:
                seen.append((waited, time.monotonic() - given))

    started = time.monotonic()
    threads = [threading.Thread(target=connection) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.monotonic() - started, statistics.median(w for w, _ in seen),
            statistics.median(r for _, r in seen))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="6c4a227")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--limit", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pacs2bids.prefectserver import RunServer

    base_src = Path(tempfile.mkdtemp()) / "pacs_limit_base.py"
    base_src.write_text(subprocess.run(["git", "-C", str(REPO), "show", f"{args.base}:tasks/pacs_limit.py"],
                                       check=True, capture_output=True, text=True).stdout)
    server = RunServer()
    try:
        server.wait(120)
        os.environ["PREFECT_API_URL"] = server.url
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        modules = {"base": load(base_src, "pacs_limit_base"), "this tree": load(REPO / "tasks" / "pacs_limit.py",
                                                                                "pacs_limit_tree")}
        gates = {}
        with get_client(sync_client=True) as client:
            for k, (name, module) in enumerate(modules.items()):
                limit = f"bench-gate-{k}"
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=args.limit,
                                                                                    active=True))
                gates[name] = module.PrefectGate(limit)
        for r in range(args.rounds):
            for name, gate in gates.items():
                took, wait, release = one_round(gate, args.connections)
                print(f"round {r} {name:9s}: {took:5.2f} s in all, median wait {wait:.3f} s, "
                      f"median release {release:.3f} s", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
