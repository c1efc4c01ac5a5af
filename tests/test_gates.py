"""The two gates that make publishing safe (flows/extract.py ``_check_and_publish``), each made
to stop a real run: the leak scan, and the BIDS validator.

A first run publishes a small dataset from a real Orthanc (two real MR images carrying a planted
identity). The second run goes through the gates again (new sidecar fields make it re-convert the
published session: a run with nothing new publishes nothing), with a fault planted in staging by
wrapping ``finalise_dataset``, the step just before the gates, in-process: an identity the
pseudonymiser never saw (so could not remove) but the scan knows from the key store, or a file
the validator must refuse. The gate is what is under test: each test fails if its gate's call
is removed from the flow. The run must raise :class:`RunFailed`, name the reason in its
summary, and leave ``output`` byte for byte as the first run published it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import write_spec

SECRET = "gates-test-secret-0123456789"
NAME, PID = "PORTEGATE^Alberte", "GATE-PID-551177"


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks resolved) and the SHA-256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def published(prefect_harness, orthanc_factory, sample_dir, tmp_path, monkeypatch):
    """A project published once; returns (spec path, output folder, its files before)."""
    from pacs2bids.flows.extract import extract_project

    t1 = sorted((sample_dir / "dcm_qa_nih" / "In" / "20180918Si" / "mr_0003").glob("*.dcm"))  # converted by auto
    assert len(t1) == 2
    study = generate_uid()
    (tmp_path / "up").mkdir()
    upload = []
    for i, f in enumerate(t1):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.StudyInstanceUID = NAME, PID, study
        ds.save_as(tmp_path / "up" / f"t1-{i}.dcm")
        upload.append(tmp_path / "up" / f"t1-{i}.dcm")
    pacs = orthanc_factory()
    assert pacs.upload(upload) == len(upload)
    out = tmp_path / "out" / "ds"
    spec = write_spec(tmp_path, f"patient_id,subject\n{PID},05\n", project="gates", pacs=pacs,
                      selection="{inclusions: inclusions.csv, modalities: [MR]}",
                      pseudonymization="{secret_env: P2B_GATES_SECRET}", heuristic="auto", output=out,
                      retries="{attempts: 1, backoff_seconds: 0.2}")
    monkeypatch.setenv("P2B_GATES_SECRET", SECRET)
    first = extract_project(str(spec))
    assert first["published"] and first["state"] == "completed", first
    assert list((out / "sub-05").rglob("*.nii.gz"))
    return spec, out, tree(out)


def plant_before_gates(monkeypatch, plant) -> list[Path]:
    """Wrap the flow's ``finalise_dataset``: after it, ``plant(staging)`` runs. Returns the
    staging folders it was called with (to check the fault really was in place)."""
    import pacs2bids.flows.extract as flow

    original, seen = flow.finalise_dataset, []

    def finalise_then_plant(staging, *args, **kwargs):
        result = original(staging, *args, **kwargs)
        plant(Path(staging))
        seen.append(Path(staging))
        return result

    monkeypatch.setattr(flow, "finalise_dataset", finalise_then_plant)
    return seen


def run_must_fail(spec: Path) -> dict:
    from pacs2bids.flows.extract import RunFailed, extract_project

    # something new for the run (a re-run with nothing new publishes nothing, so passes no gate): new
    # sidecar fields re-convert the published session
    spec.write_text(spec.read_text() + "sidecar_fields: {T1w: {PulseSequenceDetails: gates}}\n")
    with pytest.raises(RunFailed) as failed:
        extract_project(str(spec))
    summary = failed.value.summary
    assert summary["state"] == "failed" and not summary["published"]
    return summary


@pytest.mark.slow
def test_leak_scan_stops_the_run(published, monkeypatch):
    """An identifier the key store holds, in a file the pseudonymiser never handled (free text the
    flow would publish as it is): the scan must find it and nothing may be published."""
    spec, out, before = published

    def plant(staging: Path) -> None:
        readme = staging / "README"
        readme.write_text(readme.read_text() + f"\nAcquired for patient {PID}.\n")

    seen = plant_before_gates(monkeypatch, plant)
    summary = run_must_fail(spec)
    assert seen, "the fault was never planted: the run did not reach the gates"
    (error,) = summary["errors"]
    assert "identifying value(s) found before publishing" in error and "README" in error
    assert PID not in json.dumps(summary)  # the summary names where, never what
    assert tree(out) == before


@pytest.mark.slow
def test_validator_stops_the_run(published, monkeypatch):
    """A file the BIDS validator must refuse (a broken sidecar, and a file no BIDS rule allows)."""
    spec, out, before = published

    def plant(staging: Path) -> None:
        sidecar = next((staging / "sub-05").rglob("*.json"))
        sidecar.write_text('{"RepetitionTime": ')  # not JSON
        (staging / "sub-05" / "not_bids.dat").write_bytes(b"x")

    seen = plant_before_gates(monkeypatch, plant)
    summary = run_must_fail(spec)
    assert seen, "the fault was never planted: the run did not reach the gates"
    (error,) = summary["errors"]
    assert "bids-validator found" in error and "error(s)" in error
    assert tree(out) == before
