"""Full extraction on 1 and on 2 Dask worker processes (issue 14, Figures), on bench_replicate's set-up.

Called by ``benchmarks/bench_replicate.py`` in its process, on its PACS (Orthanc on loopback with
the project's synthetic studies) and under its Prefect backend, before the new studies arrive. For
each per-PACS limit (``pacs.max_associations``, a Prefect global concurrency limit shared by every
process), the whole project is extracted twice, each time into a fresh folder (spec, work area,
output, key store): with ``task_runner: {kind: dask, dask_workers: 1}`` and with ``dask_workers: 2``
(a ``LocalCluster`` of worker processes the runner starts and stops; its start is timed: a site
pays it per run).

Per run it records: the wall time, the most connections Orthanc held open at once on its DICOM
port (sampled on the PACS's side, from the kernel's TCP table, every 10 ms: see
:class:`PacsSideConnections`), whether that stayed within the limit, and the published dataset's
files (path and, for images, SHA-256), compared with the first full extraction's (thread runner),
so that every figure is the same work.

Then, per limit, the same extraction on the thread runner with 1 thread: the time per study on 1 Dask
worker against 1 thread of the flow's process (the Dask figure includes starting the cluster).

Not measured here: 2 Prefect process workers of a real ``prefect server``. They spread whole flow
runs (several projects), not one project's studies: one project's figure on them is the 1-worker one.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from pacs2bids.testing_sampling import Sampling, slots_held, tcp_table

def _accepted(port: int) -> set[int]:
    """Client ports of the ESTABLISHED TCP connections whose local port is ``port`` (the PACS's side)."""
    return {remote for local, remote in tcp_table().values() if local == port}


@dataclass
class PacsSideConnections(Sampling):
    """The most connections the PACS held at once on ``port``, sampled in a thread every ``interval`` s.

    A sample is two reads of the kernel's table back to back, keeping the connections seen in both
    (open at the instant between them), as tests/test_dask_limit.py does. Linux only: elsewhere
    ``samples`` stays 0 and the peak is reported as unknown."""

    port: int
    interval: float = 0.01
    peak: int = 0
    samples: int = 0

    def sample(self) -> None:
        if Path("/proc/net/tcp").exists():
            self.peak = max(self.peak, len(_accepted(self.port) & _accepted(self.port)))
            self.samples += 1


def dataset_files(root: Path) -> dict[str, str]:
    """The published dataset's subject files: relative path -> SHA-256 for NIfTI images, "" otherwise
    (sidecars carry run times; ``_scans.tsv`` acquisition times are compared through the images)."""
    out = {}
    for p in sorted(root.rglob("sub-*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.startswith("sub-"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.name.endswith(".nii.gz") else ""
    return out


def full_run(write_spec, o, folder: Path, patients: int, workers: int, limit: int, kind: str = "dask") -> dict:
    """One full extraction into ``folder`` (fresh) on a LocalCluster of ``workers`` Dask processes
    (``kind="threads"``: on the thread runner, ``workers`` threads in this process)."""
    from pacs2bids.config import load_spec
    from pacs2bids.flows.extract import extract_project
    from pacs2bids.tasks.pacs_limit import pacs_limit_name

    folder.mkdir(parents=True)
    setting = f"dask_workers: {workers}" if kind == "dask" else f"max_workers: {workers}"
    spec = write_spec(folder, o, patients, extra=f"task_runner: {{kind: {kind}, {setting}}}\n", limit=limit)
    with PacsSideConnections(o.dicom_port) as seen:
        t = time.perf_counter()
        summary = extract_project(str(spec))
        seconds = time.perf_counter() - t
    assert summary["published"] and summary["state"] == "completed", (summary["errors"], summary["state"])
    held = slots_held(pacs_limit_name(load_spec(spec)))
    if held:  # the next figure would wait for them (for ever, on a server that does not revoke leases)
        raise RuntimeError(f"{held} slot(s) of the PACS limit still held after the run on {workers} {kind} worker(s): "
                           "a stopped worker did not give them back")
    files = dataset_files(load_spec(spec).output)
    return {"workers": workers, "limit": limit, "seconds": seconds, "studies": summary["studies"],
            "peak_connections": seen.peak if seen.samples else None, "samples": seen.samples,
            "limit_held": (seen.peak <= limit) if seen.samples else None, "files": files}


def scaleout(write_spec, o, tmp: Path, patients: int, limits: list[int], reference: dict[str, str]) -> dict:
    """Full extractions on 1 then 2 workers for each limit; figures with ratios and the dataset check
    against ``reference`` (the first full extraction's :func:`dataset_files`)."""
    runs = []
    for limit in limits:
        for workers in (1, 2):
            run = full_run(write_spec, o, tmp / f"dask{workers}-limit{limit}", patients, workers, limit)
            run["same_files"] = run.pop("files") == reference
            runs.append(run)
    ratios = {}
    for limit in limits:
        one, two = (next(r for r in runs if r["limit"] == limit and r["workers"] == w) for w in (1, 2))
        ratios[str(limit)] = two["seconds"] / one["seconds"]
    # per study, 1 Dask worker against 1 thread of the flow's process: what a study costs on a worker
    threads = {str(limit): full_run(write_spec, o, tmp / f"threads1-limit{limit}", patients, 1, limit, "threads")
               for limit in limits}
    per_study = {}
    for limit in limits:
        one = next(r for r in runs if r["limit"] == limit and r["workers"] == 1)
        t = threads[str(limit)]
        per_study[str(limit)] = {"dask_1_worker": one["seconds"] / one["studies"],
                                 "thread_1": t["seconds"] / t["studies"], "thread_same_files": t["files"] == reference}
    return {"runs": runs, "ratio_2_over_1": ratios, "reference_files": len(reference), "per_study": per_study}


def table(fig: dict) -> str:
    """The scale-out figures as printed lines."""
    out = ["full extraction of the same project, Dask LocalCluster, fresh output each (C-GET):",
           f"{'workers':>7} {'limit':>5} {'s':>8} {'2w / 1w':>8} {'studies':>7} {'peak conn':>9} "
           f"{'limit held':>10} {'same files':>10}"]
    for r in fig["runs"]:
        ratio = f"{fig['ratio_2_over_1'][str(r['limit'])]:.3f}" if r["workers"] == 2 else ""
        peak = "?" if r["peak_connections"] is None else str(r["peak_connections"])
        held = "?" if r["limit_held"] is None else ("yes" if r["limit_held"] else "NO")
        out.append(f"{r['workers']:>7} {r['limit']:>5} {r['seconds']:>8.1f} {ratio:>8} {r['studies']:>7} "
                   f"{peak:>9} {held:>10} {'yes' if r['same_files'] else 'NO':>10}")
    out.append(f"(same files: the dataset's {fig['reference_files']} subject files, images by SHA-256, equal to "
               "the first full extraction's)")
    for limit, p in fig.get("per_study", {}).items():
        out.append(f"per study, limit {limit}: 1 Dask worker {p['dask_1_worker']:.2f} s, 1 thread {p['thread_1']:.2f} s "
                   f"(Dask / thread {p['dask_1_worker'] / p['thread_1']:.2f}; thread run same files: "
                   f"{'yes' if p['thread_same_files'] else 'NO'})")
    return "\n".join(out)
