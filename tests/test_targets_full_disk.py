"""A target whose disk fills up mid-publish: a clear error naming the cause, and the version
published before stays whole and current (a real full file system: a small tmpfs, mounted by
the test; served as is by a folder target and by Debian's sshd)."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from pacs2bids.config.targets import StorageTargetSettings
from pacs2bids.targets import TargetError
from pacs2bids.targets.fsspec_target import FsspecTarget
from pacs2bids.targets.manifest import check_copy, read_manifest
from pacs2bids.testing_servers import Sshd
from targets_helpers import PROJECT, local_files, make_version, publish

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="mounting a small file system needs root (CI runs as root)")


@contextmanager
def small_disk(path: Path, size: str):
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:  # a container without CAP_SYS_ADMIN: no small file system to fill
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _target(kind: str, remote: Path, sshd: Sshd | None) -> FsspecTarget:
    if kind == "folder":
        settings = StorageTargetSettings(kind="folder", url=f"file://{remote}")
    else:
        settings = StorageTargetSettings(kind="sftp", url=f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{remote}",
                                         key_file=sshd.client_key, known_hosts=sshd.known_hosts)
    return FsspecTarget(settings, project=PROJECT, fingerprint="f" * 32, environ={})


@pytest.mark.parametrize("kind", ["folder", "sftp"])
def test_a_full_disk_fails_clearly_and_the_published_version_stays(kind, tmp_path):
    sshd = Sshd(tmp_path / "sshd").start() if kind == "sftp" else None
    try:
        with small_disk(tmp_path / "disk", "512k") as disk:
            remote = disk / "epilepsy"
            v1 = make_version(tmp_path / "local", "20260101T000000Z-aaaa", subjects=2, size=4000)
            assert publish(_target(kind, remote, sshd), v1).verified
            v2 = make_version(tmp_path / "local", "20260102T000000Z-bbbb", subjects=4, size=200_000, base=v1)
            with pytest.raises(TargetError) as err:
                publish(_target(kind, remote, sshd), v2)
            message = str(err.value)
            assert "space" in message, message
            current = json.loads((remote / "CURRENT.json").read_text())
            assert current["version"] == v1.name
            version = remote / current["path"]
            assert check_copy(version, read_manifest((version / ".pacs2bids/manifest.json").read_bytes())) == []
            assert local_files(version) == local_files(v1)
    finally:
        if sshd is not None:
            sshd.kill()
