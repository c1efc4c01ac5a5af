"""The command line as a data engineer uses it: run as a subprocess against a real Orthanc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import write_spec
from pacs2bids.dicomfiles import iter_dicom_files

SECRET = "cli-secret-0123456789abcdef"


def cli(*args, env_extra=None, timeout=600):
    env = {**os.environ, "PACS2BIDS_PROJECT_SECRET": SECRET, "NIPYPE_NO_ET": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pacs2bids.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def spec_for(tmp: Path, pacs, patient_id: str) -> Path:
    return write_spec(tmp, f"patient_id,subject\n{patient_id},01\n", project="cli-test", pacs=pacs, output=tmp / "out")


def test_bad_spec_is_refused_before_anything_runs(tmp_path):
    spec = write_spec(tmp_path, "patient_id,subject\nX1,01\n", project="p",
                      pacs="{dimse: {ae_title: A, host: 127.0.0.1, port: 1}}",
                      selection="{inclusions: inclusions.csv, colour: blue}", output="out")
    r = cli("run", str(spec))
    assert r.returncode == 2 and "selection.colour: unknown key" in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_secret_is_refused(tmp_path, orthanc_factory):
    pacs = orthanc_factory(dicomweb=False)
    r = cli("run", str(spec_for(tmp_path, pacs, "X")), env_extra={"PACS2BIDS_PROJECT_SECRET": ""})
    assert r.returncode == 2 and "PACS2BIDS_PROJECT_SECRET is not set" in r.stderr


def test_deid_dry_run_and_check(tmp_path, orthanc_factory, sample_dir):
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    spec = spec_for(tmp_path, pacs, "phantom")
    r = cli("deid", "--dry-run", str(spec))
    assert r.returncode == 0, r.stderr
    assert "sub-01 series 201" in r.stdout and "PatientName" in r.stdout
    assert "Leibniz" not in r.stdout  # original values are masked
    assert not (tmp_path / "out").exists()
    r = cli("check", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[ok] c-echo" in r.stdout and "[ok] c-find" in r.stdout and "[FAIL]" not in r.stdout, r.stdout


def test_check_and_run_with_a_host_that_does_not_resolve(tmp_path):
    """A clear error and an exit code, never a raw socket.gaierror traceback."""
    spec = write_spec(tmp_path, "patient_id,subject\nX1,01\n", project="cli-test",
                      pacs="{dimse: {ae_title: ORTHANC, host: no-such-host.invalid, port: 104, timeout: 3}}",
                      output=tmp_path / "out", retries="{attempts: 0}")
    r = cli("check", str(spec))
    assert r.returncode == 1 and "[FAIL] c-echo" in r.stdout and "does not resolve" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "check: 1 failed (c-echo)" in r.stderr, r.stderr
    r = cli("run", str(spec), env_extra={"PREFECT_HOME": str(tmp_path / "prefect")})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "does not resolve" in r.stdout + r.stderr and "gaierror" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / ".out.pacs2bids-work").glob("staging-*")), "a failed run's staging was left"
    assert not list((tmp_path / ".out.pacs2bids-work").glob("scratch-*")), "a failed run's scratch was left"


def test_run_without_a_terminal_prints_progress_lines(tmp_path, orthanc_factory, sample_dir):
    """stderr is a pipe here: progress goes there as lines (no bar), counts and labels only."""
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    r = cli("run", str(spec_for(tmp_path, pacs, "phantom")), env_extra={"PREFECT_HOME": str(tmp_path / "prefect")})
    assert r.returncode in (0, 3), r.stdout + r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("pacs2bids: progress: ")]
    assert lines and lines[0].startswith("pacs2bids: progress: studies 0/1 · series 0/"), r.stderr[-3000:]
    assert lines[-1].startswith("pacs2bids: progress: studies 1/1 · ") and lines[-1].endswith("· done"), lines
    assert "\r" not in r.stderr and "phantom" not in "\n".join(lines)
