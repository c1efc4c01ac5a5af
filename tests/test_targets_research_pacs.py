"""The pseudonymised DICOM pushed to a research PACS: a second, real Orthanc on loopback plays it.

A published version is made from the bundled sample (pseudonymised by pacs2bids into
``sourcedata/``), then pushed by STOW-RS and by C-STORE. Faults are the server's own: Orthanc
killed mid-push, its storage full (``MaximumPatientCount`` with a protected patient: 0xA700 to
C-STORE, an unacknowledged instance to STOW-RS), a filter that drops an instance while answering
success, a called AE title it checks, HTTP basic authentication.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path

import pydantic
import pytest
import requests
from pydicom.dataset import Dataset

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.orthanc import free_port
from pacs2bids.config.targets import DicomwebTargetSettings, DimseTargetSettings, TargetSettings
from pacs2bids.targets import open_targets
from pacs2bids.targets.research_pacs import ResearchPacsError, ResearchPacsTarget, dicom_paths
from pacs2bids.targets.research_pacs_send import DimsePeer, Push, WebPeer

SECRET = b"research-pacs-test-secret-0123456789"
# (subject, sample folder): sub-01 is one study of four series, sub-02 one of one series
SERIES = [("01", "dcm_qa_nih/In/20180918Si/mr_0003"), ("01", "dcm_qa_nih/In/20180918Si/mr_0004"),
          ("01", "dcm_qa_nih/In/20180918Si/mr_0005"), ("01", "dcm_qa_nih/In/20180918Si/mr_0006"),
          ("02", "dcm_qa_philips/In/Magdeburg_2014/fmri")]


@pytest.fixture(scope="module")
def version(tmp_path_factory, sample_dir) -> tuple[Path, dict]:
    """A published version made by pacs2bids from the sample, and its manifest (path -> size, sha256)."""
    tmp = tmp_path_factory.mktemp("rpacs")
    root = tmp / "versions" / "run-1"
    p = Pseudonymiser("rpacs", SECRET, PseudonymizationSettings(), tmp / "keys")
    for i, (subject, folder) in enumerate(SERIES):
        out = root / "sourcedata" / f"sub-{subject}" / "ses-01" / f"{i:03d}-series"
        res = p.pseudonymise_series(iter_dicom_files(sample_dir / folder), out, subject=subject, session="01",
                                    quarantine_dir=tmp / "quarantine")
        assert res.written, folder
    (root / "dataset_description.json").write_text('{"Name": "rpacs", "BIDSVersion": "1.10.0"}\n')
    manifest = {
        f.relative_to(root).as_posix(): {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in sorted(root.rglob("*")) if f.is_file()
    }
    return root, manifest


def _paths(version, subject: str | None = None) -> list[str]:
    root, manifest = version
    return [p for p in dicom_paths(root, manifest) if subject is None or f"/sub-{subject}/" in p]


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _held(orthanc) -> dict[str, str]:
    """SOP Instance UID -> Orthanc id of every instance the research Orthanc holds (its REST API)."""
    return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.get("/instances?expand")}


def _target(kind: str, orthanc, **kw) -> ResearchPacsTarget:
    if kind == "dicomweb":
        spec = DicomwebTargetSettings(kind="dicomweb", name="rp", url=orthanc.dicomweb_url, batch_instances=5, **kw)
    else:
        spec = DimseTargetSettings(kind="dimse", name="rp", host="127.0.0.1", port=orthanc.dicom_port,
                                   ae_title=orthanc.aet, **kw)
    return ResearchPacsTarget(spec)


KINDS = ["dicomweb", "dimse"]


@pytest.mark.parametrize("kind", KINDS)
def test_push_is_whole_then_incremental(kind, version, orthanc_factory, monkeypatch):
    root, manifest = version
    paths = _paths(version)
    assert len(paths) == 35
    pacs = orthanc_factory()
    target = _target(kind, pacs)
    first = target.publish(root, manifest)
    assert (first.sent_files, first.skipped_files, first.verified, first.failed) == (35, 0, True, {})
    assert first.sent_bytes == sum(manifest[p]["size"] for p in paths)
    assert (first.state, first.copied_files) == ("published", 0)
    assert set(_held(pacs)) == {_sop(root / p) for p in paths}

    # instance-level questions only for series the PACS holds with another count than the version
    peer_class = WebPeer if kind == "dicomweb" else DimsePeer
    asked = []
    real_held = peer_class.held
    monkeypatch.setattr(peer_class, "held", lambda self, study, series: asked.append(series) or real_held(
        self, study, series))
    again = target.publish(root, manifest)
    assert (again.sent_files, again.sent_bytes, again.skipped_files, again.verified) == (0, 0, 35, True)
    assert again.state == "unchanged" and asked == []

    # the research PACS loses three instances, of both subjects: exactly those are sent again
    held = _held(pacs)
    lost = [paths[0], paths[2], paths[-1]]
    for p in lost:
        requests.delete(f"{pacs.url}/instances/{held[_sop(root / p)]}", timeout=30).raise_for_status()
    sent = []
    target.on_sent = sent.append
    third = target.publish(root, manifest)
    assert (third.sent_files, third.skipped_files, third.verified) == (3, 32, True)
    assert third.sent_bytes == sum(manifest[p]["size"] for p in lost)
    assert sent == [1, 2, 3]
    assert len(set(asked)) == 3  # the three series that lost one, before and after the push
    assert set(_held(pacs)) == {_sop(root / p) for p in paths}


@pytest.mark.parametrize("kind", KINDS)
def test_killed_mid_push_then_completed_without_duplicates(kind, version, orthanc_factory):
    root, manifest = version
    pacs = orthanc_factory()
    target = _target(kind, pacs)
    counts = []

    def kill_at_ten(n):
        counts.append(n)
        if n == 10:
            pacs.kill()

    target.on_sent = kill_at_ten
    with pytest.raises(ResearchPacsError, match="research PACS rp: .*run again") as err:
        target.publish(root, manifest)
    assert err.value.transient
    first = max(counts)
    assert first == 10
    pacs.start()
    before = len(_held(pacs))
    assert before == first  # what Orthanc answered for is there, nothing else
    target.on_sent = None
    rerun = target.publish(root, manifest)
    assert (rerun.sent_files, rerun.skipped_files, rerun.verified) == (35 - first, first, True)
    assert set(_held(pacs)) == {_sop(root / p) for p in _paths(version)}
    assert pacs.statistics()["CountInstances"] == 35


@pytest.mark.parametrize("kind", KINDS)
def test_instances_the_pacs_refuses_are_listed_and_the_rest_goes_on(kind, version, orthanc_factory, caplog):
    root, manifest = version
    # the research PACS holds one patient at most and keeps the one it has (protected): sub-01,
    # of which it already holds one instance; every instance of sub-02 is refused (storage full)
    pacs = orthanc_factory(extra={"MaximumPatientCount": 1})
    one = _paths(version, "01")[0]
    assert pacs.upload([root / one]) == 1
    patient = pacs.get("/patients")[0]
    requests.put(f"{pacs.url}/patients/{patient}/protected", data="1", timeout=30).raise_for_status()
    target = _target(kind, pacs)
    with caplog.at_level(logging.INFO), pytest.raises(ResearchPacsError, match="does not hold 27 of the 35") as err:
        target.publish(root, manifest)
    report = err.value.report
    refused = _paths(version, "02")
    assert refused[0] in str(err.value) and report.state == "failed"
    assert report.skipped_files == 1 and report.sent_files == 34
    assert not report.verified
    assert sorted(report.failed) == refused
    reason = "out of resources (0xA700)" if kind == "dimse" else "not acknowledged"
    assert all(reason in why for why in report.failed.values()), report.failed
    assert set(_held(pacs)) == {_sop(root / p) for p in _paths(version, "01")}
    assert f"does not hold {refused[0]}" in caplog.text

    # room made: the next run sends exactly the refused ones
    requests.put(f"{pacs.url}/patients/{patient}/protected", data="0", timeout=30).raise_for_status()
    pacs.stop(keep_storage=True)
    pacs.extra = {}
    pacs.start()
    rerun = target.publish(root, manifest)
    assert (rerun.sent_files, rerun.skipped_files, rerun.verified, rerun.failed) == (len(refused), 35 - len(refused),
                                                                                     True, {})


def test_success_answered_for_an_instance_the_pacs_dropped_is_not_verified(version, orthanc_factory, tmp_path):
    root, manifest = version
    dropped = _paths(version, "02")[3]
    lua = tmp_path / "filter.lua"
    lua.write_text('function ReceivedInstanceFilter(dicom, origin, info)\n'
                   f'  return dicom.SOPInstanceUID ~= "{_sop(root / dropped)}"\nend\n')
    pacs = orthanc_factory(extra={"LuaScripts": [str(lua)]})
    with pytest.raises(ResearchPacsError, match="does not hold 1 of the 35") as err:
        _target("dimse", pacs).publish(root, manifest)
    report = err.value.report
    assert report.sent_files == 35 and not report.verified
    assert report.failed == {dropped: "answered as stored, but the PACS does not hold it after the push"}


def test_wrong_called_ae_title_is_a_clear_error(version, orthanc_factory):
    root, manifest = version
    pacs = orthanc_factory(extra={"DicomCheckCalledAet": True})
    target = ResearchPacsTarget(DimseTargetSettings(kind="dimse", host="127.0.0.1", port=pacs.dicom_port,
                                                    ae_title="NOTTHEPACS"))
    with pytest.raises(ResearchPacsError, match=r"research PACS dimse:NOTTHEPACS@.*rejected.*'NOTTHEPACS'") as err:
        target.publish(root, manifest)
    assert not err.value.transient
    assert pacs.statistics()["CountInstances"] == 0


def test_wrong_password_is_a_clear_error_and_never_shown(version, orthanc_factory, monkeypatch, caplog):
    root, manifest = version
    pacs = orthanc_factory(extra={"AuthenticationEnabled": True, "RegisteredUsers": {"pusher": "right-horse-7"}},
                           auth=("pusher", "right-horse-7"))
    monkeypatch.setenv("RP_USER", "pusher")
    monkeypatch.setenv("RP_PASSWORD", "wrong-battery-3")
    target = _target("dicomweb", pacs, username_env="RP_USER", password_env="RP_PASSWORD")
    with caplog.at_level(logging.DEBUG), pytest.raises(ResearchPacsError, match=r"research PACS rp: .*HTTP 401.*RP_USER / RP_PASSWORD") as err:
        target.publish(root, manifest)
    assert not err.value.transient
    assert "wrong-battery-3" not in str(err.value) + caplog.text
    monkeypatch.setenv("RP_PASSWORD", "right-horse-7")
    report = _target("dicomweb", pacs, username_env="RP_USER", password_env="RP_PASSWORD").publish(root, manifest)
    assert report.verified and report.sent_files == 35
    assert "right-horse-7" not in caplog.text + repr(report)
    # the same credentials from a Prefect Secret block (as open_targets hands them over), not the environment
    monkeypatch.setenv("RP_PASSWORD", "wrong-battery-3")
    spec = DicomwebTargetSettings(kind="dicomweb", name="rp", url=pacs.dicomweb_url, credentials_block="rp-pacs")
    [target] = open_targets(type("Spec", (), {"targets": [spec], "project": "rp", "secret": None}),
                            secrets={"rp-pacs": {"username": "pusher", "password": "right-horse-7"}})
    assert target.publish(root, manifest).state == "unchanged"
    [target] = open_targets(type("Spec", (), {"targets": [spec], "project": "rp", "secret": None}),
                            secrets={"rp-pacs": {"username": "pusher", "password": "wrong-battery-3"}})
    with pytest.raises(ResearchPacsError, match="HTTP 401.*the Prefect block rp-pacs") as err:
        target.publish(root, manifest)
    assert "wrong-battery-3" not in str(err.value) + caplog.text
    with pytest.raises(ResearchPacsError, match="HTTP 401.*none given"):  # the spec names no credentials
        _target("dicomweb", pacs).publish(root, manifest)


def test_missing_credentials_variable_is_named(version, monkeypatch):
    root, manifest = version
    monkeypatch.delenv("RP_NOT_SET", raising=False)
    target = ResearchPacsTarget(DicomwebTargetSettings(kind="dicomweb", url="http://127.0.0.1:9/dicom-web",
                                                       username_env="RP_NOT_SET", password_env="RP_NOT_SET"))
    with pytest.raises(ResearchPacsError, match="RP_NOT_SET not set"):
        target.publish(root, manifest)


@pytest.mark.parametrize("kind", KINDS)
def test_unreachable_pacs_is_a_clear_transient_error(kind, version):
    root, manifest = version
    port = free_port()  # nothing listens there
    if kind == "dicomweb":
        spec = DicomwebTargetSettings(kind="dicomweb", name="rp", url=f"http://127.0.0.1:{port}/dicom-web", timeout=5)
    else:
        spec = DimseTargetSettings(kind="dimse", name="rp", host="127.0.0.1", port=port, ae_title="RESEARCH", timeout=5)
    with pytest.raises(ResearchPacsError, match=r"research PACS rp: .*(server is running|PACS is running)") as err:
        ResearchPacsTarget(spec).publish(root, manifest)
    assert err.value.transient


@pytest.mark.parametrize("entry, message", [
    ("{kind: dicomweb, url: 'ftp://x/dicom-web'}", "targets.0.dicomweb.url: .*must start with http"),
    ("{kind: dicomweb, url: 'https://pusher:hunter22@x/dicom-web'}", "targets.0.dicomweb.url: .*password_env"),
    ("{kind: dicomweb}", "targets.0.dicomweb.url: required key is missing"),
    ("{kind: dicomweb, url: 'http://h/dw', password_env: 'hunter22!'}", "password_env: .*NAME of an environment"),
    ("{kind: dimse, host: h, port: 104, ae_title: AAAAAAAAAAAAAAAAA}", "targets.0.dimse.ae_title: .*1 to 16"),
    ("{kind: dimse, host: h, port: 0, ae_title: PACS}", "targets.0.dimse.port"),
    ("{kind: dimse, host: h, port: 104, ae_title: PACS, password: x}", "targets.0.dimse.password: unknown key"),
    ("{kind: dicomweb, url: 'http://h/dw', batch_instances: 0}", "targets.0.dicomweb.batch_instances"),
])
def test_spec_entries_are_validated_on_load(entry, message, tmp_path):
    from conftest import write_spec

    from pacs2bids.config import load_spec
    from pacs2bids.errors import SpecError

    spec = write_spec(tmp_path, "patient_id,subject\nP1,01\n", project="rp",
                      pacs="{dimse: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}}", output="out",
                      targets=f"[{entry}]")
    with pytest.raises(SpecError, match=message) as err:
        load_spec(spec, require_secret=False)
    assert "hunter22" not in str(err.value)


def test_spec_targets_open_as_research_pacs(tmp_path):
    adapter = pydantic.TypeAdapter(list[TargetSettings])
    entries = adapter.validate_python([{"kind": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web/"},
                                       {"kind": "dimse", "host": "pacs.example.org", "port": 104, "ae_title": "RES",
                                        "name": "research"}])

    class Spec:
        project, targets, secret = "rp", entries, None

    built = open_targets(Spec, environ={})
    assert [type(t) for t in built] == [ResearchPacsTarget, ResearchPacsTarget]
    assert [t.name for t in built] == ["dicomweb:127.0.0.1:8042", "research"]
    assert built[0].settings.url == "http://127.0.0.1:8042/dicom-web"


def test_only_the_sourcedata_dicom_is_pushed(version):
    root, manifest = version
    from_manifest = dicom_paths(root, manifest)
    assert from_manifest == dicom_paths(root, {"files": {k: v["size"] for k, v in manifest.items()}})
    assert from_manifest == dicom_paths(root, None)  # read from the folder
    assert len(from_manifest) == 35 and all(p.startswith("sourcedata/sub-") for p in from_manifest)
    assert "dataset_description.json" in manifest


def _item(sop: str, **kw) -> Dataset:
    ds = Dataset()
    ds.ReferencedSOPInstanceUID = sop
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_stow_answer_is_read_per_instance():
    """PS3.18 10.5.3: ReferencedSOPSequence (WarningReason), FailedSOPSequence (FailureReason),
    and an instance in neither; the answer is built here as a PACS other than Orthanc sends it."""
    from pacs2bids.targets.research_pacs import Instance

    batch = [Instance(f"sourcedata/sub-01/ses-01/s/{n}.dcm", "1", "2", n, "1.2.840.10008.5.1.4.1.1.4",
                      "1.2.840.10008.1.2.1", 10) for n in ("1.1", "1.2", "1.3", "1.4", "1.5")]
    answer = Dataset()
    answer.ReferencedSOPSequence = [_item("1.1"), _item("1.2", WarningReason=0xB000)]
    answer.FailedSOPSequence = [_item("1.3", FailureReason=0xA700), _item("1.4", FailureReason=0x0111)]
    push = Push()
    WebPeer._judge(batch, answer, push)
    assert len(push.sent) == 5
    assert push.warnings == {batch[1].path: "coercion of data elements (0xB000)"}
    assert push.failed == {batch[2].path: "refused: out of resources (0xA700)",
                           batch[4].path: "not acknowledged: the STOW-RS answer lists it neither as stored nor as failed"}


@pytest.mark.slow
def test_run_pushes_its_sourcedata_to_a_research_pacs(tmp_path, orthanc_factory, sample_dir, prefect_harness,
                                                       monkeypatch):
    """End to end: the flow's publish_target sends the version's pseudonymised DICOM by C-STORE; a
    research PACS that refuses some instances makes the run "completed with failures", its report
    listing them; once it has room, the next run completes it."""
    from conftest import write_spec

    from pacs2bids.config import load_spec
    from pacs2bids.flows.extract import extract_project
    from pacs2bids.publish import current_version

    clinical = orthanc_factory(dicomweb=False)
    clinical.upload(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    # the research PACS holds one patient at most, and keeps the one it has (protected): it refuses ours
    research = orthanc_factory(aet="RESEARCH", extra={"MaximumPatientCount": 1})
    research.upload(list(iter_dicom_files(sample_dir / "dcm_qa_nih"))[:1])
    foreign = research.get("/patients")[0]
    requests.put(f"{research.url}/patients/{foreign}/protected", data="1", timeout=30).raise_for_status()
    spec = write_spec(tmp_path, "patient_id,subject\nphantom,01\n", project="rpflow", pacs=clinical, output="out",
                      targets=f"[{{kind: dimse, name: research, host: 127.0.0.1, port: {research.dicom_port}, "
                              "ae_title: RESEARCH}]")
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", "research-flow-secret-0123456789")
    first = extract_project(str(spec))
    assert first["published"] and first["state"] == "completed with failures", first["errors"]
    [report] = first["targets"]
    assert report["state"] == "failed" and report["failed"] and not report["verified"]
    version = current_version(load_spec(spec).output)
    paths = dicom_paths(version, None)
    assert set(report["failed"]) == set(paths) and report["sent_files"] == len(paths)
    assert all("out of resources (0xA700)" in why for why in report["failed"].values())

    research.stop(keep_storage=True)
    research.extra = {}
    research.start()
    second = extract_project(str(spec))  # nothing new to extract: the target is completed all the same
    [report] = second["targets"]
    assert (report["state"], report["verified"], report["failed"]) == ("published", True, {}), report
    assert report["sent_files"] == len(first["targets"][0]["failed"])
    held = set(_held(research))
    assert {_sop(version / p) for p in paths} <= held and len(held) == len(paths) + 1  # ours and the foreign one


def test_a_version_with_lineage_is_checked_without_reading_headers(version, orthanc_factory, tmp_path, monkeypatch):
    """The UIDs of files the version's per-instance lineage describes (same SHA-256 as the
    manifest) come from the lineage: a re-run with nothing new reads no DICOM header, and a file
    the lineage does not vouch for (another checksum) is read."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pydicom

    from pacs2bids.lineage.tables import INSTANCE_SCHEMA, LINEAGE_DIR
    from pacs2bids.targets import research_pacs

    src, manifest = version
    root = tmp_path / "run-1"
    shutil.copytree(src, root)
    paths = _paths(version)
    rows = []
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(root / p, stop_before_pixels=True)
        rows.append({"run_id": "run-1", "project": "rpacs", "recorded_at": datetime.now(timezone.utc),
                     "subject": "01", "path": p, "pseudo_study_uid": str(ds.StudyInstanceUID),
                     "pseudo_series_uid": str(ds.SeriesInstanceUID),
                     "pseudo_sop_instance_uid": str(ds.SOPInstanceUID),
                     "sha256": "0" * 64 if i == 0 else manifest[p]["sha256"]})  # the first: not vouched for
    (root / LINEAGE_DIR).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA), root / LINEAGE_DIR / "instances-run-1.parquet")

    expected = {_sop(root / p) for p in paths}
    reads = []  # pydicom's own dcmread, counted (the module's reads of headers)
    real = research_pacs.pydicom.dcmread
    monkeypatch.setattr(research_pacs.pydicom, "dcmread", lambda path, *a, **kw: reads.append(Path(path)) or real(
        path, *a, **kw))
    pacs = orthanc_factory()
    target = _target("dimse", pacs)
    first = target.publish(root, manifest)
    assert (first.sent_files, first.verified, first.failed) == (35, True, {})
    assert set(_held(pacs)) == expected
    # the file the lineage does not vouch for, read up front; the classes of the 34 others, to send them
    assert reads[0] == root / paths[0] and sorted(reads[1:]) == sorted(root / p for p in paths[1:])
    reads.clear()
    again = target.publish(root, manifest)
    assert (again.sent_files, again.state, again.verified) == (0, "unchanged", True)
    assert reads == [root / paths[0]]
