"""The dead-letter list (issue 4): what keeps failing stays listed with its last error, run after
run, until a run gets it through; the rest of the project is published meanwhile."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import write_spec
from pacs2bids.cli import main
from pacs2bids.deadletter import DeadLetters
from pacs2bids.lineage import LineageRecord

SECRET = "dead-letter-test-secret-0123456789"


def rec(series: str, **kw) -> LineageRecord:
    return LineageRecord("01", None, pseudo_study_uid="2.25.1", pseudo_series_uid=series, series_number=3, **kw)


def test_fold_counts_attempts_and_clears_what_got_through(tmp_path):
    dl = DeadLetters(tmp_path / "dead-letter.json")
    first = dl.fold([rec("2.25.7", retrieve_status="incomplete", reason="2 instances missing"),
                     rec("2.25.8", retrieve_status="complete", convert_status="converted")], run_id="r1")
    assert [(e.key, e.stage, e.attempts, e.last_error) for e in first] == [("2.25.7", "retrieve", 1, "2 instances missing")]
    assert dl.entries() == []  # nothing is written before the run is published
    dl.save(first)
    second = dl.fold([rec("2.25.7", retrieve_status="complete", convert_status="failed", reason="heudiconv failed")],
                     run_id="r2")
    (e,) = second
    assert (e.attempts, e.stage, e.last_error, e.first_failed, e.last_run) == (2, "convert", "heudiconv failed",
                                                                               first[0].first_failed, "r2")
    dl.save(second)
    assert dl.fold([rec("2.25.7", retrieve_status="complete", convert_status="converted")], run_id="r3") == []


def test_a_failed_study_leaves_when_one_of_its_series_gets_through(tmp_path):
    dl = DeadLetters(tmp_path / "dead-letter.json")
    study_failed = LineageRecord("02", "01", pseudo_study_uid="2.25.9", retrieve_status="failed", reason="timeout")
    (e,) = dl.fold([study_failed], run_id="r1")
    assert e.key == "study:2.25.9" and e.series_number is None
    dl.save([e])
    ok = LineageRecord("02", "01", pseudo_study_uid="2.25.9", pseudo_series_uid="2.25.10", convert_status="skipped")
    assert dl.fold([ok], run_id="r2") == []


# -- end to end, with a heuristic that refuses one subject --------------------------------------
REFUSING_HEURISTIC = '''
"""A project's heudiconv heuristic that refuses series described "...refused": a conversion that keeps failing."""


def create_key(template, outtype=("nii.gz",), annotation_classes=None):
    return template, outtype, annotation_classes


def infotodict(seqinfo):
    if any("refused" in s.series_description for s in seqinfo):
        raise RuntimeError("this heuristic refuses this series")
    epi = create_key("{bids_subject_session_dir}/fmap/{bids_subject_session_prefix}_dir-AP_epi")
    return {epi: [s.series_id for s in seqinfo]}
'''


@pytest.mark.slow
def test_series_that_keep_failing_are_listed_until_they_succeed(prefect_harness, orthanc_factory, sample_dir,
                                                                tmp_path, monkeypatch, capsys):
    from pacs2bids.flows.extract import extract_project

    files = sorted((sample_dir / "dcm_qa_nih" / "In" / "20180918Si" / "mr_0003").glob("*.dcm"))
    up = tmp_path / "up"
    up.mkdir()
    for pid in ("DL-PAT-1", "DL-PAT-2"):  # two patients from copies of one real series
        study, series = generate_uid(), generate_uid()
        for f in files:
            ds = pydicom.dcmread(f)
            ds.PatientID, ds.PatientName = pid, f"DOE^{pid}"
            if pid == "DL-PAT-2":
                ds.SeriesDescription = "epi_pe_ap_refused"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(up / f"{pid}-{f.name}")
    pacs = orthanc_factory()
    assert pacs.upload(sorted(up.iterdir())) == 2 * len(files)
    (tmp_path / "refusing.py").write_text(REFUSING_HEURISTIC)
    out = tmp_path / "out" / "ds"

    def with_heuristic(heuristic: str) -> Path:
        return write_spec(tmp_path, "patient_id,subject\nDL-PAT-1,01\nDL-PAT-2,02\n", project="dlproj", pacs=pacs,
                          selection="{inclusions: inclusions.csv, modalities: [MR]}",
                          pseudonymization="{secret_env: P2B_DL_SECRET}", heuristic=heuristic, output=out,
                          retries="{attempts: 0, backoff_seconds: 0.1}")

    monkeypatch.setenv("P2B_DL_SECRET", SECRET)
    spec = with_heuristic("refusing.py")
    first = extract_project(str(spec))
    assert first["published"] and first["state"] == "completed with failures"
    assert (out / "sub-01").is_dir() and not (out / "sub-02").exists()
    (e,) = first["dead_letter"]
    assert e["subject"] == "02" and e["stage"] == "convert" and e["attempts"] == 1
    assert "heudiconv failed" in e["last_error"]

    second = extract_project(str(spec))  # sub-01 is skipped as published; sub-02 is tried again
    assert second["already_published"] == 1
    (e2,) = second["dead_letter"]
    assert e2["key"] == e["key"] and e2["attempts"] == 2 and e2["first_failed"] == e["first_failed"]
    assert main(["dead-letter", str(spec)]) == 0
    listed = capsys.readouterr().out
    assert "sub-02" in listed and "2 run(s)" in listed and "DL-PAT-2" not in listed

    with_heuristic("auto")
    third = extract_project(str(spec))
    assert third["state"] == "completed" and third["dead_letter"] == [] and (out / "sub-02").is_dir()
    assert DeadLetters(out.parent / f".{out.name}.pacs2bids-work" / "dead-letter.json").entries() == []
