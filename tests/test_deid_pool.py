"""Pseudonymisation in worker processes (issue 12): batches of a series' files in a process pool
give the same bytes, names, records, quarantine and key store as one process, on a real series
with planted identifiers; a worker's warnings reach the run's log."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser, scan_for_leaks
from pacs2bids.deid import series as deid_series
from pacs2bids.deid.keyed import shift_da
from pacs2bids.deid.pool import ENV, worker_count

SECRET = b"pool-test-secret-0123456789"
NAME = "Vandermeulen^Hortense"
PLANTED = [NAME, "PID77812034", "Ferrand^Basile", "RP99120457", "Clinique Saint-Aubert"]
EARLIER_VISIT = "20180302"  # known before the series (the query's study date, say), in no file's elements


def _plant(ds: Dataset, i: int) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, "PID77812034", "19710203"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20190412"
    ds.InstitutionName = "Clinique Saint-Aubert"
    item = Dataset()
    item.RequestedProcedureID = "RP99120457"
    item.RequestingPhysician = "Ferrand^Basile"
    inner = Dataset()
    inner.PatientName = NAME  # a name two sequences deep
    item.ReferencedPatientSequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([item])
    blk = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    blk.add_new(0x9C, "LO", f"Vandermeulen Hortense {i}")  # a private tag, not on a keep list
    ds.ProtocolName = f"slice {i} of VANDERMEULEN, exam 2019-04-12, prior 02/03/2018"
    if i == 5:  # acquired past midnight: a date of this file only...
        ds.AcquisitionDate = ds.ContentDate = "20190413"
    if i == 7:  # ... that another file quotes (shifted or not, the same whatever the batches)
        ds.ProtocolName = "slice 7, acquired 2019-04-13"
    if i in (2, 9):  # the same SOP Instance UID in two batches
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4242"
    if i in (3, 4):  # and twice in one batch
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4343"


def _corrupt_sequence(path: Path) -> None:
    """Replace the value of the file's Request Attributes Sequence (explicit VR, defined length)
    by 4 bytes that are no item: pydicom reads past it, and fails only when its value is read."""
    data = path.read_bytes()
    at = data.index(b"\x40\x00\x75\x02SQ\x00\x00")
    length = int.from_bytes(data[at + 8:at + 12], "little")
    path.write_bytes(data[:at + 8] + (4).to_bytes(4, "little") + b"\x01\x02\x03\x04" + data[at + 12 + length:])


@pytest.fixture
def series(sample_dir, tmp_path) -> Path:
    """A real GE series (13 files) with identifiers planted in every file, one truncated file and
    one whose sequence cannot be decoded."""
    src = sample_dir / "dcm_qa_ge" / "In" / "01_Ax_DWI_TENSOR_R2"
    folder = tmp_path / "raw"
    folder.mkdir()
    files = sorted(p for p in src.iterdir() if p.is_file())[:13]
    assert len(files) == 13
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        _plant(ds, i)
        ds.save_as(folder / f"{i:03d}.dcm")
    _corrupt_sequence(folder / "011.dcm")
    (folder / "012.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 10)  # cut after its magic
    return folder


def _run(series: Path, base: Path, workers: int):
    p = Pseudonymiser("pool", SECRET, PseudonymizationSettings(workers=workers), base / "keys")
    known = p.known("01", ["20190412", EARLIER_VISIT])
    res = p.pseudonymise_series(sorted(series.iterdir()), base / "out" / "001-series", subject="01", session="a",
                                quarantine_dir=base / "quarantine", known=known)
    return p, res


def test_worker_count(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert worker_count() == 3 and worker_count(1) == 1  # the spec's setting wins
    monkeypatch.delenv(ENV)
    assert worker_count() == (os.cpu_count() or 1)
    monkeypatch.setenv(ENV, "two")
    with pytest.raises(ValueError, match=ENV):
        worker_count()
    with pytest.raises(ValueError, match="workers"):
        PseudonymizationSettings(workers=0)


def test_two_workers_give_the_same_outputs_as_one(series, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="pacs2bids.deid.series")
    monkeypatch.setattr(deid_series, "batch_size", lambda files, workers: 100 if workers == 1 else 3)
    p1, one = _run(series, tmp_path / "w1", 1)  # one batch, in this process
    from_parent = [r for r in caplog.records if "could not be pseudonymised" in r.getMessage()]
    caplog.clear()
    p2, two = _run(series, tmp_path / "w2", 2)  # five batches, in two processes
    # the same files, byte for byte, under the same names, in the same order
    assert len(one.written) == 11
    assert [p.name for p in one.written] == [p.name for p in two.written]
    for a, b in zip(one.written, two.written):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert sorted(p.name for p in (tmp_path / "w2" / "out" / "001-series").iterdir()) == sorted(
        p.name for p in two.written)  # no temporary name left
    # duplicate SOP Instance UIDs named in file order, across batches and within one
    names = [p.name for p in two.written]
    dup = [n for n in names if n.endswith("-1.dcm")]
    assert len(dup) == 2 and all(n.replace("-1.dcm", ".dcm") in names for n in dup)
    assert names.index(dup[0].replace("-1.dcm", ".dcm")) < names.index(dup[0])
    assert one.sources == two.sources and one.dropped == two.dropped
    assert one.record == two.record and one.quarantined == two.quarantined
    assert (one.pseudo_study_uid, one.pseudo_series_uid, one.series_number, one.series_description, one.modality) == (
        two.pseudo_study_uid, two.pseudo_series_uid, two.series_number, two.series_description, two.modality)
    # the key store learned the same
    assert p1.identifiers() == p2.identifiers() and set(PLANTED) <= p2.identifiers()
    assert p1.key_store.subjects() == p2.key_store.subjects() == ["01"]
    assert p1.key_store.study_dates("01") == p2.key_store.study_dates("01") == {"20190412"}
    # nothing identifying left; the dates quoted in text shifted, the one known before the series too
    assert scan_for_leaks(tmp_path / "w2" / "out", PLANTED) == []
    text = pydicom.dcmread(two.written[0]).ProtocolName
    days = p2.keyed.day_offset("01")
    shifted = shift_da("20190412", days)
    earlier = shift_da(EARLIER_VISIT, days)
    assert text == (f"slice 0 of , exam {shifted[:4]}-{shifted[4:6]}-{shifted[6:]}, "
                    f"prior {earlier[6:]}/{earlier[4:6]}/{earlier[:4]}"), text
    # the unreadable file and the one that failed reached the quarantine from a worker, with their reasons
    whys = sorted(why for _, why in two.quarantined)
    assert whys[0] == "pseudonymisation failed (OSError)" and whys[1].startswith("unreadable DICOM ("), whys
    q = tmp_path / "w2" / "quarantine"
    for qid, why in two.quarantined:
        assert why in (q / f"{qid}.json").read_text()
    (truncated,) = [qid for qid, why in two.quarantined if why.startswith("unreadable")]
    assert (q / f"{truncated}.dcm").read_bytes() == (series / "012.dcm").read_bytes()
    # the worker's warning reached this process's logger, as the in-process one did
    from_worker = [r for r in caplog.records if "could not be pseudonymised" in r.getMessage()]
    assert [r.getMessage() for r in from_worker] == [r.getMessage() for r in from_parent] == [
        "file 12 of the series could not be pseudonymised: OSError"]
    assert from_worker[0].process != os.getpid() and from_parent[0].process == os.getpid()
    assert from_worker[0].name == "pacs2bids.deid.series" and from_worker[0].levelno == logging.WARNING


def test_a_study_pseudonymises_each_series_while_the_next_is_retrieved(orthanc_factory, sample_dir, tmp_path,
                                                                      monkeypatch):
    """Real Orthanc, real C-GET: each time retrieval hands a complete series over, the retrieving
    thread waits until that series is pseudonymised in staging; it could not if pseudonymisation
    started only after the study's retrieval."""
    from pacs2bids import retrieve
    from pacs2bids.config import load_spec
    from pacs2bids.pacs import close_pools
    from pacs2bids.publish import staging_dir
    from pacs2bids.query import find_studies
    from pacs2bids.run import RunContext, session_dir
    from pacs2bids.study import extract_study

    pacs = orthanc_factory()
    assert pacs.upload(sorted((sample_dir / "dcm_qa_nih").rglob("*.dcm"))) == 8
    (tmp_path / "inclusions.csv").write_text("patient_id,subject\nDEV,01\n")
    (tmp_path / "spec.yaml").write_text(
        "project: overlap\n"
        f"pacs:\n  dimse: {{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.dicom_port}, retrieve: c-get}}\n"
        "selection: {inclusions: inclusions.csv}\noutput: out\n")
    spec = load_spec(tmp_path / "spec.yaml", environ={"PACS2BIDS_PROJECT_SECRET": "o" * 32})
    (study,) = find_studies(spec).studies
    assert len(study.series) == 4
    ctx = RunContext(spec, "overlap-run", None, staging_dir(spec.output, spec.resolved_work_dir, "overlap-run"))
    src = session_dir(ctx.staging / "sourcedata", study.subject, study.session)
    real, seen = retrieve.retrieve_study, []

    def waiting(spec, study, raw_root, *, on_complete=None, **kw):
        def handed(rs):
            on_complete(rs)
            out = src / f"{rs.series.series_number:03d}-{rs.folder.name[:12]}"
            deadline = time.monotonic() + 30
            while len(list(out.glob("*.dcm"))) < rs.received and time.monotonic() < deadline:
                time.sleep(0.05)
            seen.append(len(list(out.glob("*.dcm"))))
        return real(spec, study, raw_root, on_complete=handed, **kw)

    monkeypatch.setattr(retrieve, "retrieve_study", waiting)
    try:
        result = extract_study(spec, study, ctx)
    finally:
        close_pools()
    assert seen == [2, 2, 2, 2]  # each series pseudonymised before the next one was retrieved
    assert len(result.raw_done) == 4 and result.instances_part
    assert len(list((ctx.staging / ".pacs2bids" / "deid" / result.label).glob("series-*.json"))) == 4
    assert len(result.conversion.series) == 4 and not result.retrieval.study_failures


def test_a_dead_worker_fails_its_batch_and_the_next_call_gets_a_new_pool():
    from concurrent.futures.process import BrokenProcessPool

    from pacs2bids.deid.pool import map_ordered

    with pytest.raises(BrokenProcessPool):
        list(map_ordered(os._exit, [(3,), (3,)], 2))  # the worker process exits mid-batch
    assert list(map_ordered(pow, [(2, 3), (3, 2)], 2)) == [8, 9]


def test_a_later_series_quoting_an_earlier_study_date_is_shifted_across_pseudonymisers(sample_dir, tmp_path):
    """The flow makes one Pseudonymiser per series: a study date the key store recorded for the
    subject (an earlier visit) is known before the next series, and shifted where its text quotes it."""
    files = sorted((sample_dir / "dcm_qa_nih").rglob("*.dcm"))[:2]
    first, second = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    for elem in second.iterall():  # the second visit's own dates are all another day
        if elem.VR == "DA" and elem.value:
            elem.value = "20190301"
        elif elem.VR == "DT" and elem.value:
            elem.value = "20190301" + str(elem.value)[8:]
    first_date = first.StudyDate
    assert first_date != "20190301"
    second.SeriesDescription = f"T1 suivi, comparer au {first_date}"
    for name, ds in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        ds.save_as(tmp_path / name / "1.dcm")
    outs = []
    for name in ("a", "b"):
        p = Pseudonymiser("dates", SECRET, PseudonymizationSettings(workers=1), tmp_path / "keys")  # one per series
        res = p.pseudonymise_series([tmp_path / name / "1.dcm"], tmp_path / f"o{name}", subject="01", session=name,
                                    quarantine_dir=tmp_path / "q")
        outs.append(pydicom.dcmread(res.written[0]))
    assert outs[1].SeriesDescription == f"T1 suivi, comparer au {outs[0].StudyDate}" != second.SeriesDescription
