"""``pacs2bids check`` against a real Orthanc: what works says so, what fails says how to fix it."""

from __future__ import annotations

import pytest

from pacs2bids import dimse
from pacs2bids.check import preflight
from pacs2bids.orthanc import free_port

from test_query import planted_studies
from test_retrieve import dimse_yaml, make_spec, web_yaml


@pytest.fixture
def pacs(orthanc_factory):
    port = free_port()
    o = orthanc_factory(modalities={"PACS2BIDS": ("127.0.0.1", port)})
    o.upload(planted_studies(1))
    o.move_port = port
    yield o
    dimse.close_pools()


def by_name(results):
    return {r.name: r for r in results}


def test_dimse_c_get_ok(tmp_path, pacs):
    r = by_name(preflight(make_spec(tmp_path, dimse_yaml(pacs), [("patient_id", "x", "A")])))
    assert r["c-echo"].ok and r["c-find"].ok and "disk-space" in r
    assert "c-move" not in r


def test_c_move_reaches_our_storage_ae(tmp_path, pacs):
    spec = make_spec(tmp_path, dimse_yaml(pacs, "c-move", storage_port=pacs.move_port), [("patient_id", "x", "A")])
    r = by_name(preflight(spec))
    # ok, not "not tested": an instance really arrived
    assert r["c-move"].status == "ok" and "sent one instance" in r["c-move"].detail, r["c-move"].detail


def test_c_move_unknown_destination_explained(tmp_path, pacs):
    spec = make_spec(tmp_path, dimse_yaml(pacs, "c-move", move_destination="STRANGER", storage_port=free_port()),
                     [("patient_id", "x", "A")])
    r = by_name(preflight(spec))["c-move"]
    assert r.status == "failed" and "STRANGER" in r.detail and "STRANGER" in r.fix


def test_unreachable_dimse(tmp_path):
    port = free_port()
    spec = make_spec(tmp_path, f"  dimse:\n    ae_title: X\n    host: 127.0.0.1\n    port: {port}\n    timeout: 3\n",
                     [("patient_id", "x", "A")])
    r = by_name(preflight(spec))
    assert r["c-echo"].status == "failed" and str(port) in r["c-echo"].detail and r["c-echo"].fix
    assert "c-find" not in r


def test_dicomweb(tmp_path, pacs):
    assert by_name(preflight(make_spec(tmp_path, web_yaml(pacs), [("patient_id", "x", "A")])))["qido-rs"].ok
    bad = f"  dicomweb:\n    url: {pacs.url}/nowhere\n    timeout: 5\n"
    r = by_name(preflight(make_spec(tmp_path, bad, [("patient_id", "x", "A")])))["qido-rs"]
    assert not r.ok and "HTTP 404" in r.detail and r.fix


def test_nothing_to_test_c_move_with_is_not_ok(tmp_path, orthanc_factory):
    """An empty PACS leaves C-MOVE untested: reported as such, never as a pass or a failure."""
    empty = orthanc_factory(dicomweb=False)
    spec = make_spec(tmp_path, dimse_yaml(empty, "c-move", storage_port=free_port()), [("patient_id", "x", "A")])
    r = by_name(preflight(spec))["c-move"]
    assert r.status == "not tested" and not r.ok and not r.failed, r


def test_c_move_to_a_wrong_storage_port_names_the_address(tmp_path, pacs):
    """The PACS knows our AE but at another port than the one we listen on: nothing arrives, and
    the result names the address the PACS must have (Orthanc answers as for an unknown AE, so
    both causes are named; the comparison with an AE no PACS knows is in the detail)."""
    wrong = free_port()
    spec = make_spec(tmp_path, dimse_yaml(pacs, "c-move", storage_port=wrong), [("patient_id", "x", "A")])
    r = by_name(preflight(spec))["c-move"]
    assert r.status == "failed", r
    assert "unreachable" in r.detail and f"127.0.0.1:{wrong}" in r.detail and "for an AE title it cannot know" in r.detail
    assert f"port {wrong}" in r.fix and "firewall" in r.fix


def test_host_that_does_not_resolve_is_a_failed_check_not_a_crash(tmp_path):
    spec = make_spec(tmp_path, "  dimse:\n    ae_title: X\n    host: no-such-host.invalid\n    port: 104\n"
                     "    timeout: 3\n", [("patient_id", "x", "A")])
    r = by_name(preflight(spec))
    assert r["c-echo"].status == "failed" and "does not resolve" in r["c-echo"].detail
    assert "no-such-host.invalid" in r["c-echo"].detail and "pacs.dimse.host" in r["c-echo"].detail
