"""Scale-out (issue 14): a Dask worker keeps its de-identification pool across the studies of a run, and
the run releases it (and the worker's associations) when its Dask part ends.

The sample's 5 studies are extracted by a ``LocalCluster`` of 1 worker process. A thread samples, every
20 ms, the processes the worker's de-identification pool runs in (the ``forkserver`` and the pool's
workers it forks: their command line names the worker's scratch folder). The pool stays for every
study: the same processes are seen throughout (stopped after each study, each study started new
ones: 5 studies x 2 workers). After the run no such process is left, and no slot of the PACS limit is
held (each would wait for ever on this test server, which does not revoke leases).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil
import pytest

from conftest import write_spec
from pacs2bids.testing_sampling import Sampling, slots_held

SECRET = "dask-lifecycle-secret-0123456789abcdef"
DEID_WORKERS = 2


@dataclass
class PoolProcesses(Sampling):
    """Every pid seen, sampled in a thread, of this test's Dask workers' de-identification processes."""

    interval: float = 0.02
    seen: set[int] = field(default_factory=set)

    def sample(self) -> None:
        for p in psutil.Process().children(recursive=True):  # this test's (other runs share the machine)
            try:
                line = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "multiprocessing.forkserver" in line and "dask-scratch-space" in line:
                self.seen.add(p.pid)


@pytest.mark.slow
def test_a_dask_worker_keeps_its_deid_pool_across_studies_and_the_run_releases_it(
        tmp_path, orthanc_factory, sample_dir, prefect_harness, monkeypatch):
    from test_dask import _orphans, _worker_pids

    from pacs2bids.config import load_spec
    from pacs2bids.demo import sample_patients
    from pacs2bids.dicomfiles import iter_dicom_files
    from pacs2bids.flows.extract import extract_project
    from pacs2bids.tasks.pacs_limit import pacs_limit_name

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.setenv("PACS2BIDS_DEID_WORKERS", str(DEID_WORKERS))  # the worker process inherits it
    monkeypatch.delenv("PACS2BIDS_TASK_RUNNER", raising=False)
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir))
    patients = sample_patients(sample_dir)
    rows = "patient_id,subject\n" + "".join(f"{p},{n:02d}\n" for n, p in enumerate(patients, 1))
    path = write_spec(tmp_path, rows, project="lifecycle", pacs=pacs, output=str(tmp_path / "ds"),
                      task_runner="{kind: dask, dask_workers: 1}",
                      selection="{inclusions: inclusions.csv, modalities: [MR]}")
    with PoolProcesses() as pool:
        state = extract_project(str(path), return_state=True)
    summary = state.result()
    assert summary["published"] and summary["state"] == "completed", (summary["errors"], summary["series"])
    assert summary["studies"] == len(patients) >= 5
    assert len(set(_worker_pids(state.state_details.flow_run_id).values())) == 1  # one worker did them all

    # the forkserver and the pool's workers, once: a pool stopped per study shows new workers per study
    assert 2 <= len(pool.seen) <= 1 + DEID_WORKERS, sorted(pool.seen)
    assert _orphans() == []  # released when the run's Dask part ended
    assert slots_held(pacs_limit_name(load_spec(path)), wait=10.0) == 0


def test_outside_a_dask_worker_a_study_releases_the_pools_itself():
    """The fallback: where no run plugin can reach (not on a Dask worker, or the run already released its
    workers), the end of a study stops the de-identification pool and releases the associations."""
    from pacs2bids.deid import pool as deid_pool
    from pacs2bids.tasks.workerpools import after_study, on_this_worker

    assert on_this_worker() is None
    first = deid_pool.executor(2)
    assert list(deid_pool.map_ordered(abs, [(-1,), (-2,)], 2)) == [1, 2]
    after_study()
    assert deid_pool._POOLS == {}
    assert deid_pool.executor(2) is not first  # a later study starts a new pool
    deid_pool.shutdown()
