"""Prefect's fixed costs at launch (issue 12): a database this Prefect version has migrated is not
migrated again by the next run's ephemeral server."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from pacs2bids import launch
from pacs2bids.dicomfiles import iter_dicom_files
from test_cli import cli, spec_for

MIGRATE = "PREFECT_API_DATABASE_MIGRATE_ON_START"


@pytest.fixture
def home(tmp_path, monkeypatch):
    for var in (MIGRATE, "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
                "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    (tmp_path / "prefect").mkdir()
    yield tmp_path / "prefect"
    os.environ.pop(MIGRATE, None)


def test_migrations_are_skipped_only_for_a_database_this_version_migrated(home, monkeypatch):
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ  # no database yet
    (home / "prefect.db").write_bytes(b"")
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ  # no marker yet
    launch._record_migrated()
    assert (home / launch.MIGRATED).read_text().strip() == version("prefect")
    assert launch._prefect_defaults() is True and os.environ[MIGRATE] == "false"
    os.environ.pop(MIGRATE)  # as run_spec does after the run (monkeypatch would restore it)
    (home / launch.MIGRATED).write_text("0.0.1\n")  # another Prefect version migrated it
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ
    launch._record_migrated()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a server of its own: not ours to touch
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ
    monkeypatch.delenv("PREFECT_API_URL")
    (home / "profiles.toml").write_text('[profiles.x]\nPREFECT_API_DATABASE_CONNECTION_URL = "postgresql://h/db"\n')
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ


def test_a_second_run_skips_the_migrations_and_completes(tmp_path, orthanc_factory, sample_dir):
    """Two real runs on one PREFECT_HOME: the first migrates and records it, the second's server
    starts without migrating and the run completes."""
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = cli("run", str(spec_for(tmp_path / "a", pacs, "phantom")), env_extra=env)
    assert first.returncode in (0, 3), first.stdout + first.stderr[-3000:]
    assert (tmp_path / "prefect" / launch.MIGRATED).read_text().strip() == version("prefect")
    second = cli("run", str(spec_for(tmp_path / "b", pacs, "phantom")), env_extra=env)
    assert second.returncode in (0, 3), second.stdout + second.stderr[-3000:]


EARLY = """
import httpx
from pacs2bids import launch
thread = launch._start_server_early()
import pacs2bids.flows.extract  # the flow's modules import while the server starts
thread.join()
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()  # the instance Prefect's client takes: already running
assert server.running and httpx.get(server.api_url + "/health").status_code == 200
server.stop()
print("early-ok")
"""


def test_the_ephemeral_server_starts_while_the_flow_imports(tmp_path):
    """The server Prefect's client uses is the one started before the flow's import, and answers."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    done = subprocess.run([sys.executable, "-c", EARLY], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "early-ok" in done.stdout, done.stderr[-3000:]


def test_no_early_server_when_prefect_has_a_server_of_its_own(home, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert launch._start_server_early() is None
