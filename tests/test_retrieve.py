"""Retrieval against a real Orthanc on loopback: C-GET, C-MOVE, WADO-RS, resume, faults."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pydicom
import pytest

from pacs2bids.pacs import close_pools
from pacs2bids.pacs import gate as limits
from pacs2bids.pacs.contexts import ECHO
from pacs2bids.pacs.pool import pool_for
from pacs2bids.pacs.scp import storage_server
from pacs2bids.config import load_spec
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.errors import PacsError
from pacs2bids.orthanc import Orthanc, free_port
from pacs2bids.query import find_studies
from pacs2bids.retrieve import retrieve_study
from pacs2bids.sink import LEDGER, RateLimiter, SeriesSink

SECRET = "x" * 32


def make_spec(tmp_path: Path, pacs_yaml: str, rows: list[tuple[str, str, str]], extra: str = ""):
    """A ProjectSpec from a YAML and an inclusions.csv written into ``tmp_path``.
    ``rows`` are (column, value, subject) with column patient_id or accession_number."""
    cols = sorted({c for c, _, _ in rows})
    lines = [",".join(cols + ["subject"])]
    for c, v, sub in rows:
        lines.append(",".join(v if k == c else "" for k in cols) + f",{sub}")
    (tmp_path / "inclusions.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "spec.yaml").write_text(
        "project: TEST\n"
        f"pacs:\n{pacs_yaml}"
        "selection:\n  inclusions: inclusions.csv\n  modalities: [MR]\n"
        f"{extra}"
        "output: out\n"
        "retries:\n  attempts: 3\n  backoff_seconds: 0.5\n"
    )
    return load_spec(tmp_path / "spec.yaml", environ={"PACS2BIDS_PROJECT_SECRET": SECRET})


def dimse_yaml(o, retrieve="c-get", **kw) -> str:
    lines = [f"  dimse:\n    ae_title: {o.aet}\n    host: 127.0.0.1\n    port: {o.dicom_port}\n",
             f"    retrieve: {retrieve}\n    timeout: 10\n"]
    lines += [f"    {k}: {v}\n" for k, v in kw.items()]
    return "".join(lines)


def web_yaml(o) -> str:
    return f"  dicomweb:\n    url: {o.dicomweb_url}\n    timeout: 20\n"


@pytest.fixture(autouse=True)
def _fresh_pools(orthanc_factory):
    # depends on orthanc_factory so pooled associations close before Orthanc stops
    yield
    close_pools()


@pytest.fixture(scope="module")
def sample_files(sample_dir) -> list[Path]:
    return list(iter_dicom_files(sample_dir))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, sample_files):
    """One Orthanc holding the whole sample, shared by the read-only tests of this module;
    it knows our C-MOVE storage AE PACS2BIDS at a fixed port."""
    port = free_port()
    o = Orthanc(workdir=tmp_path_factory.mktemp("orthanc"), modalities={"PACS2BIDS": ("127.0.0.1", port)})
    o.start()
    assert o.upload(sample_files) == len(sample_files)
    o.move_port = port
    yield o
    close_pools()
    o.stop()


def orthanc_sops(o) -> set[str]:
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in o.get("/instances?expand")}


def disk_sops(raw: Path) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in raw.rglob("*.dcm")]


def retrieve_all(spec, raw: Path, progress=None):
    q = find_studies(spec)
    results = []
    for st in q.studies:
        results += retrieve_study(spec, st, raw, progress=progress)
    return q, results


def retrieve_concurrently(spec, studies, raw: Path, limiter=None) -> list:
    """Retrieve each study in its own thread, at once; raises the first error any thread met.
    ``limiter``: a factory, one RateLimiter per study."""
    results: list = []
    errors: list = []

    def run(study):
        try:
            kw = {"limiter": limiter()} if limiter else {}
            results.extend(retrieve_study(spec, study, raw, **kw))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def patient_ids(files) -> list[str]:
    return sorted({str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in files})


class Counter:
    """progress callback: instances written to disk, per series (last value wins)."""

    def __init__(self):
        self.stored: dict[int, int] = {}

    def __call__(self, series, stored, announced):
        self.stored[id(series)] = stored

    @property
    def total(self) -> int:
        return sum(self.stored.values())


@pytest.mark.parametrize("transport", ["c-get", "c-move", "wado-rs"])
def test_each_transport_retrieves_every_instance(tmp_path, loaded, sample_files, transport):
    o = loaded
    rows = [("patient_id", pid, f"S{i}") for i, pid in enumerate(patient_ids(sample_files))]
    if transport == "wado-rs":
        pacs = web_yaml(o)
    elif transport == "c-move":
        pacs = dimse_yaml(o, "c-move", storage_port=o.move_port)
    else:
        pacs = dimse_yaml(o)
    spec = make_spec(tmp_path, pacs, rows)
    raw = tmp_path / "work" / "raw"
    count = Counter()
    q, results = retrieve_all(spec, raw, count)
    assert not q.unmatched and len(q.studies) == len(rows)
    assert all(r.status == "complete" and r.missing == 0 for r in results), [(r.status, r.reason) for r in results]
    got = disk_sops(raw)
    assert len(got) == len(set(got)) == count.total  # no duplicate
    assert set(got) == orthanc_sops(o)
    # names carry no original UID; the ledger lists exactly the files, with their checksums
    for r in results:
        files = {p.stem: p for p in r.folder.glob("*.dcm")}
        assert len(files) == r.received
        ledger = json.loads((r.folder / LEDGER).read_text())["instances"]
        assert set(ledger) == set(files)
        name, entry = next(iter(ledger.items()))
        assert entry["sha256"] == hashlib.sha256(files[name].read_bytes()).hexdigest()
    for p in raw.rglob("*"):
        assert not any(uid in str(p) for uid in got[:5])
        assert len(p.stem) == 32 or p.name in (LEDGER, ".incoming")
    # a second run fetches nothing and changes nothing
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*.dcm")}
    again = Counter()
    _, results2 = retrieve_all(spec, raw, again)
    assert all(r.status == "complete" for r in results2)
    assert again.total == 0
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*.dcm")} == before


@pytest.mark.parametrize("transport", ["c-get", "wado-rs"])
def test_a_study_wanted_whole_comes_in_one_request_same_files_and_ledgers(tmp_path, loaded, monkeypatch, transport):
    """A study of four series, every one wanted: one request for the study (C-GET at study
    level, WADO-RS of the study), each instance routed to its series folder as it arrives. The
    files, names, ledgers and outcomes are those of a retrieval series by series (forced here by
    a study with a series left out of the selection), and each series is handed over once."""
    from dataclasses import replace

    from pacs2bids.pacs.transport import DimseTransport, WebTransport

    o = loaded
    spec = make_spec(tmp_path, dimse_yaml(o) if transport == "c-get" else web_yaml(o), [("patient_id", "DEV", "A")])
    study = find_studies(spec).studies[0]
    assert len(study.series) == 4 and study.excluded_series == 0
    asked: list = []
    for cls in (DimseTransport, WebTransport):
        def fetch(self, study_uid, series_uid, *a, _fetch=cls.fetch, **k):
            asked.append(series_uid)
            return _fetch(self, study_uid, series_uid, *a, **k)
        monkeypatch.setattr(cls, "fetch", fetch)

    def run(which: str, ref) -> tuple[list, dict, list]:
        handed: list = []
        asked.clear()
        results = retrieve_study(spec, ref, tmp_path / which / "raw", on_complete=handed.append)
        raw = tmp_path / which / "raw"
        files = {str(p.relative_to(raw)): p.read_bytes() for p in raw.rglob("*.dcm")}
        ledgers = {str(p.relative_to(raw)): json.loads(p.read_text()) for p in raw.rglob(LEDGER)}
        outcomes = [(r.series.series_instance_uid, r.status, r.received, r.missing, r.reason) for r in results]
        assert sorted(r.series.series_instance_uid for r in handed) == sorted(s.series_instance_uid for s in ref.series)
        return list(asked), (files, ledgers), outcomes

    asked_whole, got_whole, outcomes_whole = run("whole", study)
    asked_series, got_series, outcomes_series = run("series", replace(study, excluded_series=1))
    assert asked_whole == [None]  # the study, once
    assert sorted(asked_series) == sorted(s.series_instance_uid for s in study.series)
    assert len(got_whole[0]) == 8 and got_whole == got_series and outcomes_whole == outcomes_series


@pytest.mark.parametrize("transport", ["c-get", "wado-rs"])
def test_resume_fetches_only_missing_instances(tmp_path, loaded, sample_files, transport):
    o = loaded
    spec = make_spec(tmp_path, dimse_yaml(o) if transport == "c-get" else web_yaml(o),
                     [("patient_id", "DEV", "A"), ("patient_id", "phantom", "B")])
    raw = tmp_path / "raw"
    retrieve_all(spec, raw)
    files = sorted(raw.rglob("*.dcm"))
    assert len(files) == 8 + 27
    gone = files[::4]
    kept = {p: p.stat().st_mtime_ns for p in files if p not in gone}
    for p in gone:
        p.unlink()
    # a file half-written by a killed run is cleaned and does not count
    (files[1].parent / f"{files[1].name}.1234.part").write_bytes(b"partial")
    count = Counter()
    _, results = retrieve_all(spec, raw, count)
    assert count.total == len(gone)
    assert all(r.status == "complete" for r in results)
    assert sorted(raw.rglob("*.dcm")) == files
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert not list(raw.rglob("*.part"))


def test_orthanc_killed_mid_transfer_then_restarted(tmp_path, orthanc_factory, sample_dir):
    o = orthanc_factory(dicomweb=False)
    files = list(iter_dicom_files(sample_dir / "PACSMAN_data"))
    o.upload(files)
    spec = make_spec(tmp_path, dimse_yaml(o, timeout=5), [("patient_id", "PACSMAN1", "P")])
    raw = tmp_path / "raw"
    q = find_studies(spec)
    pool = pool_for(spec.pacs.dimse)
    at_kill: list[int] = []
    opened_at_kill: list[int] = []

    def saboteur():
        deadline = time.monotonic() + 60
        while len(list(raw.rglob("*.dcm"))) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        at_kill.append(len(list(raw.rglob("*.dcm"))))  # what was on disk when the PACS died
        opened_at_kill.append(pool.stats.opened)
        o.kill()
        time.sleep(1.0)
        o.restart()

    t = threading.Thread(target=saboteur)
    t.start()
    count = Counter()
    results = retrieve_study(spec, q.studies[0], raw, progress=count)
    t.join()
    # the kill landed mid-transfer: some instances were in, not all
    assert at_kill and 20 <= at_kill[0] < len(files), (at_kill, len(files))
    # and the retrieval went on over a new association, opened to the restarted PACS
    assert pool.stats.opened > opened_at_kill[0], (opened_at_kill, pool.stats)
    assert results[0].status == "complete", results[0].reason
    got = disk_sops(raw)
    assert len(got) == len(set(got)) == len(files)
    assert set(got) == orthanc_sops(o)


def test_move_destination_unknown_fails_at_once(tmp_path, loaded):
    o = loaded
    spec = make_spec(tmp_path, dimse_yaml(o, "c-move", move_destination="NOBODY", storage_port=free_port()),
                     [("patient_id", "phantom", "A")])
    study = find_studies(spec).studies[0]
    pool = pool_for(spec.pacs.dimse)
    before = pool.stats.requests
    with pytest.raises(PacsError, match=r"NOBODY.*0xA801.*DicomModalities") as err:
        retrieve_study(spec, study, tmp_path / "raw")
    assert not err.value.transient
    # one instance listing, one C-MOVE, one single-instance C-MOVE telling "unknown" from
    # another failure (Orthanc answers 0xC000, not 0xA801): no retry
    assert pool.stats.requests - before == 3


def test_unreachable_pacs_names_host_port_and_titles(tmp_path):
    port = free_port()
    spec = make_spec(tmp_path, f"  dimse:\n    ae_title: FARPACS\n    host: 127.0.0.1\n    port: {port}\n"
                     "    calling_ae_title: OURAE\n    timeout: 3\n", [("patient_id", "x", "A")])
    with pytest.raises(PacsError) as err:
        find_studies(spec)
    msg = str(err.value)
    for part in ("FARPACS", "127.0.0.1", str(port), "OURAE", "running"):
        assert part in msg
    assert err.value.transient


def test_one_association_at_most_under_two_concurrent_retrievals(tmp_path, loaded):
    o = loaded
    spec = make_spec(tmp_path, dimse_yaml(o, max_associations=1),
                     [("patient_id", "DEV", "A"), ("patient_id", "phantom", "B"), ("patient_id", "dicom", "C")])
    studies = find_studies(spec).studies
    close_pools()
    pool = pool_for(spec.pacs.dimse)
    results = retrieve_concurrently(spec, studies, tmp_path / "raw")
    assert all(r.status == "complete" for r in results) and len(results) == 4 + 1 + 1
    assert pool.stats.max_open == 1
    assert pool.stats.opened == 1  # reused, not one per request
    # one C-GET per study (3), not per series (6): a study wanted whole comes in one study-level
    # C-GET, its series routed as they arrive; nothing listed first, nothing asked again
    assert pool.stats.requests == 3


def test_rate_limiter_paces_instances(tmp_path, loaded):
    spec = make_spec(tmp_path, dimse_yaml(loaded), [("patient_id", "DEV", "A")])
    study = find_studies(spec).studies[0]
    t0 = time.monotonic()
    results = retrieve_study(spec, study, tmp_path / "raw", limiter=RateLimiter(per_minute=600))
    assert sum(r.received for r in results) == 8
    assert time.monotonic() - t0 >= 7 * 0.1


# -- what arrives is checked before it is kept ----------------------------------------------
def _sink(tmp_path, study="1.2.3", series="1.2.3.4"):
    folder = tmp_path / "raw" / "s" / "se"
    folder.mkdir(parents=True)
    return SeriesSink(SECRET.encode(), study, series, folder, tmp_path / "quarantine")


def test_corrupt_payload_is_quarantined(tmp_path, sample_dir):
    """The receiving end is tested directly: a real Orthanc cannot be made to send a payload
    that is not DICOM (it refuses to store one, and re-reads what it sends)."""
    src = next(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    ds = pydicom.dcmread(src)
    sink = _sink(tmp_path, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    junk = tmp_path / "junk.part"
    junk.write_bytes(b"this is not DICOM at all" * 10)
    assert sink(junk, str(ds.SOPClassUID), "1.2.826.0.1.99") == 0xC000
    truncated = tmp_path / "trunc.part"
    truncated.write_bytes(src.read_bytes()[:-5000])
    assert sink(truncated, str(ds.SOPClassUID), str(ds.SOPInstanceUID)) == 0xC000
    other = tmp_path / "other.part"
    other.write_bytes(next(iter_dicom_files(sample_dir / "dcm_qa_ge")).read_bytes())
    assert sink(other, None, None) == 0xC000
    good = tmp_path / "good.part"
    good.write_bytes(src.read_bytes())
    assert sink(good, str(ds.SOPClassUID), str(ds.SOPInstanceUID)) == 0
    assert len(sink.quarantined) == 3 and sink.stored == 1
    q = tmp_path / "quarantine"
    for name, reason in sink.quarantined:
        assert (q / name).is_file() and (q / f"{name}.reason.txt").read_text().strip() == reason
        assert "1.2.826.0.1.99" not in name and str(ds.SOPInstanceUID) not in name
        assert str(ds.SOPInstanceUID) not in reason
    assert "truncated" in sink.quarantined[1][1]
    assert not junk.exists() and not truncated.exists()


def test_quarantined_payload_makes_series_incomplete(tmp_path, orthanc_factory, sample_dir):
    """Orthanc serves a stored file whose content was swapped on disk (a damaged archive):
    the payload carries another instance's UIDs; it is quarantined, the series is reported
    incomplete, and the other series of the study still arrive."""
    o = orthanc_factory(dicomweb=False, extra={"MaximumStorageCacheSize": 0})
    files = list(iter_dicom_files(sample_dir / "dcm_qa_nih"))
    o.upload(files)
    spec = make_spec(tmp_path, dimse_yaml(o), [("patient_id", "DEV", "A")])
    spec = spec.model_copy(update={"retries": spec.retries.model_copy(update={"attempts": 1, "backoff_seconds": 0.1})})
    study = find_studies(spec).studies[0]
    victim = study.series[0]
    iid = next(i["ID"] for i in o.get("/instances?expand")
               if i["MainDicomTags"]["SOPInstanceUID"] and o.get(f"/instances/{i['ID']}/simplified-tags")["SeriesInstanceUID"]
               == victim.series_instance_uid)
    uuid = o.get(f"/instances/{iid}/attachments/dicom/info")["Uuid"]
    stored = next((o.workdir / "db").rglob(uuid))
    stored.write_bytes(next(iter_dicom_files(sample_dir / "dcm_qa_philips")).read_bytes())
    early: list = []  # series handed over as soon as complete, before the study is done
    results = retrieve_study(spec, study, tmp_path / "work" / "raw", on_complete=early.append)
    by = {r.series.series_instance_uid: r for r in results}
    bad = by[victim.series_instance_uid]
    assert bad.status == "incomplete" and bad.missing == 1 and bad.quarantined, bad.reason
    # each complete series handed over once (in the order its last instance arrived)
    assert sorted(r.series.series_instance_uid for r in early) == sorted(
        r.series.series_instance_uid for r in results if r.status == "complete")
    assert (tmp_path / "work" / "quarantine" / bad.quarantined[0][0]).is_file()
    assert all(r.status == "complete" for u, r in by.items() if u != victim.series_instance_uid)


def test_fallback_transport_retrieves_what_the_chosen_one_cannot(tmp_path, loaded):
    """C-MOVE to a destination the PACS does not know fails at once; with `fallback: dicomweb`
    the study still arrives whole, over WADO-RS, into the same keyed folders."""
    from pacs2bids.retrieve import retrieve_study

    o = loaded
    pacs_yaml = dimse_yaml(o, "c-move", move_destination="NOBODY", storage_port=free_port()) + web_yaml(o)
    spec = make_spec(tmp_path, pacs_yaml + "  fallback: dicomweb\n", [("patient_id", "phantom", "A")])
    study = find_studies(spec).studies[0]
    with pytest.raises(PacsError):
        alone = spec.model_copy(update={"pacs": spec.pacs.model_copy(update={"fallback": None})})
        retrieve_study(alone, study, tmp_path / "raw0")  # the chosen transport alone fails
    early: list = []
    got = retrieve_study(spec, study, tmp_path / "raw", on_complete=early.append)
    assert [rs.status for rs in got] == ["complete"] * len(study.series)
    assert sorted(rs.series.series_instance_uid for rs in early) == sorted(s.series_instance_uid for s in study.series)
    for rs in got:
        sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in iter_dicom_files(rs.folder)}
        assert len(sops) == rs.series.announced_instances == rs.received


def test_fallback_must_be_another_configured_transport(tmp_path, loaded):
    from pacs2bids.errors import SpecError

    with pytest.raises(SpecError, match="pacs.fallback is 'dicomweb' but pacs.dicomweb is not given"):
        make_spec(tmp_path, dimse_yaml(loaded) + "  fallback: dicomweb\n", [("patient_id", "phantom", "A")])


def test_sigkill_during_retrieval_then_rerun_fetches_only_what_is_missing(tmp_path, loaded, sample_files):
    """The retrieving process is killed (SIGKILL) part-way; a second run completes the study,
    leaves every file that had fully arrived untouched (same inode, same mtime) and holds no
    duplicate."""
    import os
    import signal
    import subprocess
    import sys

    o = loaded
    spec = make_spec(tmp_path, dimse_yaml(o, "c-get"), [("patient_id", "dicom", "A"),
                                                         ("patient_id", "DEV", "B")])
    raw = tmp_path / "raw"
    script = (
        "import sys, time\n"
        "from pacs2bids.config import load_spec\n"
        "from pacs2bids.query import find_studies\n"
        "from pacs2bids.retrieve import retrieve_study\nfrom pacs2bids.sink import RateLimiter\n"
        f"spec = load_spec({str(tmp_path / 'spec.yaml')!r}, environ={{'PACS2BIDS_PROJECT_SECRET': {SECRET!r}}})\n"
        "for study in find_studies(spec).studies:\n"
        f"    retrieve_study(spec, study, __import__('pathlib').Path({str(raw)!r}), limiter=RateLimiter(240))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [f for f in raw.rglob("*.dcm") if ".incoming" not in f.parts]
        if len(done) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in raw.rglob("*.dcm") if ".incoming" not in f.parts}
    assert before, "nothing had arrived before the kill"

    studies = find_studies(spec).studies
    announced = sum(s.announced_instances for st in studies for s in st.series)
    assert len(before) < announced, "the kill came too late to test a resume"
    results = [rs for st in studies for rs in retrieve_study(spec, st, raw)]
    assert all(rs.status == "complete" for rs in results)
    after = [f for f in raw.rglob("*.dcm") if ".incoming" not in f.parts]
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in after]
    assert len(sops) == len(set(sops)) == announced  # complete, no duplicate
    for f, stamp in before.items():
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == stamp, f"{f.name} was fetched again"


class NearLinePacs:
    """FAKE PACS, on purpose: a study on near-line storage (tape, cold archive) that answers
    C-ECHO and C-FIND at once but never answers a C-GET, a fault a real Orthanc cannot show.
    pynetdicom SCP on loopback; the stuck C-GET handler is released when the test stops it."""

    def __init__(self, study_uid: str, series_uid: str, sop_uid: str):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (MRImageStorage, PatientRootQueryRetrieveInformationModelFind,
                                          PatientRootQueryRetrieveInformationModelGet,
                                          StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet, Verification)

        self.release = threading.Event()
        self.get_requests = 0
        ae = AE(ae_title="NEARLINE")
        for ctx in (Verification, StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind,
                    StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet):
            ae.add_supported_context(ctx)
        ae.add_supported_context(MRImageStorage, scu_role=True, scp_role=True)

        def on_find(event):
            level = str(event.identifier.QueryRetrieveLevel)
            ds = pydicom.Dataset()
            ds.QueryRetrieveLevel = level
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID, ds.SOPClassUID = sop_uid, MRImageStorage
            ds.Modality, ds.SeriesNumber, ds.NumberOfSeriesRelatedInstances = "MR", 1, 1
            yield 0xFF00, ds

        def on_get(event):
            self.get_requests += 1
            self.release.wait(120)  # the archive is "fetching from tape"
            yield 0

        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)])
        self.port = self.server.server_address[1]

    def stop(self):
        self.release.set()
        self.server.shutdown()


def test_near_line_study_that_never_answers_times_out_and_is_reported(tmp_path):
    from pacs2bids.model import SeriesRef, StudyRef

    study_uid, series_uid, sop_uid = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
    pacs = NearLinePacs(study_uid, series_uid, sop_uid)
    try:
        spec = make_spec(tmp_path, f"  dimse:\n    ae_title: NEARLINE\n    host: 127.0.0.1\n    port: {pacs.port}\n"
                                   "    retrieve: c-get\n    timeout: 2\n", [("patient_id", "P", "01")])
        spec = spec.model_copy(update={"retries": spec.retries.model_copy(update={"attempts": 1, "backoff_seconds": 0.1})})
        study = StudyRef(1, "01", None, study_uid, series=[SeriesRef(study_uid, series_uid, "MR", 1, "", 1)])
        done: list = []
        worker = threading.Thread(target=lambda: done.append(retrieve_study(spec, study, tmp_path / "raw")), daemon=True)
        worker.start()
        worker.join(90)  # a hang would block the run forever: the timeout must end it
        assert not worker.is_alive(), "retrieval of a study that never answers did not time out"
        (rs,) = done[0]
        assert rs.status == "failed" and rs.received == 0 and rs.missing == 1
        assert "timeout" in rs.reason.lower() or "did not answer" in rs.reason.lower(), rs.reason
        assert pacs.get_requests == 2  # the first try and one retry, then it is reported, not retried forever
    finally:
        close_pools()
        pacs.stop()


def test_storage_scp_refuses_associations_beyond_its_bound(tmp_path, loaded):
    """Our C-MOVE storage SCP holds at most ``storage_max_associations`` associations at once:
    a real pynetdicom client is refused one more (A-ASSOCIATE-RJ, transient, local limit
    exceeded), also while Orthanc holds a slot to send a C-MOVE's instances, and that C-MOVE
    still completes."""
    from pynetdicom import AE, evt

    o = loaded
    spec = make_spec(tmp_path, dimse_yaml(o, "c-move", storage_port=o.move_port, storage_max_associations=2),
                     [("patient_id", "DEV", "A")])
    study = find_studies(spec).studies[0]
    client = AE(ae_title="INTRUDER")
    client.add_requested_context(ECHO)
    rejections: list[tuple] = []

    def on_acse(event):
        p = event.primitive
        if getattr(p, "result", None) in (0x01, 0x02):
            rejections.append((p.result, p.result_source, p.diagnostic))

    def associate():
        return client.associate("127.0.0.1", o.move_port, ae_title="PACS2BIDS",
                                evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])

    with storage_server(spec.pacs.dimse) as server:
        assert server.maximum_associations == 2
        held = [associate(), associate()]
        assert all(a.is_established for a in held)
        extra = associate()
        assert extra.is_rejected and not extra.is_established
        assert rejections[-1] == (0x02, 0x03, 0x02)  # transient, ACSE provider, local limit exceeded
        held.pop().release()

        # one slot left: Orthanc takes it for the C-MOVE; nobody else gets in meanwhile. Orthanc's
        # first association is held open (its accept handler waits) until the intruder has tried:
        # polling the count instead raced with Orthanc releasing a two-instance series.
        orthanc_in, intruder_done = threading.Event(), threading.Event()
        refused_during_move: list[bool] = []

        def hold_first_sender(event):
            if event.assoc.requestor.ae_title != "INTRUDER" and not orthanc_in.is_set():
                orthanc_in.set()
                intruder_done.wait(30)

        open_when_intruding: list[int] = []

        def intrude():
            try:
                if orthanc_in.wait(30):
                    open_when_intruding.append(len(server._server.active_associations))
                    a = associate()
                    refused_during_move.append(a.is_rejected)
                    if a.is_established:
                        a.release()
            finally:
                intruder_done.set()

        server._server.bind(evt.EVT_ACCEPTED, hold_first_sender)
        t = threading.Thread(target=intrude)
        t.start()
        results = retrieve_study(spec, study, tmp_path / "raw", limiter=RateLimiter(per_minute=240))
        t.join()
        server._server.unbind(evt.EVT_ACCEPTED, hold_first_sender)
        held.pop().release()
    assert open_when_intruding == [2]  # our held one and Orthanc's
    assert refused_during_move == [True]
    assert all(r.status == "complete" for r in results), [r.reason for r in results]
    assert sum(r.received for r in results) == sum(s.announced_instances for s in study.series) == 8


# -- private SOP classes (E1: never lose an image, whatever its class) -----------------------
PHILIPS_PRIVATE = "1.3.46.670589.11.0.0.12.4"  # Philips private MR series data storage


def private_class_copies(sample_dir: Path, n: int = 3) -> tuple[list[bytes], str]:
    """Copies of bundled Philips files turned into a series of a private SOP class (SOPClassUID
    and MediaStorageSOPClassUID), in the same study and patient. Returns (files, series UID)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import generate_uid

    series_uid = generate_uid(prefix="1.2.826.0.1.3680043.10.543.")
    out = []
    for src in sorted(iter_dicom_files(sample_dir / "dcm_qa_philips"))[:n]:
        ds = pydicom.dcmread(src)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PHILIPS_PRIVATE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.543.")
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 9901
        buf = DicomBytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out, series_uid


def assert_private_series_complete(results, raw: Path, o, series_uids: set[str]) -> None:
    by = {r.series.series_instance_uid: r for r in results}
    assert series_uids <= set(by)
    for uid in series_uids:
        r = by[uid]
        assert r.status == "complete" and r.missing == 0 and r.received == r.series.announced_instances, r.reason
    got = {str(d.SOPInstanceUID): str(d.SOPClassUID)
           for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in raw.rglob("*.dcm"))}
    held = {i["MainDicomTags"]["SOPInstanceUID"] for i in o.get("/instances?expand")}
    assert set(got) == held  # every instance of the study, none lost
    assert sum(1 for c in got.values() if not c.startswith("1.2.840.10008.")) >= len(series_uids)


@pytest.mark.parametrize("transport", ["c-get", "c-move"])
def test_private_sop_class_retrieved_whole(tmp_path, orthanc_factory, sample_dir, transport):
    """A series of a private SOP class arrives whole by C-GET (proposed with the SCP role, which
    Orthanc accepts without answering the role item) and by C-MOVE (our running storage SCP
    learns the classes the instance-level query announced), beside the standard series."""
    port = free_port()
    o = orthanc_factory(dicomweb=False, modalities={"PACS2BIDS": ("127.0.0.1", port)})
    private, series_uid = private_class_copies(sample_dir)
    assert o.upload(list(iter_dicom_files(sample_dir / "dcm_qa_philips")) + private) == 27 + len(private)
    spec = make_spec(tmp_path, dimse_yaml(o, transport, storage_port=port), [("patient_id", "phantom", "A")])
    spec = spec.model_copy(update={"retries": spec.retries.model_copy(update={"attempts": 0})})  # no second chance
    study = find_studies(spec).studies[0]
    results = retrieve_study(spec, study, tmp_path / "raw")
    assert_private_series_complete(results, tmp_path / "raw", o, {series_uid})


@pytest.mark.corpus
@pytest.mark.parametrize("transport", ["c-get", "c-move"])
def test_corpus_philips_private_objects_retrieved(tmp_path, orthanc_factory, corpus_dir, transport):
    """The corpus's Philips private objects (ExamCard, series data: private SOP classes)."""
    import gzip

    port = free_port()
    o = orthanc_factory(dicomweb=False, modalities={"PACS2BIDS": ("127.0.0.1", port)})
    files = [gzip.decompress(p.read_bytes()) for p in sorted((corpus_dir / "dcm_qa_philips_dwi").rglob("XX_*.gz"))]
    private = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(b), stop_before_pixels=True) for b in files]
    private = [d for d in private if not str(d.SOPClassUID).startswith("1.2.840.10008.")]
    assert len(private) >= 2
    assert o.upload(files) == len(files)
    spec = make_spec(tmp_path, dimse_yaml(o, transport, storage_port=port),
                     [("patient_id", str(private[0].PatientID), "A")])
    spec = spec.model_copy(update={"retries": spec.retries.model_copy(update={"attempts": 0})})
    results = [r for st in find_studies(spec).studies for r in retrieve_study(spec, st, tmp_path / "raw")]
    assert_private_series_complete(results, tmp_path / "raw", o, {str(d.SeriesInstanceUID) for d in private})


class CountingGate:
    """A gate of ``slots`` slots (the plain-Python stand-in for the PACS's Prefect limit) that
    records how many were held at once."""

    def __init__(self, slots: int):
        self._sem = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self.held = self.max_held = self.taken = 0

    def __call__(self):
        self._sem.acquire()
        with self._lock:
            self.held += 1
            self.taken += 1
            self.max_held = max(self.max_held, self.held)

        def release():
            with self._lock:
                self.held -= 1
            self._sem.release()

        return release


@pytest.mark.parametrize("transport", ["c-get", "wado-rs"])
def test_every_connection_holds_a_slot_of_the_pacs_gate(tmp_path, loaded, transport):
    """Three studies at once, a pool allowed 3 associations, a gate of 2 slots: never more than
    2 connections, every one through the gate, and idle ones give their slot back unasked."""
    o = loaded
    pacs = web_yaml(o) if transport == "wado-rs" else dimse_yaml(o, max_associations=3)
    spec = make_spec(tmp_path, pacs, [("patient_id", "DEV", "A"), ("patient_id", "phantom", "B"),
                                      ("patient_id", "dicom", "C")])
    close_pools()
    gate = CountingGate(2)
    limits.set_gate(spec.pacs, gate)
    try:
        studies = find_studies(spec).studies
        assert len(studies) == 3 and gate.taken >= 1
        # paced, so that each study holds its connection long enough for the others to want one
        results = retrieve_concurrently(spec, studies, tmp_path / "raw", limiter=lambda: RateLimiter(per_minute=600))
        assert all(r.status == "complete" for r in results) and len(results) == 6
        assert gate.max_held == 2
        if transport == "c-get":
            pool = pool_for(spec.pacs.dimse)
            assert pool.stats.max_open <= 3 and pool.stats.opened == gate.taken
        deadline = time.monotonic() + 3 * 5.0  # the reaper releases idle associations after 5 s
        while gate.held and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gate.held == 0
    finally:
        limits.set_gate(spec.pacs, None)


def test_dicomweb_requests_are_not_retried_below_the_stage(tmp_path):
    """A fake DICOMweb server on loopback that answers 503 to everything (a real Orthanc cannot
    be made busy on demand): with no stage retry, one search is one request. dicomweb-client
    would otherwise send it up to 5 times on its own (pacs2bids.pacs.retry)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pacs2bids.config import DicomwebSettings
    from pacs2bids.pacs.dicomweb import WebPacs

    seen: list[str] = []

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        web = WebPacs(DicomwebSettings(url=f"http://127.0.0.1:{server.server_address[1]}/dicom-web", timeout=10))
        with pytest.raises(PacsError, match="HTTP 503") as err:
            web.search("studies", {"PatientID": "X"}, ["StudyInstanceUID"])
        assert err.value.transient
        assert len(seen) == 1
    finally:
        server.shutdown()


def test_raw_names_use_the_derived_raw_name_key_not_the_secret(tmp_path, loaded):
    """Raw folder and file names are HMACs under the HKDF-derived raw-name key (keyed.py), never
    under the project secret itself."""
    from dataclasses import replace

    from pacs2bids.deid.keyed import raw_name_key
    from pacs2bids.sink import keyed_name

    spec = make_spec(tmp_path, dimse_yaml(loaded), [("patient_id", "phantom", "A")])
    study = find_studies(spec).studies[0]
    study = replace(study, series=study.series[:1])
    (rs,) = retrieve_study(spec, study, tmp_path / "raw")
    key = raw_name_key(SECRET.encode(), "TEST")
    assert rs.folder == tmp_path / "raw" / keyed_name(key, study.study_instance_uid) / keyed_name(
        key, study.series[0].series_instance_uid)
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in iter_dicom_files(rs.folder)}
    assert sorted(p.stem for p in rs.folder.glob("*.dcm")) == sorted(keyed_name(key, u) for u in sops)
    plain = keyed_name(SECRET.encode(), study.study_instance_uid)
    assert not (tmp_path / "raw" / plain).exists()


def test_retrieve_study_waits_for_the_window_and_paces_per_the_spec(tmp_path, loaded, monkeypatch):
    """retrieve_study does the whole job the Prefect task did: it waits for the PACS's retrieval
    window before any transfer and paces instances at instances_per_minute / max_associations."""
    from dataclasses import replace

    from pacs2bids import retrieve, sink

    spec = make_spec(tmp_path, dimse_yaml(loaded) + "  max_associations: 2\n  instances_per_minute: 6000\n"
                     "  windows: [{start: '00:00', end: '23:59'}]\n", [("patient_id", "phantom", "A")])
    study = find_studies(spec).studies[0]
    study = replace(study, series=study.series[:1])
    events: list = []
    monkeypatch.setattr(retrieve, "wait_until_open", lambda windows, **kw: events.append(("window", list(windows))))

    class Recording(sink.RateLimiter):
        def __init__(self, per_minute):
            events.append(("per_minute", per_minute))
            super().__init__(per_minute)

        def wait(self):
            events.append(("instance",))
            super().wait()

    monkeypatch.setattr(retrieve, "RateLimiter", Recording)
    (rs,) = retrieve_study(spec, study, tmp_path / "raw")
    assert rs.status == "complete"
    assert events[0] == ("per_minute", 3000.0)
    assert events[1] == ("window", spec.pacs.windows)
    assert events.count(("instance",)) == rs.received


def test_statuses_read_pynetdicom_tables_with_our_judgement_of_transience():
    """Meanings come from pynetdicom's per-service tables (a code the service's table lacks is
    read in the other Q/R tables); our judgement says which failures a retry may fix."""
    from pacs2bids.pacs.status import classify

    busy = classify(0xA700, "move")  # not in pynetdicom's C-MOVE table; in C-FIND's
    assert (busy.category, busy.meaning, busy.transient) == ("failure", "refused: out of resources", True)
    assert classify(0xA702, "move").meaning == "refused: out of resources, unable to perform sub-operations"
    assert classify(0xC123, "get").transient and classify(0xC123).meaning == "unable to process"
    unknown = classify(0xA801, "move")
    assert unknown.meaning == "refused: move destination unknown" and not unknown.transient
    assert not classify(0x0124, "find").transient and classify(0x0124).meaning == "refused: not authorised"
    assert classify(0xFE00, "find").category == "cancel" and "result limit" in classify(0xFE00).meaning
    assert classify(0xB000, "get").ok and classify(0xFF00, "find").category == "pending"
    assert classify(None).transient


def test_a_study_is_retrieved_over_dicomweb_in_one_slot_of_the_pacs_gate(tmp_path, loaded):
    """Every WADO-RS request of a study goes through one slot of the PACS's gate (the flow backs it
    with a Prefect global concurrency limit: each slot is a round trip to Prefect's API), as a
    study holds one association over DIMSE; before, each series' request took its own."""
    from pacs2bids.pacs import gate
    from pacs2bids.retrieve import retrieve_study

    spec = make_spec(tmp_path, web_yaml(loaded), [("patient_id", "DEV", "A")])
    study = find_studies(spec).studies[0]
    assert len(study.series) > 1
    taken, given_back = [], []
    gate.set_gate(spec.pacs, lambda: taken.append(1) or (lambda: given_back.append(1)))
    try:
        got = retrieve_study(spec, study, tmp_path / "raw")
    finally:
        gate.set_gate(spec.pacs, None)
    assert [rs.status for rs in got] == ["complete"] * len(study.series)
    assert len(taken) == len(given_back) == 1
