"""validate_dataset runs the real bids-validator-deno; parse_report reads its v3 JSON."""

from __future__ import annotations

import json

import pytest

from pacs2bids import validate
from pacs2bids.errors import ValidationFailed
from pacs2bids.validate import parse_report, require_valid, validate_dataset


def test_parse_v3_report():
    data = {"issues": {"issues": [
        {"code": "NIFTI_HEADER_UNREADABLE", "severity": "error", "location": "/sub-01/anat/x.nii.gz"},
        {"code": "README_FILE_SMALL", "severity": "warning", "location": "/README", "issueMessage": "short"},
        "garbage",
    ], "codeMessages": {"NIFTI_HEADER_UNREADABLE": "cannot read header"}}, "summary": {}}
    r = parse_report(data)
    assert not r.ok
    assert r.errors == [{"code": "NIFTI_HEADER_UNREADABLE", "sub_code": None, "severity": "error",
                         "location": "/sub-01/anat/x.nii.gz", "message": "cannot read header"}]
    assert [w["code"] for w in r.warnings] == ["README_FILE_SMALL"]
    with pytest.raises(ValidationFailed, match="NIFTI_HEADER_UNREADABLE"):
        require_valid(r)
    assert parse_report({"issues": {"issues": []}}).ok


def test_invalid_dataset_reports_errors(tmp_path):
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_T1w.nii.gz").write_bytes(b"not a nifti")
    (anat / "sub-01_bogus.txt").write_text("x")
    report = validate_dataset(tmp_path)
    assert not report.ok
    assert report.errors and all(e["code"] for e in report.errors)


def test_missing_validator_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "VALIDATOR", "bids-validator-deno-not-here")
    with pytest.raises(FileNotFoundError, match="pip install bids-validator-deno"):
        validate_dataset(tmp_path)


def test_sample_dwi_is_valid(sample_dir, tmp_path):
    from pacs2bids.bids import finalise_dataset
    from pacs2bids.convert import convert_session

    root = tmp_path / "bids"
    convert_session(sample_dir / "dcm_qa_ge", root, subject="01", session=None, heuristic="auto",
                    work_dir=tmp_path / "w")
    finalise_dataset(root, name="t1", participants=["01"], generated_by={})
    report = validate_dataset(root)
    assert report.ok, report.summary()
