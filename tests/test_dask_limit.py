"""Scale-out (issue 14): the per-PACS limit holds across the worker processes of a local Dask cluster.

The sample's 5 studies are extracted by a ``LocalCluster`` of 2 worker processes, the PACS's
``pacs.max_associations`` (its Prefect global concurrency limit) set to 1, then to 2. The
connections are counted on the PACS's side, by the kernel, not by any record of the gate:
the sockets Orthanc accepted on its DICOM port, ESTABLISHED in the TCP table (/proc/net/tcp),
each attributed to the process (flow or Dask worker) holding its other end. With a limit of 1
no sample sees 2 of them at once; with 2 the two workers are seen connected at once, so the
measurement can see what the limit forbids.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import psutil
import pytest

from conftest import write_spec
from pacs2bids.testing_sampling import Sampling, tcp_table

SECRET = "dask-limit-secret-0123456789abcdef"


@dataclass
class PacsSideSampler(Sampling):
    """Samples, every ``interval`` s in a thread, the connections the PACS accepted on ``port``.

    A sample is two reads of the table back to back and keeps the sockets listed in both: all
    were open at the instant between the reads (one read alone is no snapshot). Each connection
    is attributed, through the client port, to the process of this test's tree holding it."""

    port: int
    interval: float = 0.01
    peak: int = 0
    samples: int = 0
    owners_at_once: list[set] = field(default_factory=list)  # owners of the connections, samples with 2 or more
    _owner: dict[int, int] = field(default_factory=dict)  # client port -> pid

    def _attribute(self, client_ports: set[int]) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                for c in proc.net_connections(kind="tcp"):
                    if c.raddr and c.raddr.port == self.port and c.laddr.port in client_ports:
                        self._owner[c.laddr.port] = proc.pid
            except psutil.Error:
                continue

    def sample(self) -> None:
        first = tcp_table()
        second = tcp_table()
        accepted = {second[i][1] for i in first.keys() & second.keys()
                    if first[i] == second[i] and second[i][0] == self.port}
        self.samples += 1
        self.peak = max(self.peak, len(accepted))
        if accepted - self._owner.keys():
            self._attribute(accepted - self._owner.keys())
        if len(accepted) > 1:
            self.owners_at_once.append({self._owner.get(p) for p in accepted})


@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 2])
def test_the_pacs_limit_holds_across_dask_worker_processes(
        limit, tmp_path, orthanc_factory, sample_dir, prefect_harness, monkeypatch):
    from test_dask import _worker_pids

    from pacs2bids.demo import sample_patients
    from pacs2bids.dicomfiles import iter_dicom_files
    from pacs2bids.flows.extract import extract_project

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.delenv("PACS2BIDS_TASK_RUNNER", raising=False)
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir))
    patients = sample_patients(sample_dir)
    rows = "patient_id,subject\n" + "".join(f"{p},{n:02d}\n" for n, p in enumerate(patients, 1))
    dimse = f"{{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.dicom_port}, retrieve: c-get, max_associations: 4}}"
    path = write_spec(tmp_path, rows, project=f"limit{limit}", output=str(tmp_path / "ds"),
                      pacs=f"{{dimse: {dimse}, max_associations: {limit}}}",
                      task_runner="{kind: dask, dask_workers: 2}",
                      selection="{inclusions: inclusions.csv, modalities: [MR]}")
    started = time.monotonic()
    with PacsSideSampler(pacs.dicom_port) as sampler:
        state = extract_project(str(path), return_state=True)
    summary = state.result()
    assert summary["published"] and summary["state"] == "completed", (summary["errors"], summary["series"])
    assert summary["studies"] == len(patients) >= 5
    workers = set(_worker_pids(state.state_details.flow_run_id).values())
    assert len(workers) == 2 and os.getpid() not in workers  # both worker processes extracted studies

    detail = (f"limit {limit}: peak {sampler.peak} over {sampler.samples} samples in "
              f"{time.monotonic() - started:.0f} s; workers {sorted(workers)}, flow {os.getpid()}; "
              f"owners when 2+ were open: {sampler.owners_at_once[:10]}")
    assert sampler.samples > 100, detail
    assert sampler.peak <= limit, detail
    if limit > 1:  # the measurement sees two workers connected at once when the limit allows it
        assert any(workers <= owners for owners in sampler.owners_at_once), detail
    print(detail)
