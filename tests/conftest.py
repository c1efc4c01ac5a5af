"""Shared fixtures: real Orthanc servers on loopback, the bundled sample, the fuller corpus.

Prefect's ephemeral server is started once per session (``prefect_harness``), never per test.
A real ``prefect server start`` (``prefect_server``) is started only for the tests that ask
for it: those where several processes (runs, workers) must share one Prefect backend.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import requests

from pacs2bids.orthanc import Orthanc, free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
SHARED_DEID = REPO.parent / "shared" / "data" / "deid"
SHARED_VENDORS = REPO.parent / "shared" / "data" / "dicom-vendors"

os.environ.setdefault("NIPYPE_NO_ET", "1")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real sample shipped inside the package (used by the demo)."""
    return Path(str(resources.files("pacs2bids") / "data" / "sample"))


def _corpus(path: Path) -> Path:
    if not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the fuller corpus {path} is missing, and CI=true: it must be beside the repo")
        pytest.skip(f"the fuller corpus {path} is not here")
    return path


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """../shared/data/dicom: fails (not skips) when CI=true and it is missing."""
    return _corpus(SHARED_DICOM)


@pytest.fixture(scope="session")
def vendors_dir() -> Path:
    """../shared/data/dicom-vendors: fails (not skips) when CI=true and it is missing."""
    return _corpus(SHARED_VENDORS)


@pytest.fixture(scope="session")
def deid_data_dir() -> Path:
    return _corpus(SHARED_DEID)


def write_spec(folder: Path, inclusions: str, **keys) -> Path:
    """Write ``inclusions.csv`` (the text given) and ``spec.yaml`` into ``folder``; returns the spec's path.
    Tests import it (``from conftest import write_spec``), as they import other tests' helpers.

    Each keyword is one top-level key of the spec, its value written as is (YAML flow style, e.g.
    ``retries="{attempts: 0}"``); ``pacs`` may also be a running :class:`Orthanc`, for a DIMSE
    C-GET peer on it. ``selection`` defaults to the inclusion list alone.
    """
    (folder / "inclusions.csv").write_text(inclusions)
    pacs = keys.get("pacs")
    if isinstance(pacs, Orthanc):
        keys["pacs"] = f"{{dimse: {{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.dicom_port}, retrieve: c-get}}}}"
    keys.setdefault("selection", "{inclusions: inclusions.csv}")
    path = folder / "spec.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in keys.items()))
    return path


@pytest.fixture
def orthanc_factory(tmp_path_factory):
    """Start Orthanc servers on free loopback ports; all are stopped at the end of the test."""
    started: list[Orthanc] = []

    def make(**kwargs) -> Orthanc:
        o = Orthanc(workdir=tmp_path_factory.mktemp("orthanc"), **kwargs)
        started.append(o.start())
        return o

    yield make
    for o in started:
        o.stop()


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect backend for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real ``prefect server start`` on a free loopback port, for the whole session; yields
    its API URL (``http://127.0.0.1:<port>/api``), to hand to other processes as PREFECT_API_URL.

    Its own PREFECT_HOME and SQLite database live in a temporary folder; the UI, analytics and
    the scheduler are off. Stopped (its whole process group) at the end of the session; its log
    is ``server.log`` in that folder, quoted when it fails to start.
    """
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "prefect"]
    cmd += ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off",
            "--no-scheduler"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    log_path = home / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    deadline = time.monotonic() + 180  # a first start migrates a new database
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited at start ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop()
            pytest.fail(f"prefect server did not answer {url}/health within 180 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        stop()
