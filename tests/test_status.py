"""``pacs2bids status`` (issue 14, E4) after a real replication against a real Orthanc: the version
published, the PACS, the last run, and what is pending (a row with no study), failing (a series the
heuristic refuses) and awaiting review (a quarantined screen save). No original identifier shows."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import write_spec
from pacs2bids.cli import main
from pacs2bids.config import load_spec
from pacs2bids.replicate import query_since
from test_deadletter import REFUSING_HEURISTIC
from test_quarantine import NO_PIXEL_CLEANING, plant_screen

SECRET = "status-test-secret-0123456789abc"


@pytest.mark.slow
def test_status_lists_versions_pending_failing_and_awaiting_review(prefect_harness, orthanc_factory, sample_dir,
                                                                   tmp_path, monkeypatch, capsys):
    from pacs2bids.flows.replicate import replicate_project

    files = sorted((sample_dir / "dcm_qa_nih" / "In" / "20180918Si" / "mr_0003").glob("*.dcm"))
    up = tmp_path / "up"
    up.mkdir()
    study1 = generate_uid()
    for pid, study in (("ST-PAT-1", study1), ("ST-PAT-2", generate_uid())):
        series = generate_uid()
        for f in files:
            ds = pydicom.dcmread(f)
            ds.PatientID, ds.PatientName = pid, f"DOE^{pid}"
            if pid == "ST-PAT-2":
                ds.SeriesDescription = "epi_pe_ap_refused"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(up / f"{pid}-{f.name}")
    screen = plant_screen(files[0], up / "screen.dcm", generate_uid(), study1)
    ds = pydicom.dcmread(screen)
    ds.PatientID, ds.PatientName = "ST-PAT-1", "DOE^ST-PAT-1"
    ds.save_as(screen)
    pacs = orthanc_factory()
    assert pacs.upload(sorted(up.iterdir())) == 2 * len(files) + 1
    (tmp_path / "refusing.py").write_text(REFUSING_HEURISTIC)
    out = tmp_path / "out" / "ds"
    spec_path = write_spec(tmp_path, "patient_id,subject\nST-PAT-1,01\nST-PAT-2,02\nST-PAT-3,03\n",
                           project="statproj", pacs=pacs, selection="{inclusions: inclusions.csv, modalities: [MR]}",
                           pseudonymization=f"{{secret_env: P2B_ST_SECRET, options: [{', '.join(NO_PIXEL_CLEANING)}]}}",
                           heuristic="refusing.py", output=out, retries="{attempts: 0, backoff_seconds: 0.1}")
    monkeypatch.setenv("P2B_ST_SECRET", SECRET)

    summary = replicate_project(str(spec_path))
    assert summary["published"] and summary["state"] == "completed with failures"
    # the failing subject's row keeps its watermark unset: it is asked for everything again next time
    assert sorted(query_since(load_spec(spec_path))) == [2, 4]

    assert main(["status", "--json", str(spec_path)]) == 0
    text = capsys.readouterr().out
    (st,) = json.loads(text)
    assert st["project"] == "statproj" and st["pacs"] == f"DIMSE {pacs.aet}@127.0.0.1:{pacs.dicom_port}"
    (v,) = st["versions"]
    # sub-01's series, and the screen save's series (its one file held in quarantine); not sub-02's failed one
    assert v["current"] and v["run_id"] == summary["run_id"] and (v["subjects"], v["series"]) == (1, 2)
    assert v["files"] > 0 and v["published"]
    assert st["last_run"]["run_id"] == summary["run_id"] and st["last_run"]["state"] == "completed with failures"
    assert st["last_replication"]["run_id"] == summary["run_id"]
    assert st["pending"] == [{"row": 3, "subject": "02"}, {"row": 4, "subject": "03"}]
    (f,) = st["failing"]
    assert f["subject"] == "02" and f["stage"] == "convert" and f["attempts"] == 1
    assert st["awaiting_review"] == 1

    assert main(["status", str(spec_path)]) == 0
    table = capsys.readouterr().out
    assert "project statproj" in table and "(current)" in table and "awaiting review  1" in table
    assert "inclusion row 4 (sub-03): nothing published" in table and "sub-02 series" in table
    for ident in ("ST-PAT-1", "ST-PAT-2", "ST-PAT-3", "DOE"):
        assert ident not in text and ident not in table
