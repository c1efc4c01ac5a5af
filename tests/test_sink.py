"""The receiving end (:class:`pacs2bids.sink.SeriesSink`) at the speed of the transfer: each payload is
checked from its head and the header of its Pixel Data (found from the end), the checksum its writer
took is kept, and a series not yet on disk is fetched whole before any instance listing. Every
safety check of the sink still holds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless

from pacs2bids import rawhead
from pacs2bids import sink as sinkmod
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.pacs import close_pools
from pacs2bids.sink import LEDGER, SeriesSink

from test_retrieve import dimse_yaml, make_spec, web_yaml


def _sink(tmp_path: Path, ds, series: str = "se") -> SeriesSink:
    folder = tmp_path / "raw" / "s" / series
    folder.mkdir(parents=True)
    return SeriesSink(b"k" * 32, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), folder, tmp_path / "quarantine")


def _copy(tmp_path: Path, data: bytes, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture
def native(sample_dir) -> Path:
    return sorted(iter_dicom_files(sample_dir / "dcm_qa_philips"))[0]


def test_a_whole_native_image_is_checked_without_reading_it_whole(tmp_path, native, monkeypatch):
    """Its head and the header of its Pixel Data are enough: the whole-file read is not called."""
    ds = pydicom.dcmread(native)
    sink = _sink(tmp_path, ds)
    monkeypatch.setattr(sinkmod.pydicom, "dcmread", lambda *a, **k: pytest.fail("the whole file was read"))
    assert sink(_copy(tmp_path, native.read_bytes(), "a.part"), None, str(ds.SOPInstanceUID)) == 0
    assert sink.stored == 1 and not sink.quarantined


@pytest.mark.parametrize("cut", [1, 2, 5000, "half"])
def test_a_cut_native_image_is_still_quarantined(tmp_path, native, cut):
    data = native.read_bytes()
    ds = pydicom.dcmread(native)
    keep = len(data) // 2 if cut == "half" else len(data) - cut
    sink = _sink(tmp_path, ds)
    assert sink(_copy(tmp_path, data[:keep], "cut.part"), None, str(ds.SOPInstanceUID)) == 0xC000
    assert sink.stored == 0 and len(sink.quarantined) == 1
    assert "truncated" in sink.quarantined[0][1] or "not readable" in sink.quarantined[0][1]


def test_what_the_tail_cannot_vouch_for_is_read_whole(tmp_path, native):
    """Something after the Pixel Data (trailing padding), or encapsulated pixels: the whole check
    decides, and a cut encapsulated image is quarantined as before."""
    ds = pydicom.dcmread(native)
    padded = _copy(tmp_path, native.read_bytes() + b"\xfc\xff\xfc\xff" + b"OB\x00\x00" + (4).to_bytes(4, "little")
                   + b"\x00" * 4, "padded.part")
    rle = pydicom.dcmread(native)
    rle.compress(RLELossless)
    rle.save_as(tmp_path / "rle.dcm")
    data = (tmp_path / "rle.dcm").read_bytes()
    sink = _sink(tmp_path, ds)
    assert sink(padded, None, str(ds.SOPInstanceUID)) == 0
    assert sink(_copy(tmp_path, data[:-20], "rle-cut.part"), None, str(rle.SOPInstanceUID)) == 0xC000
    assert len(sink.quarantined) == 1 and sink.stored == 1  # the padded one stored, the cut one not
    whole = _sink(tmp_path, ds, "other")
    assert whole(_copy(tmp_path, data, "rle.part"), None, str(rle.SOPInstanceUID)) == 0 and whole.stored == 1


def test_the_writers_checksum_is_kept_and_the_file_not_read_for_it(tmp_path, native, monkeypatch):
    ds = pydicom.dcmread(native)
    data = native.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    sink = _sink(tmp_path, ds)
    monkeypatch.setattr(sinkmod, "sha256_file", lambda p: pytest.fail("the file was read for its checksum"))
    assert sink(_copy(tmp_path, data, "a.part"), sha256=digest, size=len(data)) == 0
    sink.save()
    ledger = json.loads((sink.folder / LEDGER).read_text())["instances"]
    assert [(e["sha256"], e["size"]) for e in ledger.values()] == [(digest, len(data))]


def test_the_ledger_is_written_again_only_when_it_changed(tmp_path, native):
    """A series' ledger is saved after each attempt and each look at the folder: a save with
    nothing new writes nothing (no JSON of thousands of entries dumped again for nothing)."""
    ds = pydicom.dcmread(native)
    data = native.read_bytes()
    sink = _sink(tmp_path, ds)
    sink.save()
    ledger = sink.folder / LEDGER
    first = ledger.stat().st_ino
    sink.load(None)
    sink.save()
    assert ledger.stat().st_ino == first  # not replaced
    assert sink(_copy(tmp_path, data, "a.part"), None, str(ds.SOPInstanceUID)) == 0
    sink.save()
    assert ledger.stat().st_ino != first and len(json.loads(ledger.read_text())["instances"]) == 1
    ledger.unlink()  # whatever removed it, the next save writes it again
    sink.save()
    assert len(json.loads(ledger.read_text())["instances"]) == 1


def test_an_ordinary_head_is_walked_without_pydicom_and_in_memory(tmp_path, native, monkeypatch):
    """The head's UIDs come from its element headers, from the bytes its writer kept: pydicom's
    parser is not called and the file is not opened for them (issue 12: CPU per instance)."""
    ds = pydicom.dcmread(native)
    data = native.read_bytes()
    sink = _sink(tmp_path, ds)
    monkeypatch.setattr(sinkmod, "read_partial", lambda *a, **k: pytest.fail("pydicom parsed the head"))
    monkeypatch.setattr(sinkmod.pydicom, "dcmread", lambda *a, **k: pytest.fail("the whole file was read"))
    assert sink(_copy(tmp_path, data, "a.part"), None, str(ds.SOPInstanceUID), head=data[:1 << 16]) == 0
    assert sink.stored == 1 and not sink.quarantined


def _walk_or_pydicom(path: Path):
    """(uids, where the head ends, transfer syntax) from the walk, or None when it cannot decide;
    and the same from pydicom's reading of the head."""
    head, stopped, _size = sinkmod._read_head(path)
    ours = (str(head.SOPInstanceUID), str(head.StudyInstanceUID), str(head.SeriesInstanceUID), stopped,
            str(head.file_meta.TransferSyntaxUID))
    try:
        syntax, found, at = rawhead.walk_head(path.read_bytes()[:1 << 16])
    except rawhead.Undecided:
        return None, ours
    return (found[0x00080018], found[0x0020000D], found[0x0020000E], at, str(syntax)), ours


def test_the_walk_agrees_with_pydicom_on_every_real_file(corpus_dir, vendors_dir, sample_dir, tmp_path):
    """Every file of the corpus, of every vendor export and of the sample: the walk finds the
    same UIDs and the same end of head as pydicom's read, or leaves the file to pydicom."""
    walked = undecided = 0
    for root in (corpus_dir, vendors_dir, sample_dir):
        for f in iter_dicom_files(root):
            try:
                walk, reference = _walk_or_pydicom(f)
            except (AttributeError, KeyError):  # no UID for pydicom either: the sink quarantines it
                continue
            if walk is None:
                undecided += 1
                continue
            walked += 1
            assert walk == reference, f
    assert walked > 1000 and undecided < walked // 100


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_the_walk_steps_over_sequences_of_undefined_length(tmp_path, native, syntax):
    """Implicit and explicit VR, a sequence of undefined length with an item of undefined length
    holding a nested sequence, before the UIDs: the walk finds them where pydicom does."""
    ds = pydicom.dcmread(native)
    inner = pydicom.Dataset()
    inner.CodeValue = "X"
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.PurposeOfReferenceCodeSequence = [inner]
    ds.ReferencedImageSequence = [item, item]
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "seq.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax.endswith(".2"), little_endian=True)
    raw = path.read_bytes()
    assert b"\xfe\xff\xdd\xe0" in raw  # written with undefined lengths
    walk, reference = _walk_or_pydicom(path)
    assert walk == reference


@pytest.mark.parametrize("transport", ["c-get", "wado-rs"])
def test_a_fresh_series_is_not_listed_and_a_resumed_one_is(tmp_path, orthanc_factory, sample_dir, transport,
                                                            monkeypatch):
    """One request per fresh series (the fetch); the instance listing only where something is on disk
    already. Either way the ledger holds the SHA-256 of every file on disk."""
    from pacs2bids.pacs import transport as transports
    from pacs2bids.query import find_studies
    from pacs2bids.retrieve import retrieve_study

    o = orthanc_factory()
    o.upload(list(iter_dicom_files(sample_dir / "dcm_qa_nih")))
    spec = make_spec(tmp_path, dimse_yaml(o) if transport == "c-get" else web_yaml(o), [("patient_id", "DEV", "A")])
    study = find_studies(spec).studies[0]
    listed: list[str] = []
    for cls in (transports.DimseTransport, transports.WebTransport):
        real = cls.list_instances
        monkeypatch.setattr(cls, "list_instances",
                            lambda self, st, se, real=real: listed.append(se) or real(self, st, se))
    raw = tmp_path / "raw"
    try:
        first = retrieve_study(spec, study, raw)
        assert [r.status for r in first] == ["complete"] * len(study.series) and listed == []
        victim = next(iter(sorted(first[0].folder.glob("*.dcm"))))
        victim.unlink()
        again = retrieve_study(spec, study, raw)
    finally:
        close_pools()
    assert [r.status for r in again] == ["complete"] * len(study.series)
    assert sorted(listed) == sorted(s.series_instance_uid for s in study.series)  # on disk: listed, as before
    assert victim.is_file()
    for r in again:
        ledger = json.loads((r.folder / LEDGER).read_text())["instances"]
        files = {p.stem: p for p in r.folder.glob("*.dcm")}
        assert set(ledger) == set(files)
        for name, entry in ledger.items():
            data = files[name].read_bytes()
            assert (entry["sha256"], entry["size"], entry["transport"]) == (
                hashlib.sha256(data).hexdigest(), len(data), transport)


def test_a_later_look_at_the_folder_checks_only_what_the_sink_did_not_write(tmp_path, native, monkeypatch):
    """After its first look (ledger read, every file's size checked), a sink trusts the files it wrote
    or checked itself: a series looked at again after its retrieval costs no stat per file. What was
    removed or added since is still seen."""
    data = native.read_bytes()
    ds = pydicom.dcmread(native)
    sink = _sink(tmp_path, ds)
    assert sink.load(None) == set()
    other = pydicom.dcmread(native)
    other.SOPInstanceUID = ds.SOPInstanceUID + ".2"
    other.save_as(tmp_path / "other.dcm")
    for i, (raw, uid) in enumerate([(data, ds.SOPInstanceUID), ((tmp_path / "other.dcm").read_bytes(),
                                                                  other.SOPInstanceUID)]):
        assert sink(_copy(tmp_path, raw, f"{i}.part"), None, str(uid)) == 0
    sink.save()
    stats = []
    real_stat = sinkmod.os.stat
    monkeypatch.setattr(sinkmod.os, "stat", lambda p, *a, **k: (str(p).endswith(".dcm") and stats.append(p))
                        or real_stat(p, *a, **k))
    names = sink.load(None)
    assert len(names) == 2 and stats == []  # its own files: no stat
    first, second = sorted(sink.folder.glob("*.dcm"))
    second.unlink()  # whatever removed it
    (sink.folder / f"{'f' * 32}.dcm").write_bytes(data)  # a file it never saw: checked, hashed
    again = sink.load(None)
    assert again == {first.stem, "f" * 32} and len(stats) == 1
    assert sink.ledger["f" * 32] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "transport": None}
    fresh = SeriesSink(b"k" * 32, sink.study_uid, sink.series_uid, sink.folder, tmp_path / "quarantine")
    first.write_bytes(data[:-1])  # a new sink (a resumed run) checks every file against the ledger again
    assert fresh.load(None) == {"f" * 32}
