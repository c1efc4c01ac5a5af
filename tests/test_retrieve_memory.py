"""WADO-RS parts checked from the bytes their reader held (issue 12: the receive path at the
transport's speed): the sink walks the head and finds the Pixel Data's header in memory, and its
verdicts are those of the check on the file, for whole and cut payloads. A part held in memory
has no file until the sink writes it, once, in its series folder (or in the quarantine)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest

from pacs2bids import sink as sinkmod
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.sink import SeriesSink


def _verdict(path: Path, data: bytes | None):
    try:
        return sinkmod.check_payload(path, None, data)
    except Exception as exc:  # the kind of refusal is what must agree, not its wording
        return type(exc).__name__


def _image_and_sink(tmp_path: Path, sample_dir: Path, **kwargs):
    """A real native image (its bytes, its data set) and a sink for its series in ``tmp_path/raw``."""
    native = sorted(iter_dicom_files(sample_dir / "dcm_qa_philips"))[0]
    data = native.read_bytes()
    ds = pydicom.dcmread(native)
    folder = tmp_path / "raw"
    folder.mkdir()
    sink = SeriesSink(b"k" * 32, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), folder, tmp_path / "q", **kwargs)
    return data, ds, folder, sink


def test_a_held_image_is_checked_without_opening_its_file(tmp_path, sample_dir, monkeypatch):
    data, ds, folder, sink = _image_and_sink(tmp_path, sample_dir)
    part = tmp_path / "a.part"
    part.write_bytes(data)

    def no_open(*_a, **_k):
        pytest.fail("the file was opened")

    monkeypatch.setattr(sinkmod, "open", no_open, raising=False)
    monkeypatch.setattr(sinkmod.mmap, "mmap", no_open)
    assert sink(part, None, str(ds.SOPInstanceUID), sha256="0" * 64, size=len(data), data=data) == 0
    assert sink.stored == 1 and not sink.quarantined and not part.exists()


def test_a_held_part_without_a_file_is_written_once_in_its_series_folder(tmp_path, sample_dir, monkeypatch):
    """The reader made no file for it: the sink checks the bytes, writes them under a temporary
    name in the series folder and renames it there (not from another folder), hashes them, and
    records that hash and size. Nothing else is left in the folder; a second arrival is a duplicate."""
    data, ds, folder, sink = _image_and_sink(tmp_path, sample_dir, transport="wado-rs")
    renames = []
    real_replace = sinkmod.os.replace
    monkeypatch.setattr(sinkmod.os, "replace", lambda a, b: (renames.append((Path(a).parent, Path(b).parent)),
                                                             real_replace(a, b))[1])
    assert sink(None, None, str(ds.SOPInstanceUID), size=len(data), data=data) == 0
    name = sinkmod.keyed_name(b"k" * 32, str(ds.SOPInstanceUID))
    assert [p.name for p in folder.iterdir()] == [f"{name}.dcm"] and (folder / f"{name}.dcm").read_bytes() == data
    assert renames == [(folder, folder)]
    assert sink.ledger == {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "transport": "wado-rs"}}
    assert sink(None, None, str(ds.SOPInstanceUID), size=len(data), data=data) == 0 and sink.duplicates == 1
    assert sink.stored == 1 and sorted(p.name for p in folder.iterdir()) == [f"{name}.dcm"]
    sink.save()
    (folder / f".{name}.dcm.1-7.part").write_bytes(data[:100])  # what a run killed mid-write leaves
    assert sink.load(None) == {name} and not list(folder.glob("*.part"))


def test_a_failed_write_leaves_no_file(tmp_path, sample_dir, monkeypatch):
    data, ds, folder, sink = _image_and_sink(tmp_path, sample_dir)

    def full(fd, view):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinkmod.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        sink(None, None, str(ds.SOPInstanceUID), data=data)
    assert not list(folder.iterdir()) and sink.stored == 0 and not sink.ledger


@pytest.mark.parametrize("cut", [1, 2, 8, 5000, "half", "head"])
def test_a_cut_held_image_is_quarantined_as_from_its_file(tmp_path, sample_dir, cut):
    native = sorted(iter_dicom_files(sample_dir / "dcm_qa_philips"))[0]
    data = native.read_bytes()
    ds = pydicom.dcmread(native)
    keep = {"half": len(data) // 2, "head": 300}.get(cut, len(data) - cut if isinstance(cut, int) else 0)
    folder = tmp_path / "raw"
    folder.mkdir()
    sink = SeriesSink(b"k" * 32, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), folder, tmp_path / "q")
    assert sink(None, None, str(ds.SOPInstanceUID), data=data[:keep]) == 0xC000  # no file: only its bytes
    assert sink.stored == 0 and len(sink.quarantined) == 1
    assert "truncated" in sink.quarantined[0][1] or "not readable" in sink.quarantined[0][1]
    kept = [p for p in (tmp_path / "q").iterdir() if p.suffix == ".dcm"]
    assert [p.read_bytes() for p in kept] == [data[:keep]]  # quarantined as received


def test_held_bytes_and_the_file_give_the_same_verdicts(tmp_path, sample_dir):
    """Every file of the sample, whole and cut in three places: the check from memory (with its
    file, or with no file at all: pydicom then reads the bytes when it must decide) and the check
    from the file agree (UIDs, or the kind of refusal)."""
    files = sorted(iter_dicom_files(sample_dir))
    assert len(files) > 100
    part = tmp_path / "p.part"
    for src in files:
        data = src.read_bytes()
        for keep in (len(data), len(data) - 1, len(data) - 7, len(data) // 2):
            part.write_bytes(data[:keep])
            want = _verdict(part, None)
            assert _verdict(part, data[:keep]) == want, f"{src.name} cut to {keep}"
            assert _verdict(None, data[:keep]) == want, f"{src.name} cut to {keep}, no file"
