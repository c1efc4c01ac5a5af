"""A shifted date that equals another patient's birth date is no leak (found on the corpus x20).

Every date of a subject is shifted by its own keyed offset (1 to 3650 days back). With enough
patients, one subject's shifted study date lands on some other patient's birth date, which the key
store holds as an identifying value: the leak scan refused the whole x20 project (240 patients) for
that chance. A date element of a file pseudonymised with shifted dates holds no original value, so
it is not searched; the same value anywhere else still is."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

import pacs2bids
from pacs2bids.deid import scan_for_leaks
from pacs2bids.deid.keyed import Keyed, shift_da
from pacs2bids.dicomfiles import iter_dicom_files

from test_extract_e2e import SECRET, run_extraction

SAMPLE = Path(pacs2bids.__file__).parent / "data" / "sample"
BIRTH = "19630715"


def _file(tmp: Path, study_date: str, comments: str = "", implicit: bool = False) -> Path:
    src = next(iter_dicom_files(SAMPLE / "dcm_qa_nih"))
    ds = pydicom.dcmread(src)
    ds.StudyDate = ds.SeriesDate = study_date
    ds.PatientBirthDate = ""
    if comments:
        ds.ImageComments = comments
    out = tmp / f"f{len(list(tmp.iterdir()))}.dcm"
    buf = io.BytesIO()
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(buf, enforce_file_format=True)
    out.write_bytes(buf.getvalue())
    return out


@pytest.mark.parametrize("implicit", [False, True])
def test_a_date_element_is_not_searched_when_every_date_was_shifted(tmp_path, implicit):
    _file(tmp_path, BIRTH, implicit=implicit)
    found = {h.field for h in scan_for_leaks(tmp_path, {BIRTH})}
    assert {"StudyDate", "SeriesDate"} <= found  # dates as they were: searched
    assert scan_for_leaks(tmp_path, {BIRTH}, dates_shifted=True) == []
    # the same date in text is still found, whatever the profile did to dates
    _file(tmp_path, "20200101", comments=f"born {BIRTH}", implicit=implicit)
    hits = scan_for_leaks(tmp_path, {BIRTH}, dates_shifted=True)
    assert [h.field for h in hits] == ["ImageComments"], hits


def _plant(src_folder: str, pid: str, birth: str, dst: Path) -> list[Path]:
    out = []
    dst.mkdir(parents=True)
    for i, p in enumerate(iter_dicom_files(SAMPLE / src_folder)):
        ds = pydicom.dcmread(p)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = pid, f"{pid}^PLANTED", birth
        ds.save_as(dst / f"{i:04d}.dcm", enforce_file_format=True)
        out.append(dst / f"{i:04d}.dcm")
    return out


@pytest.mark.slow
def test_a_shifted_study_date_on_another_patients_birth_date_publishes(prefect_harness, orthanc_factory,
                                                                        tmp_path, monkeypatch):
    """Patient A's birth date is planted equal to patient B's study date as shifted for B's subject:
    B's published sourcedata carries it as StudyDate. Refused as a leak before; published now."""
    from pacs2bids.config import load_spec

    out = tmp_path / "out" / "dataset"
    (tmp_path / "inclusions.csv").write_text("patient_id,subject\nDATEPATA,01\nDATEPATB,02\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("project: dates-test\npacs:\n  dimse: {ae_title: ORTHANC, host: 127.0.0.1, port: PORT, retrieve: c-get}\n"
                    "selection:\n  inclusions: inclusions.csv\n  modalities: [MR]\n"
                    "pseudonymization: {secret_env: PACS2BIDS_PROJECT_SECRET}\nheuristic: auto\n"
                    f"output: {out}\nretries: {{attempts: 1, backoff_seconds: 0.2}}\n")
    pacs = orthanc_factory()
    spec.write_text(spec.read_text().replace("PORT", str(pacs.dicom_port)))
    loaded = load_spec(spec, environ={"PACS2BIDS_PROJECT_SECRET": SECRET})
    b_files = _plant("dcm_qa_ge", "DATEPATB", "", tmp_path / "b")
    b_date = str(pydicom.dcmread(b_files[0], stop_before_pixels=True).StudyDate)
    shifted = shift_da(b_date, Keyed(loaded.secret_bytes, loaded.project).day_offset("02"))
    assert shifted and not shifted.endswith("0101")  # a January 1st birth date is never searched
    a_files = _plant("dcm_qa_nih", "DATEPATA", shifted, tmp_path / "a")
    assert pacs.upload(a_files + b_files) == len(a_files) + len(b_files)

    summary = run_extraction(spec, monkeypatch)
    assert summary["published"], summary.get("state")
    dates = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyDate)
             for f in (out / "sourcedata" / "sub-02").rglob("*.dcm")}
    assert dates == {shifted}  # the coincidence the scan met, published
    assert scan_for_leaks(out / "sourcedata" / "sub-02", {shifted})  # and found where dates are searched
