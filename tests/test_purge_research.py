"""Retention on a research PACS (issue 14): a second, real Orthanc (with a login) receives each
published version by C-STORE; purge deletes, through Orthanc's REST API, the studies of the expired
versions that the current version does not hold, keeps the current ones, and after the project's
end deletes them all. A research PACS without ``purge`` stays listed as not purgeable."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from conftest import write_spec
from pacs2bids import audit, purge
from pacs2bids.config import PseudonymizationSettings, load_spec
from pacs2bids.deid import Pseudonymiser
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.publish import MANIFEST, current_version, publish_local, versions_dir, write_marker
from pacs2bids.targets import open_targets
from pacs2bids.targets.manifest import ensure_manifest

SECRET = "purge-research-secret-0123456789"
PROJECT = "rpurge"
USER, PASSWORD = "rp-user", "rp-password-for-this-test-only"
LOG = logging.getLogger("pacs2bids.test.purge_research")
# (subject, sample folder): sub-01's two series are one study; sub-02's is another
S01_A, S01_B = ("01", "dcm_qa_nih/In/20180918Si/mr_0003"), ("01", "dcm_qa_nih/In/20180918Si/mr_0004")
S02 = ("02", "dcm_qa_philips/In/Magdeburg_2014/fmri")


@pytest.fixture
def research(orthanc_factory):
    return orthanc_factory(aet="RESEARCH", dicomweb=False, auth=(USER, PASSWORD),
                           extra={"AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}})


def _spec(tmp_path, research, retention: str, purge_block: bool = True):
    block = ", purge: {orthanc_rest: '%s', username_env: RP_USER, password_env: RP_PASSWORD}" % research.url
    target = (f"[{{kind: dimse, name: rp, host: 127.0.0.1, port: {research.dicom_port}, ae_title: RESEARCH"
              f"{block if purge_block else ''}}}]")
    path = write_spec(tmp_path, "patient_id,subject\nP1,01\n", project=PROJECT,
                      pacs="{dimse: {ae_title: A, host: 127.0.0.1, port: 104}}", output=str(tmp_path / "out" / "ds"),
                      targets=target, retention=retention)
    return load_spec(path, environ={"PACS2BIDS_PROJECT_SECRET": SECRET})


def _publish(spec, sample_dir: Path, run_id: str, series, days_ago: int) -> Path:
    """A version of pseudonymised ``series`` published ``days_ago`` days ago, then pushed to the targets."""
    staging = spec.resolved_work_dir / f"staging-{run_id}"
    p = Pseudonymiser(PROJECT, SECRET.encode(), PseudonymizationSettings(), spec.resolved_key_store)
    for i, (subject, folder) in enumerate(series):
        out = staging / "sourcedata" / f"sub-{subject}" / "ses-01" / f"{i:03d}-series"
        assert p.pseudonymise_series(iter_dicom_files(sample_dir / folder), out, subject=subject, session="01",
                                     quarantine_dir=spec.resolved_work_dir / "quarantine").written
    (staging / "dataset_description.json").write_text('{"Name": "p", "BIDSVersion": "1.10.0"}\n')
    write_marker(staging, spec.project, spec.secret_bytes)
    version = publish_local(staging, spec.output, run_id)
    manifest = json.loads((version / MANIFEST).read_text())
    manifest["published"] = (datetime.now(timezone.utc) - timedelta(days=days_ago)).isoformat(timespec="seconds")
    (version / MANIFEST).write_text(json.dumps(manifest))
    for target in open_targets(spec):
        target.publish(version, ensure_manifest(version), log=LOG)
    return version


def _studies(orthanc) -> set[str]:
    return {s["MainDicomTags"]["StudyInstanceUID"] for s in orthanc.get("/studies?expand")}


def _version_studies(version: Path) -> set[str]:
    import pydicom

    return {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
            for f in (version / "sourcedata").rglob("*.dcm")}


@pytest.fixture
def creds(monkeypatch):
    monkeypatch.setenv("RP_USER", USER)
    monkeypatch.setenv("RP_PASSWORD", PASSWORD)


def test_expired_studies_go_from_the_research_pacs_the_current_ones_stay(tmp_path, research, sample_dir, creds):
    spec = _spec(tmp_path, research, "{keep_days: 30}")
    old = _publish(spec, sample_dir, "20260101T000000Z-old", [S01_A, S02], days_ago=40)
    new = _publish(spec, sample_dir, "20260301T000000Z-new", [S01_A, S01_B], days_ago=40)
    kept, gone = _version_studies(new), _version_studies(old) - _version_studies(new)
    assert len(kept) == 1 and len(gone) == 1 and _studies(research) == kept | gone

    plan = purge.plan_purge(spec)
    assert sorted((i.where, i.what) for i in plan.items) == [("local", old.name), ("rp", old.name)]
    assert plan.not_purgeable == [] and _studies(research) == kept | gone  # a plan deletes nothing
    assert f"rp               {old.name}  (published" in purge.format_plan(plan, dry_run=True)
    assert "1 stud(ies) there" in purge.format_plan(plan, dry_run=True)
    purge.execute(spec, plan, logger=LOG)
    assert not [i.error for i in plan.items if i.error]
    assert _studies(research) == kept  # the old version's own study is gone; the shared one stays
    assert not old.exists() and current_version(spec.output) == new

    entry = audit.verify(spec).entries[-1].record
    assert entry["action"] == "purge" and {"where": "rp", "what": old.name, "current": False, "studies": 1} \
        in entry["deleted"]
    text = audit.log_path(spec).read_text()
    assert PASSWORD not in text and not any(uid in text for uid in kept | gone)
    assert purge.plan_purge(spec).items == []


def test_after_the_project_end_every_study_goes(tmp_path, research, sample_dir, creds, prefect_harness, monkeypatch):
    from pacs2bids.flows.purge import purge_project

    spec = _spec(tmp_path, research, "{keep_days: 3650, project_end: 2026-01-31}")
    _publish(spec, sample_dir, "20260101T000000Z-a", [S01_A, S02], days_ago=0)
    _publish(spec, sample_dir, "20260102T000000Z-b", [S01_A, S01_B], days_ago=0)
    assert len(_studies(research)) == 2
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    done = purge_project(str(spec.spec_path))  # the scheduled flow
    assert not done["errors"] and "rp:20260102T000000Z-b" in done["deleted"]
    assert _studies(research) == set() and research.get("/instances") == []
    assert not versions_dir(spec.output).exists()


def test_without_credentials_the_local_version_is_kept_for_the_next_purge(tmp_path, research, sample_dir, creds,
                                                                          monkeypatch):
    spec = _spec(tmp_path, research, "{keep_days: 30}")
    old = _publish(spec, sample_dir, "20260101T000000Z-old", [S02], days_ago=40)
    _publish(spec, sample_dir, "20260301T000000Z-new", [S01_A], days_ago=40)
    monkeypatch.setenv("RP_PASSWORD", "wrong")
    plan = purge.execute(spec, purge.plan_purge(spec), logger=LOG)
    errors = {i.where: i.error for i in plan.items if i.error}
    assert "HTTP 401" in errors["rp"] and "RP_USER / RP_PASSWORD" in errors["rp"] and "wrong" not in errors["rp"]
    assert "kept" in errors["local"] and old.exists() and len(_studies(research)) == 2
    monkeypatch.setenv("RP_PASSWORD", PASSWORD)  # fixed: the next purge finds the studies from the kept version
    plan = purge.execute(spec, purge.plan_purge(spec), logger=LOG)
    assert not [i.error for i in plan.items if i.error] and not old.exists()
    assert _studies(research) == _version_studies(current_version(spec.output))


def test_a_research_pacs_without_purge_is_listed_with_the_reason(tmp_path, research, sample_dir):
    spec = _spec(tmp_path, research, "{keep_days: 30}", purge_block=False)
    _publish(spec, sample_dir, "20260101T000000Z-old", [S02], days_ago=40)
    _publish(spec, sample_dir, "20260301T000000Z-new", [S01_A], days_ago=40)
    plan = purge.plan_purge(spec)
    assert [i.where for i in plan.items] == ["local"] and plan.not_purgeable == ["rp"]
    assert "give the target purge: {orthanc_rest" in purge.format_plan(plan, dry_run=True)
    purge.execute(spec, plan, logger=LOG)
    assert len(_studies(research)) == 2  # nothing deleted there
    assert requests.get(f"{research.url}/studies", timeout=10).status_code == 401  # and it is closed to strangers


def test_purge_settings_are_checked():
    from pacs2bids.config.targets import OrthancPurgeSettings

    with pytest.raises(ValueError, match="credentials"):
        OrthancPurgeSettings(orthanc_rest="https://u:p@pacs.example.org")
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        OrthancPurgeSettings(orthanc_rest="https://pacs.example.org", password_env="hunter2!")
    assert os.environ.get("RP_PASSWORD") in (None, PASSWORD)
