"""Retention (issue 14): expired versions go locally and on a real SeaweedFS target; at the project's
end everything goes (work area, quarantine, matching key) but the audit log, which records each purge."""

from __future__ import annotations

import json
import logging
import os
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import write_spec
from pacs2bids import audit, purge
from pacs2bids.config import load_spec
from pacs2bids.publish import MANIFEST, current_version, publish_local, versions_dir, write_marker
from pacs2bids.targets import open_targets
from pacs2bids.targets.manifest import ensure_manifest
from pacs2bids.testing_servers import SeaweedS3
from targets_helpers import read_current

SECRET = "purge-secret-0123456789abcdef"
PROJECT = "purgeproj"
LOG = logging.getLogger("pacs2bids.test.purge")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    server.make_bucket("research")
    yield server
    server.kill()


def _spec(tmp_path, retention: str, targets: str = "[]"):
    return write_spec(tmp_path, "patient_id,subject\nP1,01\n", project=PROJECT,
                      pacs="{dimse: {ae_title: A, host: 127.0.0.1, port: 104}}", output=str(tmp_path / "out" / "ds"),
                      targets=targets, retention=retention)


def _publish(spec, run_id: str, days_ago: int) -> Path:
    """A local version published ``days_ago`` days ago (its manifest's time), then sent to every target."""
    staging = spec.resolved_work_dir / f"staging-{run_id}"
    (staging / "sub-01" / "anat").mkdir(parents=True)
    (staging / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(os.urandom(3000))
    (staging / "dataset_description.json").write_text('{"Name": "p", "BIDSVersion": "1.10.0"}\n')
    write_marker(staging, spec.project, spec.secret_bytes)
    version = publish_local(staging, spec.output, run_id)
    manifest = json.loads((version / MANIFEST).read_text())
    manifest["published"] = (datetime.now(timezone.utc) - timedelta(days=days_ago)).isoformat(timespec="seconds")
    (version / MANIFEST).write_text(json.dumps(manifest))
    for target in open_targets(spec):
        target.publish(version, ensure_manifest(version), log=LOG)
    return version


def _objects(fs, prefix: str) -> list[str]:
    """The objects under ``prefix`` (SeaweedFS may still list an emptied folder as an entry a while)."""
    fs.invalidate_cache()
    return sorted(k for k in fs.find(prefix) if k.startswith(prefix + "/") and not k.rstrip("/").endswith(prefix))


def _load(path, monkeypatch):
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    return load_spec(path)


def test_expired_versions_go_locally_and_on_s3_the_current_stays_and_the_purge_is_audited(
        tmp_path, s3, monkeypatch):
    monkeypatch.setenv("P_S3_KEY", s3.access_key)
    monkeypatch.setenv("P_S3_SECRET", s3.secret_key)
    prefix = f"research/{tmp_path.name}"
    targets = (f"[{{kind: s3, url: 's3://{prefix}', endpoint_url: '{s3.endpoint}', access_key_id_env: P_S3_KEY, "
               "secret_access_key_env: P_S3_SECRET}]")
    spec = _load(_spec(tmp_path, "{keep_days: 30}", targets), monkeypatch)
    old = _publish(spec, "20260101T000000Z-old", days_ago=40)
    new = _publish(spec, "20260301T000000Z-new", days_ago=40)  # current: stays whatever its age
    fs = s3.filesystem()
    assert sorted(v.name for v in versions_dir(spec.output).iterdir()) == [old.name, new.name]

    plan = purge.plan_purge(spec)
    listed = sorted((i.where, i.what, i.current) for i in plan.items)
    target = spec.targets[0].label
    assert listed == sorted([("local", old.name, False), (target, old.name, False)])
    assert old.exists() and fs.exists(f"{prefix}/versions/{old.name}")  # a plan deletes nothing

    purge.execute(spec, plan, logger=LOG)
    assert not old.exists() and current_version(spec.output) == new
    assert [k for k in _objects(fs, prefix) if f"/{old.name}/" in k] == []
    manifest, files = read_current(fs, prefix)
    assert manifest["version"] == new.name and files  # readers still get the current version, whole

    v = audit.verify(spec)
    assert v.intact
    entry = v.entries[-1].record
    assert entry["action"] == "purge" and not entry["failed"]
    assert sorted((d["where"], d["what"]) for d in entry["deleted"]) == sorted([("local", old.name),
                                                                               (target, old.name)])
    text = audit.log_path(spec).read_text()
    assert s3.secret_key not in text and s3.access_key not in text and SECRET not in text

    assert purge.plan_purge(spec).items == []  # nothing more expired: the next purge deletes nothing


def test_a_young_previous_version_is_kept(tmp_path, monkeypatch):
    spec = _load(_spec(tmp_path, "{keep_days: 30}"), monkeypatch)
    _publish(spec, "20260101T000000Z-a", days_ago=10)
    _publish(spec, "20260102T000000Z-b", days_ago=1)
    assert purge.plan_purge(spec).items == []
    assert purge.format_plan(purge.plan_purge(spec), dry_run=True).endswith("would delete 0 item(s) on "
                                                                               f"{date.today().isoformat()}")


def test_after_the_project_end_everything_goes_but_the_audit_log(tmp_path, s3, monkeypatch, prefect_harness, capsys):
    from pacs2bids.cli import main
    from pacs2bids.deid import KeyStore

    monkeypatch.setenv("P_S3_KEY", s3.access_key)
    monkeypatch.setenv("P_S3_SECRET", s3.secret_key)
    prefix = f"research/{tmp_path.name}"
    targets = (f"[{{kind: s3, url: 's3://{prefix}', endpoint_url: '{s3.endpoint}', access_key_id_env: P_S3_KEY, "
               "secret_access_key_env: P_S3_SECRET}]")
    path = _spec(tmp_path, "{keep_days: 3650, project_end: 2026-01-31}", targets)
    spec = _load(path, monkeypatch)
    _publish(spec, "20260101T000000Z-a", days_ago=0)
    _publish(spec, "20260102T000000Z-b", days_ago=0)
    store = spec.resolved_key_store
    store.mkdir(parents=True, exist_ok=True)
    (store / "keys.journal").write_bytes(b"token\n")  # stands for the matching key: its files go by name
    KeyStore(store, project=PROJECT, secret=spec.secret_bytes)
    (spec.resolved_work_dir / "quarantine").mkdir(parents=True, exist_ok=True)
    (spec.resolved_work_dir / "raw").mkdir(exist_ok=True)
    audit.record(spec, "reintegrate", note_count=0)  # an earlier entry, to see the log survives

    assert main(["purge", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "project ended" in out and "(current)" in out and "key store" in out and "quarantine" in out
    assert current_version(spec.output) is not None  # dry run: nothing went

    assert main(["purge", str(path)]) == 0, capsys.readouterr()
    assert not spec.output.is_symlink() and not versions_dir(spec.output).exists()
    assert _objects(s3.filesystem(), prefix) == []  # CURRENT.json and every version gone
    assert not spec.resolved_work_dir.exists() and not (store / "keys.journal").exists()
    assert audit.log_path(spec).exists()
    capsys.readouterr()
    assert main(["audit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "operations audit log intact: 2 entries" in out and "purge" in out
    record = audit.verify(spec).entries[-1].record
    assert record["ended"] and {d["where"] for d in record["deleted"]} == {
        "local", spec.targets[0].label, "work", "quarantine", "key store"}
    assert record["quarantine_decisions"]["entries"] == 0


def test_a_purge_refuses_while_a_run_is_alive(tmp_path, monkeypatch):
    from pacs2bids.publish import RunLock

    spec = _load(_spec(tmp_path, "{keep_days: 0}"), monkeypatch)
    _publish(spec, "20260101T000000Z-a", days_ago=5)
    _publish(spec, "20260102T000000Z-b", days_ago=5)
    plan = purge.plan_purge(spec)
    assert [i.what for i in plan.items] == ["20260101T000000Z-a"]
    with RunLock(spec.resolved_work_dir):
        with pytest.raises(purge.PurgeError, match="a run of this project is alive"):
            purge.execute(spec, plan, logger=LOG)
    assert (versions_dir(spec.output) / "20260101T000000Z-a").exists()


def test_no_retention_nothing_expires(tmp_path, monkeypatch):
    path = write_spec(tmp_path, "patient_id,subject\nP1,01\n", project=PROJECT,
                      pacs="{dimse: {ae_title: A, host: 127.0.0.1, port: 104}}", output=str(tmp_path / "out" / "ds"))
    spec = _load(path, monkeypatch)
    assert spec.retention is None and purge.plan_purge(spec).items == []
    with pytest.raises(Exception, match="keep_days"):
        _load(_spec(tmp_path, "{keep_days: -1}"), monkeypatch)
