"""Publishing over SFTP: Debian's OpenSSH ``sshd`` on loopback, key authentication, host key checked."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from pacs2bids.config.targets import StorageTargetSettings
from pacs2bids.targets import TargetError
from pacs2bids.targets.fsspec_target import FsspecTarget
from pacs2bids.targets.manifest import check_copy, read_manifest
from pacs2bids.testing_servers import Sshd
from targets_helpers import PROJECT, local_files, make_version, publish

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="sshd for another user's login needs root (CI runs as root)")


@pytest.fixture
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.kill()


def _target(sshd, remote, **extra) -> FsspecTarget:
    extra.setdefault("key_file", sshd.client_key)
    extra.setdefault("known_hosts", sshd.known_hosts)
    settings = StorageTargetSettings(kind="sftp", url=f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{remote}", **extra)
    return FsspecTarget(settings, project=PROJECT, fingerprint="f" * 32, environ={})


def _current(remote):
    import json

    current = json.loads((remote / "CURRENT.json").read_text())
    version = remote / current["path"]
    return current, version, read_manifest((version / ".pacs2bids/manifest.json").read_bytes())


def test_publish_read_back_no_op_and_one_new_subject_linked_on_the_server(sshd, tmp_path):
    remote = tmp_path / "remote" / "epilepsy"
    v1 = make_version(tmp_path / "local", "20260101T000000Z-aaaa", subjects=3)
    first = publish(_target(sshd, remote), v1)
    assert first.verified and first.sent_files == len(local_files(v1))
    current, version, manifest = _current(remote)
    assert current["version"] == v1.name and check_copy(version, manifest) == []
    assert local_files(version) == local_files(v1)

    before = {p: p.stat().st_mtime_ns for p in remote.rglob("*")}
    again = publish(_target(sshd, remote), v1)
    assert (again.sent_bytes, again.copied_files, again.state) == (0, 0, "unchanged")
    assert {p: p.stat().st_mtime_ns for p in remote.rglob("*")} == before, "a no-op re-run wrote to the server"

    v2 = make_version(tmp_path / "local", "20260102T000000Z-bbbb", subjects=1, base=v1)
    new = publish(_target(sshd, remote), v2)
    assert new.sent_files == 2 and new.copied_files == len(local_files(v1)) - 1  # hard links: no byte sent
    current, version, manifest = _current(remote)
    assert local_files(version) == local_files(v2) and check_copy(version, manifest) == []
    image = "sub-000/anat/sub-000_run-1_T1w.nii.gz"
    assert (version / image).stat().st_ino == (remote / "versions" / v1.name / image).stat().st_ino
    assert sorted(p.name for p in (remote / "versions").iterdir()) == [v1.name, v2.name]


def test_server_killed_mid_publish_then_restarted_resumes(sshd, tmp_path):
    remote = tmp_path / "remote"
    v1 = make_version(tmp_path / "local", "20260101T000000Z-aaaa", subjects=1)
    publish(_target(sshd, remote), v1)
    v2 = make_version(tmp_path / "local", "20260102T000000Z-bbbb", subjects=80, size=200_000, base=v1)
    failure: list[BaseException] = []

    def run():
        try:
            publish(_target(sshd, remote, timeout=5), v2)
        except BaseException as exc:  # noqa: BLE001 - checked below
            failure.append(exc)

    t = threading.Thread(target=run)
    t.start()
    vdir = remote / "versions" / v2.name
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(vdir.rglob("*.nii.gz"))) < 10:
        time.sleep(0.02)
    sshd.kill()
    t.join(120)
    assert failure and isinstance(failure[0], TargetError), failure
    current, version, manifest = _current(remote)
    assert current["version"] == v1.name and check_copy(version, manifest) == []

    sshd.start()
    report = publish(_target(sshd, remote), v2)
    assert report.skipped_files >= 9 and report.verified
    current, version, manifest = _current(remote)
    assert current["version"] == v2.name and check_copy(version, manifest) == []
    assert not [p for p in vdir.rglob("*") if p.name.endswith(".part")]


def test_unknown_host_key_and_wrong_key_are_refused_clearly(sshd, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    remote = tmp_path / "remote"
    v1 = make_version(tmp_path / "local", "20260101T000000Z-aaaa")
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(TargetError, match="host key is not the one known"):
        publish(_target(sshd, remote, known_hosts=empty), v1)
    other = tmp_path / "other_key"
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(TargetError, match=f"credentials refused.*key file {other}"):
        publish(_target(sshd, remote, key_file=other), v1)
    assert not remote.exists()
    assert other.read_text() not in caplog.text
