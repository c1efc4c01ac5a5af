"""Bad values never lose a patient: one extraction against a real Orthanc, over C-GET and over
DICOMweb, of copies of a real Philips series where the values scanners really write are planted:
StudyDate ``***`` (United Imaging), an empty StudyDate, no SeriesNumber, path-like and accented
descriptions. Every study is matched, every series converted or listed with its reason, the
date filter that cannot be applied is listed, bad dates are emptied, nothing leaves the dataset."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs2bids.deid import scan_for_leaks
from pacs2bids.dicomfiles import iter_dicom_files

from test_extract_e2e import run_extraction

_CASES = {
    # study description: what is planted in that study's copy of the series
    "united imaging": {"StudyDate": "***", "SeriesDate": "***", "AcquisitionDate": "***", "ContentDate": "***",
                       "PatientBirthDate": "***"},
    "no date no number": {"StudyDate": "", "SeriesNumber": None},
    "path like": {"SeriesDescription": "../../etc", "ProtocolName": "../../etc/passwd"},
    "accents": {"SeriesDescription": "T1/ax séquence é", "ProtocolName": "IRM cérébrale/ax", "SpecificCharacterSet": "ISO_IR 192"},
}


def _planted(sample_dir: Path) -> list[bytes]:
    files = sorted(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    assert len(files) >= 20
    out = []
    for desc, values in _CASES.items():
        study, series = generate_uid(), generate_uid()
        for f in files:
            ds = pydicom.dcmread(f)
            ds.PatientID = "BADVAL7731"
            ds.PatientName = "DUPLANTE^JEANNE"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyDescription = desc
            for kw, v in values.items():
                if v is None:
                    delattr(ds, kw)
                else:
                    setattr(ds, kw, v)
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            out.append(buf.getvalue())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["c-get", "dicomweb"])
def test_bad_values_are_matched_converted_or_listed(prefect_harness, orthanc_factory, sample_dir, tmp_path,
                                                    monkeypatch, transport):
    pacs = orthanc_factory()
    assert pacs.upload(_planted(sample_dir)) == 4 * len(list(iter_dicom_files(sample_dir / "dcm_qa_philips")))
    out = tmp_path / "work" / "out"
    (tmp_path / "inclusions.csv").write_text("patient_id,subject\nBADVAL7731,01\n")
    block = (f"  dicomweb: {{url: {pacs.dicomweb_url}}}\n" if transport == "dicomweb" else
             f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs.dicom_port}, retrieve: c-get}}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "project: badvalues\n"
        f"pacs:\n{block}"
        "selection:\n  inclusions: inclusions.csv\n  modalities: [MR]\n"
        "  study_date: {from: 2014-01-01, to: 2014-12-31}\n"
        # StudyDescription is kept (and cleaned) here: the checks below find each study by it
        "pseudonymization: {secret_env: PACS2BIDS_PROJECT_SECRET,\n"
        "                   keep_text: [SeriesDescription, ProtocolName, StudyDescription]}\n"
        "heuristic: auto\n"
        f"output: {out}\n"
        "retries: {attempts: 1, backoff_seconds: 0.2}\n"
    )
    summary = run_extraction(spec, monkeypatch)
    assert summary["published"], summary
    assert summary["unmatched"] == [] and summary["counts"]["studies"] == 4, summary
    # every series is converted, or listed with its reason; none silently missing
    assert len(summary["series"]) == 4, summary["series"]
    assert all(s["status"] == "converted" or s["reason"] for s in summary["series"]), summary["series"]
    assert sum(s["status"] == "converted" for s in summary["series"]) >= 3, summary["series"]
    # the date filter could not be applied to the two undated studies: listed, and printed
    assert sorted(u["reason"].split(":")[0] for u in summary["unapplied_filters"]) == [
        "StudyDate empty", "StudyDate not a valid date"], summary["unapplied_filters"]
    run_json = next((out / ".pacs2bids" / "runs").glob("run-*.json"))
    assert json.loads(run_json.read_text())["counts"]["filters_unapplied"] == 2
    # nothing was written outside the dataset by a path-like description
    assert not (tmp_path / "etc").exists() and not (tmp_path / "work" / "etc").exists()
    assert not [p for p in out.rglob("*") if ".." in p.name or "passwd" in p.name]
    # bad dates are emptied in the pseudonymised copies (they cannot be shifted), good ones shifted
    dates = set()
    for f in (out / "sourcedata").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        dates.add((str(ds.get("StudyDescription")), str(ds.get("StudyDate", "")), str(ds.get("PatientBirthDate", ""))))
    by_desc = {d: (sd, bd) for d, sd, bd in dates}
    assert by_desc["united imaging"] == ("", ""), by_desc
    assert by_desc["path like"][0] and by_desc["path like"][0] != "20140214", by_desc
    # and no identity leaves
    assert scan_for_leaks(out, {"BADVAL7731", "DUPLANTE^JEANNE"}) == []


def test_summary_prints_unapplied_filters():
    from dataclasses import asdict

    from pacs2bids.query import UnappliedFilter
    from pacs2bids.run import RunSummary

    s = RunSummary(project="p", run_id="r", output="out")
    s.unapplied_filters = [asdict(UnappliedFilter(3, "07", "study_date", "StudyDate not a valid date: included"))]
    s.finish()
    text = s.format()
    assert "inclusion row 3 (sub-07): study_date filter not applied to one study, included: StudyDate not a valid" in text
    assert s.to_dict()["counts"]["filters_unapplied"] == 1
