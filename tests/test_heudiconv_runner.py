"""The heudiconv runner keeps heudiconv's date removal but does not choke on the word 'Date'."""

import json

import pytest

from pacs2bids.heudiconv_runner import tuneup_bids_json_files


def test_code_meaning_with_the_word_dates_is_kept(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(json.dumps({
        "AcquisitionDateTime": "2020-01-01T10:00:00",
        "DeidentificationMethodCodeSequence": [
            {"CodeValue": "113107", "CodeMeaning": "Retain Longitudinal Temporal Information Modified Dates Option"}
        ],
        "AcquisitionTime": "10:00:00.000000",
        "ConversionSoftwareVersion": "v1.0.20260724",
    }))
    tuneup_bids_json_files([str(f)])
    out = json.loads(f.read_text())
    assert "AcquisitionDateTime" not in out  # removed, as heudiconv does
    assert out["DeidentificationMethodCodeSequence"][0]["CodeValue"] == "113107"
    assert "HeudiconvVersion" in out


@pytest.mark.parametrize("payload", [{"PatientBirthDate": "19700101"}, {"Seq": [{"InstanceCreationDate": "x"}]}])
def test_a_real_date_left_is_refused(tmp_path, payload):
    f = tmp_path / "x.json"
    f.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="dates left in sidecar"):
        tuneup_bids_json_files([str(f)])
