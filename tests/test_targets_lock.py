"""One publish per target: the lock object, taken over only from a holder that is gone (folder targets:
the same code as S3 and SFTP, whose lock tests are in their files)."""

from __future__ import annotations

import json
import time

import pytest

from pacs2bids.config.targets import StorageTargetSettings
from pacs2bids.targets import TargetError
from pacs2bids.targets.fsspec_target import FsspecTarget
from pacs2bids.targets.lock import LOCK_NAME
from targets_helpers import PROJECT, make_version, publish


def _target(remote) -> FsspecTarget:
    return FsspecTarget(StorageTargetSettings(kind="folder", url=f"file://{remote}"), project=PROJECT,
                        fingerprint=None, environ={})


def _lock(remote, **holder) -> None:
    remote.mkdir(parents=True, exist_ok=True)
    (remote / LOCK_NAME).write_text(json.dumps({"token": "t", "run": "r-elsewhere", "host": "another-host", "pid": 1,
                                                "since": "2026-12-01T00:00:00+00:00", **holder}))


def test_a_live_lock_of_another_host_refuses_and_an_expired_one_is_taken_over(tmp_path):
    remote = tmp_path / "remote"
    v1 = make_version(tmp_path / "local", "20260101T000000Z-aaaa")
    _lock(remote, expires=time.time() + 600)
    with pytest.raises(TargetError, match="run r-elsewhere on host another-host"):
        publish(_target(remote), v1)
    assert not (remote / "CURRENT.json").exists()
    _lock(remote, expires=time.time() - 1)  # its holder stopped renewing it: killed, or cut off
    assert publish(_target(remote), v1).verified
    assert not (remote / LOCK_NAME).exists() and (remote / "CURRENT.json").is_file()


def test_a_lock_left_on_this_host_by_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    remote = tmp_path / "remote"
    _lock(remote, host=socket.gethostname(), pid=dead.pid, expires=time.time() + 600)
    assert publish(_target(remote), make_version(tmp_path / "local", "20260101T000000Z-aaaa")).verified
