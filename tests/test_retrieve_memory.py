"""WADO-RS parts checked from the bytes their reader held (issue 12: the receive path at the
transport's speed): the sink walks the head and finds the Pixel Data's header in memory, without
opening the file, and its verdicts are those of the check on the file, for whole and cut payloads."""

from __future__ import annotations

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


def test_a_held_image_is_checked_without_opening_its_file(tmp_path, sample_dir, monkeypatch):
    native = sorted(iter_dicom_files(sample_dir / "dcm_qa_philips"))[0]
    data = native.read_bytes()
    ds = pydicom.dcmread(native)
    folder = tmp_path / "raw"
    folder.mkdir()
    sink = SeriesSink(b"k" * 32, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), folder, tmp_path / "q")
    part = tmp_path / "a.part"
    part.write_bytes(data)

    def no_open(*_a, **_k):
        pytest.fail("the file was opened")

    monkeypatch.setattr(sinkmod, "open", no_open, raising=False)
    monkeypatch.setattr(sinkmod.mmap, "mmap", no_open)
    assert sink(part, None, str(ds.SOPInstanceUID), sha256="0" * 64, size=len(data), data=data) == 0
    assert sink.stored == 1 and not sink.quarantined and not part.exists()


@pytest.mark.parametrize("cut", [1, 2, 8, 5000, "half", "head"])
def test_a_cut_held_image_is_quarantined_as_from_its_file(tmp_path, sample_dir, cut):
    native = sorted(iter_dicom_files(sample_dir / "dcm_qa_philips"))[0]
    data = native.read_bytes()
    ds = pydicom.dcmread(native)
    keep = {"half": len(data) // 2, "head": 300}.get(cut, len(data) - cut if isinstance(cut, int) else 0)
    folder = tmp_path / "raw"
    folder.mkdir()
    sink = SeriesSink(b"k" * 32, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), folder, tmp_path / "q")
    part = tmp_path / "cut.part"
    part.write_bytes(data[:keep])
    assert sink(part, None, str(ds.SOPInstanceUID), data=data[:keep]) == 0xC000
    assert sink.stored == 0 and len(sink.quarantined) == 1
    assert "truncated" in sink.quarantined[0][1] or "not readable" in sink.quarantined[0][1]
    kept = [p for p in (tmp_path / "q").iterdir() if p.suffix == ".dcm"]
    assert [p.read_bytes() for p in kept] == [data[:keep]]  # quarantined as received


def test_held_bytes_and_the_file_give_the_same_verdicts(tmp_path, sample_dir):
    """Every file of the sample, whole and cut in three places: the check from memory and the
    check from the file agree (UIDs, or the kind of refusal)."""
    files = sorted(iter_dicom_files(sample_dir))
    assert len(files) > 100
    part = tmp_path / "p.part"
    for src in files:
        data = src.read_bytes()
        for keep in (len(data), len(data) - 1, len(data) - 7, len(data) // 2):
            part.write_bytes(data[:keep])
            assert _verdict(part, data[:keep]) == _verdict(part, None), f"{src.name} cut to {keep}"
