"""The run with secondary targets: a URL ``output`` (S3 on a real SeaweedFS) plus a folder, end to
end on Orthanc; a re-run with nothing new makes no new version and sends nothing. And the spec."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import write_spec
from pacs2bids.config import load_spec
from pacs2bids.errors import SpecError
from pacs2bids.publish import current_version
from pacs2bids.testing_servers import SeaweedS3
from targets_helpers import local_files, read_current

SECRET = "targets-secret-0123456789abcdef"


def _spec(tmp_path, pacs, targets: str, output: str):
    return write_spec(tmp_path, "patient_id,subject\nphantom,01\n", project="tgt", pacs=pacs, output=output,
                      targets=targets)


@pytest.mark.slow
def test_run_publishes_to_s3_output_and_a_folder_then_a_no_op_rerun_sends_nothing(
        tmp_path, tmp_path_factory, orthanc_factory, sample_dir, prefect_harness, monkeypatch, caplog):
    from pacs2bids.dicomfiles import iter_dicom_files
    from pacs2bids.flows.extract import extract_project

    caplog.set_level(logging.DEBUG)
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    try:
        s3.make_bucket("research")
        pacs = orthanc_factory(dicomweb=False)
        pacs.upload(iter_dicom_files(sample_dir / "dcm_qa_philips"))
        mirror = tmp_path / "mirror"
        url = "s3://research/tgt"
        spec = _spec(tmp_path, pacs, output=url, targets=(
            f"[{{kind: s3, url: '{url}', endpoint_url: '{s3.endpoint}', access_key_id_env: T_S3_KEY, "
            f"secret_access_key_env: T_S3_SECRET}}, {{kind: folder, url: 'file://{mirror}'}}]"))
        monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
        monkeypatch.setenv("T_S3_KEY", s3.access_key)
        monkeypatch.setenv("T_S3_SECRET", s3.secret_key)
        loaded = load_spec(spec)
        assert loaded.output == tmp_path / ".tgt.pacs2bids-local" / "tgt" and loaded.output_url == url
        assert [t.kind for t in loaded.targets] == ["s3", "folder"]

        first = extract_project(str(spec))
        assert first["published"] and first["state"] == "completed", first["errors"]
        version = current_version(loaded.output)
        assert [t["state"] for t in first["targets"]] == ["published", "published"]
        assert all(t["verified"] and t["version"] == version.name for t in first["targets"])
        manifest, files = read_current(s3.filesystem(), "research/tgt")
        assert files == local_files(version) and manifest["version"] == version.name
        assert json.loads((mirror / "CURRENT.json").read_text())["version"] == version.name

        import shutil

        copies, copytree = [], shutil.copytree
        monkeypatch.setattr(shutil, "copytree", lambda src, *a, **k: copies.append(src) or copytree(src, *a, **k))
        second = extract_project(str(spec))  # nothing new
        assert version not in map(Path, copies), "a run with nothing new copied the dataset into staging"
        assert second["unchanged"] and not second["published"] and second["state"] == "completed"
        assert current_version(loaded.output) == version  # no new local version
        assert [(t["state"], t["sent_bytes"], t["copied_files"]) for t in second["targets"]] == [
            ("unchanged", 0, 0), ("unchanged", 0, 0)]
        text = json.dumps([first, second]) + caplog.text
        assert s3.secret_key not in text and s3.access_key not in text and SECRET not in text
    finally:
        s3.kill()


def test_spec_targets_are_typed_and_never_hold_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    pacs = "{dimse: {ae_title: A, host: 127.0.0.1, port: 104}}"
    ok = _spec(tmp_path, pacs, output="sftp://research@127.0.0.1:2222/data/tgt",
               targets="[{kind: sftp, url: 'sftp://research@127.0.0.1:2222/data/tgt', password_env: SFTP_PASSWORD}]")
    spec = load_spec(ok)
    assert spec.output_url.startswith("sftp://") and spec.targets[0].password_env == "SFTP_PASSWORD"
    assert len(spec.targets) == 1 and spec.targets[0].label == "sftp:127.0.0.1:2222/data/tgt"
    bad = {
        "[{kind: s3, url: 's3://b/p', secret_access_key_env: 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY'}]":
            "NAME of an environment variable",
        "[{kind: sftp, url: 'sftp://u:hunter2@host/p'}]": "holds a password",
        "[{kind: s3, url: 'sftp://host/p'}]": "starts with s3://",
        "[{kind: s3, url: 's3://b/p', colour: blue}]": "unknown key",
        "[{kind: ftp, url: 'ftp://host/p'}]": "kind",
    }
    for targets, message in bad.items():
        with pytest.raises(SpecError, match=message) as err:
            load_spec(_spec(tmp_path, pacs, output="out", targets=targets))
        assert "hunter2" not in str(err.value) and "wJalrXUtnFEMI" not in str(err.value)
    with pytest.raises(SpecError, match="not a storage pacs2bids publishes to"):
        load_spec(_spec(tmp_path, pacs, output="ftp://host/p", targets="[]"))
