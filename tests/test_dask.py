"""Scale-out (issue 14): the per-study work on a local Dask cluster of 2 worker processes gives the
same dataset as the thread runner; the task runner settings; what travels to a worker pickles."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest

from conftest import write_spec
from pacs2bids.config import load_spec
from pacs2bids.errors import SpecError

SECRET = "dask-secret-0123456789abcdef"
PACS = "{dimse: {ae_title: A, host: 127.0.0.1, port: 104}}"


def _spec(folder: Path, monkeypatch, **keys):
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    return load_spec(write_spec(folder, "patient_id,subject\nP1,01\n", project="dask", pacs=PACS,
                                output=str(folder / "out"), **keys))


def test_task_runner_settings_spec_and_environment(tmp_path, monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner

    from pacs2bids.tasks.runner import study_runner

    monkeypatch.delenv("PACS2BIDS_TASK_RUNNER", raising=False)
    spec = _spec(tmp_path / "a", monkeypatch, task_runner="{max_workers: 7}")
    with study_runner(spec) as (runner, _task):
        assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 7
    with study_runner(spec, []) as (runner, _task):
        assert runner is None  # nothing to extract: nothing started
    assert _spec(tmp_path / "b", monkeypatch).task_runner.max_workers == 4
    monkeypatch.setenv("PACS2BIDS_TASK_RUNNER", "dask")
    monkeypatch.setenv("PACS2BIDS_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    chosen = spec.task_runner.from_environment()
    assert (chosen.kind, chosen.dask_address) == ("dask", "tcp://127.0.0.1:8786")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", "")
    # no API URL at all, even when an earlier test of the session opened Prefect's test harness (which
    # holds one in a settings context, not in the environment)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(SpecError, match="PREFECT_API_URL"):
            with study_runner(spec):
                pass
    monkeypatch.setenv("PACS2BIDS_TASK_RUNNER", "cluster")
    with pytest.raises(SpecError, match="threads or dask"):
        with study_runner(spec):
            pass
    with pytest.raises(Exception, match="dask_address"):
        _spec(tmp_path / "c", monkeypatch, task_runner="{kind: dask, dask_address: 'host:8786'}")


def test_what_a_worker_receives_pickles(tmp_path, monkeypatch):
    from pacs2bids.model import SeriesRef, StudyRef
    from pacs2bids.run import RunContext

    spec = _spec(tmp_path, monkeypatch)
    study = StudyRef(inclusion_row=1, subject="01", session=None, study_instance_uid="1.2.3",
                     series=[SeriesRef("1.2.3", "1.2.3.4", modality="MR", series_number=1)])
    ctx = RunContext(spec, "20260101T000000Z-x", None, tmp_path / "staging", {"pacs2bids": "0"})
    for obj in (spec, study, ctx):
        back = pickle.loads(pickle.dumps(obj))
        assert back == obj or vars(back).keys() == vars(obj).keys()
    assert pickle.loads(pickle.dumps(spec)).secret_bytes == SECRET.encode()


def _dataset(root: Path) -> dict[str, str]:
    """Every subject file of a published dataset: relative path -> SHA-256 (NIfTI, DICOM, sidecars)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.startswith("sub-") and not rel.endswith("_scans.tsv"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.name.endswith(".nii.gz") else ""
    return out


@pytest.mark.slow
def test_a_local_dask_cluster_of_two_processes_extracts_the_sample_like_the_thread_runner(
        tmp_path, orthanc_factory, sample_dir, prefect_harness, monkeypatch):
    from pacs2bids.demo import sample_patients
    from pacs2bids.dicomfiles import iter_dicom_files
    from pacs2bids.flows.extract import extract_project
    from pacs2bids.validate import validate_dataset

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.delenv("PACS2BIDS_TASK_RUNNER", raising=False)
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir))
    rows = "patient_id,subject\n" + "".join(f"{p},{n:02d}\n" for n, p in enumerate(sample_patients(sample_dir), 1))
    outputs, pids, flow_runs = {}, {}, {}
    for kind in ("threads", "dask"):
        folder = tmp_path / kind
        folder.mkdir()
        path = write_spec(folder, rows, project="sample", pacs=pacs, output=str(folder / "ds"),
                          task_runner=f"{{kind: {kind}, dask_workers: 2}}",
                          selection="{inclusions: inclusions.csv, modalities: [MR]}")
        state = extract_project(str(path), return_state=True)
        summary = state.result()
        flow_runs[kind] = state.state_details.flow_run_id
        assert summary["published"] and summary["state"] == "completed", (summary["errors"], summary["series"])
        outputs[kind] = load_spec(path).output
        pids[kind] = summary
    report = validate_dataset(outputs["dask"])
    assert report.errors == [] if hasattr(report, "errors") else report.check() is None
    threads, dask = _dataset(outputs["threads"]), _dataset(outputs["dask"])
    assert threads and dask == threads
    assert pids["dask"]["studies"] == pids["threads"]["studies"] >= 5
    workers = _worker_pids(flow_runs["dask"])
    assert len(workers) == pids["dask"]["studies"] and os.getpid() not in set(workers.values())
    assert _orphans() == []  # the workers' de-identification processes ended with them


def _orphans(wait: float = 20.0) -> list[str]:
    """Processes the Dask workers started (the de-identification pool's forkserver and its workers name
    the worker's scratch folder) that are still alive ``wait`` seconds after the run."""
    import time

    import psutil

    deadline = time.monotonic() + wait
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(p.info["cmdline"] or [])
            if "multiprocessing.forkserver" in line and "dask-scratch-space" in line:
                left.append(f"{p.info['pid']}: {line[:120]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _worker_pids(flow_run_id) -> dict[str, int]:
    """sub -> the process that extracted it, from the flow run's logs in Prefect's API."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    found = {}
    for entry in logs:
        m = re.match(r"sub-(\w+): on worker \S+, process (\d+)", entry.message)
        if m:
            found[m.group(1)] = int(m.group(2))
    return found
