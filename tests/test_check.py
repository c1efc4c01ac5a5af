"""``pacs2bids check`` against a real Orthanc: what works says so, what fails says how to fix it."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pacs2bids.pacs import close_pools
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
    close_pools()


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
    assert "unreachable" in r.detail and f"127.0.0.1:{wrong}" in r.detail and "AE title it cannot know" in r.detail
    assert f"port {wrong}" in r.fix and "firewall" in r.fix


def test_host_that_does_not_resolve_is_a_failed_check_not_a_crash(tmp_path):
    spec = make_spec(tmp_path, "  dimse:\n    ae_title: X\n    host: no-such-host.invalid\n    port: 104\n"
                     "    timeout: 3\n", [("patient_id", "x", "A")])
    r = by_name(preflight(spec))
    assert r["c-echo"].status == "failed" and "does not resolve" in r["c-echo"].detail
    assert "no-such-host.invalid" in r["c-echo"].detail and "pacs.dimse.host" in r["c-echo"].detail


class ShowsTheDifference:
    """A fake PACS (pynetdicom), only because Orthanc cannot show this fault: Orthanc 1.10 answers
    0xC000 with no sub-operation both for an AE title it does not know and for a known one it
    cannot connect to. This one answers as DCMTK-style PACS do: 0xA801 for an unknown AE title,
    and a failure (0xC514) when the destination is known but its connection fails. It holds one
    study of one instance; ``known`` is the AE title it has an entry for."""

    def __init__(self, known: str):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
            Verification,
        )

        self.known, self.port = known, free_port()
        ae = AE(ae_title="FAKEPACS")
        for sop in (Verification, StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(sop)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)])

    def _find(self, event):
        ds = Dataset()
        ds.QueryRetrieveLevel = event.identifier.QueryRetrieveLevel
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6"
        yield 0xFF00, ds

    def _move(self, event):
        dest = event.move_destination.decode().strip() if isinstance(event.move_destination, bytes) \
            else str(event.move_destination).strip()
        if dest != self.known:
            yield None, None  # pynetdicom answers 0xA801
            return
        raise ConnectionRefusedError(f"cannot connect to {dest}")  # pynetdicom answers 0xC514

    def stop(self):
        self.server.shutdown()


def test_c_move_known_but_unreachable_told_apart_from_unknown_ae(tmp_path):
    """With a PACS whose answers differ, check says which of the two causes it is."""

    fake = ShowsTheDifference(known="PACS2BIDS")
    try:
        pacs_yaml = (f"  dimse:\n    ae_title: FAKEPACS\n    host: 127.0.0.1\n    port: {fake.port}\n"
                     f"    retrieve: c-move\n    timeout: 10\n    storage_port: {free_port()}\n")
        r = by_name(preflight(make_spec(tmp_path, pacs_yaml, [("patient_id", "x", "A")])))["c-move"]
        assert r.status == "failed" and r.detail.startswith("destination known but unreachable"), r.detail
        assert "0xA801 for an AE title it cannot know, 0xC514 for PACS2BIDS" in r.detail and "firewall" in r.fix
        close_pools()
        r = by_name(preflight(make_spec(tmp_path, pacs_yaml + "    move_destination: NOBODY\n",
                                        [("patient_id", "x", "A")])))["c-move"]
        assert r.status == "failed" and r.detail.startswith("unknown AE:"), r.detail
        assert "Declare AE title NOBODY" in r.fix
    finally:
        close_pools()
        fake.stop()
