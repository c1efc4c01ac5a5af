"""Shared fixtures: real Orthanc servers on loopback, the bundled sample, the fuller corpus.

Prefect's ephemeral server is started once per session (``prefect_harness``), never per test.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pytest

from pacs2bids.orthanc import Orthanc

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
SHARED_DEID = REPO.parent / "shared" / "data" / "deid"

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
def deid_data_dir() -> Path:
    return _corpus(SHARED_DEID)


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
