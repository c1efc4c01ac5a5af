"""What a run prints (issue 10 item 10): ``pacs2bids run`` as a subprocess against a real
Orthanc (DICOMweb plugin, then C-GET) serving real files with planted identities. Neither stdout
nor stderr, nor the logs Prefect stored, may hold an original UID, patient ID or name, also
when Prefect is told to forward the third-party loggers (``PREFECT_LOGGING_EXTRA_LOGGERS``).
dicomweb-client logs ``search for series of study "<original UID>"`` at INFO unless quieted."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pacs2bids.logsafety import THIRD_PARTY_LOGGERS, redact
from test_extract_e2e import SECRET, identifying_values, plant_corpus, write_spec


# The flow alone, as a Prefect worker runs it (no CLI, no logging set-up of ours), with the root
# logger opened to INFO as a worker's operator may do.
_FLOW_ONLY = "import sys; from pacs2bids.flows.extract import extract_project; extract_project(sys.argv[1])"


def _run_cli(spec: Path, tmp: Path, flow_only: bool = False) -> tuple[subprocess.CompletedProcess, str]:
    home = tmp / "prefect-home"
    env = {
        **os.environ,
        "PACS2BIDS_PROJECT_SECRET": SECRET,
        "NIPYPE_NO_ET": "1",
        "PREFECT_HOME": str(home),
        "PREFECT_LOGGING_LEVEL": "DEBUG",
        "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(THIRD_PARTY_LOGGERS),
    }
    env.pop("PREFECT_API_URL", None)  # the run's own ephemeral server and database, read below
    if flow_only:
        env["PREFECT_LOGGING_ROOT_LEVEL"] = "INFO"
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    cmd = ["-c", _FLOW_ONLY] if flow_only else ["-m", "pacs2bids.cli", "run"]
    proc = subprocess.run([sys.executable, *cmd, str(spec)], capture_output=True, text=True, env=env, timeout=1500)
    stored = ""
    db = home / "prefect.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            stored = "\n".join(str(m) for (m,) in con.execute("select message from log"))
    return proc, stored


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["dicomweb", "c-get", "dicomweb-flow-only"])
def test_a_run_prints_no_original_identifier(orthanc_factory, sample_dir, tmp_path, transport):
    planted = plant_corpus(sample_dir / "dcm_qa_philips", tmp_path / "planted")
    pacs = orthanc_factory()
    assert pacs.upload(f for files in planted["by_series"].values() for f in files) > 0
    if transport.startswith("dicomweb"):
        block = f"  dicomweb: {{url: {pacs.dicomweb_url}}}\n"
    else:
        block = f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs.dicom_port}, retrieve: c-get}}\n"
    spec = write_spec(tmp_path, block, planted, tmp_path / "out" / "dataset")
    proc, stored = _run_cli(spec, tmp_path, flow_only=transport.endswith("flow-only"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "dataset").is_dir()
    # the streams were read: the run logged its progress there and in Prefect's database
    assert "versions:" in proc.stdout + proc.stderr and "versions:" in stored
    values = {v for v in identifying_values(planted) if len(v) >= 6}
    for label, text in (("stdout", proc.stdout), ("stderr", proc.stderr), ("Prefect logs", stored)):
        low = text.lower()
        found = sorted(v for v in values if v.lower() in low)
        assert not found, f"{label} shows {found[:3]}"


def test_redact_masks_uids_not_pseudonyms():
    assert redact('search for series of study "1.3.12.2.1107.5.2.43.66044.2018"') == 'search for series of study "<uid>"'
    pseudo = "2.25.281474976710656123456789"
    assert redact(f"series {pseudo}: 3 files, 1.5T, v1.2.3") == f"series {pseudo}: 3 files, 1.5T, v1.2.3"


def test_quieting_covers_loggers_set_lower_below_a_quieted_one():
    import logging

    from pacs2bids.logsafety import quiet_third_party_loggers

    child = logging.getLogger("dicomweb_client.api")
    child.setLevel(logging.DEBUG)  # as PREFECT_LOGGING_LOGGERS_..._LEVEL=DEBUG would
    try:
        quiet_third_party_loggers()
        assert not child.isEnabledFor(logging.INFO)
        assert not logging.getLogger("dicomweb_client").isEnabledFor(logging.INFO)
        assert logging.getLogger("dicomweb_client").isEnabledFor(logging.WARNING)
    finally:
        child.setLevel(logging.NOTSET)


def test_own_warnings_and_errors_carry_no_original_uid(caplog):
    """A failure message quoting a URL of the PACS (requests' HTTPError names the study and the
    series) or an exception's text is redacted before any handler writes it."""
    import logging

    from pacs2bids.logsafety import quiet_third_party_loggers

    quiet_third_party_loggers()
    uid = "1.3.12.2.1107.5.2.43.66044.2018091812244919155211234"
    log = logging.getLogger("pacs2bids.flows.extract")
    with caplog.at_level(logging.WARNING):
        log.error("study 1/1 (ses-01): retrieval failed: %s", f"HTTPError: 404 for url: http://pacs/studies/{uid}")
        try:
            raise RuntimeError(f"no such series {uid}")
        except RuntimeError:
            log.warning("retrying", exc_info=True)
        logging.getLogger("dicomweb_client.api").warning('search for series of study "%s"', uid)
    text = "\n".join(caplog.text.splitlines()) + "\n".join(r.getMessage() for r in caplog.records)
    assert uid not in text and text.count("<uid>") >= 3, text
