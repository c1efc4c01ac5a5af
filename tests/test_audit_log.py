"""The operations audit log (issue 14): a real run is recorded (who, when, what, where); editing,
deleting or reordering a line is found by ``pacs2bids audit``; it lives apart from the datasets."""

from __future__ import annotations

import json
import time

import pytest

from conftest import write_spec
from pacs2bids import audit
from pacs2bids.cli import main
from pacs2bids.config import load_spec

SECRET = "audit-secret-0123456789abcdef"
PACS = "{dimse: {ae_title: A, host: 127.0.0.1, port: 104}}"


@pytest.fixture
def spec_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.delenv(audit.ENV_DIR, raising=False)
    return write_spec(tmp_path, "patient_id,subject\nP1,01\n", project="auditproj", pacs=PACS,
                      output=str(tmp_path / "out" / "ds"))


def _three_entries(spec_path):
    spec = load_spec(spec_path)
    for n in range(3):
        audit.record(spec, "publish", run_id=f"run-{n}", version=f"v{n}", files=n)
    return spec, audit.log_path(spec)


def test_entries_are_chained_signed_and_say_who_when_what(spec_path, monkeypatch, capsys):
    monkeypatch.setenv(audit.ENV_OPERATOR, "dr-research-ops")
    spec, path = _three_entries(spec_path)
    assert path.parent == spec.resolved_key_store  # apart from the dataset, beside the matching key
    v = audit.verify(spec)
    assert v.intact and [e.signed for e in v.entries] == [True, True, True]
    first = v.entries[0].record
    assert first["operator"] == "dr-research-ops" and first["account"] and first["when"].endswith("+00:00")
    assert (first["action"], first["project"], first["run_id"], first["version"]) == ("publish", "auditproj",
                                                                                      "run-0", "v0")
    assert main(["audit", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "operations audit log intact: 3 entries" in out and "dr-research-ops" in out
    assert out.index("run-0") < out.index("run-1") < out.index("run-2")
    from pacs2bids.deid import KeyStore  # a re-identification between two publishes: in its place on the timeline

    store = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    time.sleep(1.1)  # the re-identification log writes whole seconds
    with pytest.raises(KeyError):
        store.reidentify("99", reason="checking the timeline merges all three logs")
    time.sleep(1.1)
    audit.record(spec, "publish", run_id="run-3", version="v3", files=3)
    assert main(["audit", str(spec_path), "--timeline"]) == 0
    out = capsys.readouterr().out
    timeline = out[out.index("timeline of auditproj"):]
    assert timeline.index("run-2") < timeline.index("reidentify (unknown subject)") < timeline.index("run-3")


@pytest.mark.parametrize("tamper, broken, why", [
    ("edit", 2, "does not match its MAC"),
    ("delete", 2, "in the place of entry 2"),
    ("reorder", 2, "in the place of entry 2"),
    ("rechain", 2, "does not match its MAC"),
])
def test_editing_deleting_or_reordering_a_line_is_found(spec_path, capsys, tamper, broken, why):
    spec, path = _three_entries(spec_path)
    lines = path.read_bytes().splitlines(keepends=True)
    if tamper == "edit":
        lines[1] = lines[1].replace(b'"files": 1', b'"files": 0')
    elif tamper == "delete":
        del lines[1]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:  # an edit whose author fixed the hash chain after it (but has no key to sign)
        from pacs2bids import auditchain

        rec = json.loads(lines[1])
        rec["files"] = 7
        lines[1] = json.dumps(rec, sort_keys=True).encode() + b"\n"
        rec3 = json.loads(lines[2])
        rec3["prev"] = auditchain.line_digest(lines[1].rstrip(b"\n"))
        lines[2] = json.dumps(rec3, sort_keys=True).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    v = audit.verify(spec)
    assert v.broken is not None and v.broken.number == broken and why in v.broken.problem
    capsys.readouterr()
    assert main(["audit", str(spec_path)]) == 1
    assert f"is BROKEN at entry {broken}" in capsys.readouterr().err


def test_without_spec_the_site_folder_is_checked_by_hash_chain(spec_path, tmp_path, monkeypatch, capsys):
    site = tmp_path / "site-audit"
    monkeypatch.setenv(audit.ENV_DIR, str(site))
    spec, path = _three_entries(spec_path)
    assert path.parent == site.resolve()
    assert main(["audit"]) == 0
    assert "hash chain intact, 3 entries" in capsys.readouterr().out
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[2])
    assert main(["audit"]) == 1
    assert "BROKEN at entry 2" in capsys.readouterr().err


def test_the_log_is_never_under_the_dataset_and_urls_lose_their_credentials(spec_path, tmp_path, monkeypatch):
    spec = load_spec(spec_path)
    monkeypatch.setenv(audit.ENV_DIR, str(tmp_path / "out" / ".ds.versions" / "x"))
    with pytest.raises(audit.AuditError, match="inside the dataset"):
        audit.record(spec, "purge")
    with pytest.raises(ValueError, match="not one of"):
        audit.record(spec, "something-else")
    assert audit.safe_url("s3://key:pw@store.example:9000/bucket/p?X-Amz-Signature=abc") == \
        "s3://store.example:9000/bucket/p"
    assert audit.safe_url("sftp://research@host/data") == "sftp://host/data"


@pytest.mark.slow
def test_a_real_run_records_the_extraction_and_each_publish(tmp_path, orthanc_factory, sample_dir, prefect_harness,
                                                            monkeypatch, capsys):
    import pydicom

    from pacs2bids.dicomfiles import iter_dicom_files
    from pacs2bids.flows.extract import extract_project

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.delenv(audit.ENV_DIR, raising=False)
    files = list(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(files)
    original = pydicom.dcmread(files[0], stop_before_pixels=True)
    mirror = tmp_path / "mirror"
    path = write_spec(tmp_path, f"patient_id,subject\n{original.PatientID},01\n", project="auditrun", pacs=pacs,
                      output=str(tmp_path / "out" / "ds"), targets=f"[{{kind: folder, url: 'file://{mirror}'}}]")
    summary = extract_project(str(path))
    assert summary["published"], summary["errors"]
    spec = load_spec(path)
    v = audit.verify(spec)
    assert v.intact
    records = [e.record for e in v.entries]
    assert [r["action"] for r in records] == ["extract", "publish", "publish-target"]
    assert all(r["run_id"] == summary["run_id"] for r in records)
    extract, publish, target = records
    assert extract["state"] == "completed" and extract["subjects"] == 1 and extract["series"] >= 1
    assert publish["where"] == str(spec.output) and publish["files"] > 0
    assert target["where"] == f"file://{mirror}" and target["state"] == "published"
    assert target["version"] == publish["version"]
    text = audit.log_path(spec).read_text()
    for identifier in (str(original.PatientID), str(original.PatientName), str(original.StudyInstanceUID)):
        assert len(identifier) < 3 or identifier not in text
    assert main(["audit", str(path)]) == 0
    assert "operations audit log intact: 3 entries" in capsys.readouterr().out
