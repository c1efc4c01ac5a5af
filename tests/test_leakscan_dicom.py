"""Where a hit lies in a DICOM file, told from its element headers (pacs2bids.deid.dicomtext, session 15):
the walk finds the elements pydicom reads, on real files of every layout; a string in the pixel samples
only is no leak; identities planted after the pixels, in private blocks and in nested sequences are still
found; a common string outside any identity element no longer has pydicom read the file."""

from __future__ import annotations

import gzip
import io
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs2bids.deid import leakscan, scan_for_leaks
from pacs2bids.deid.dicomtext import elements


def _leaves(ds: Dataset, out: Counter, top: bool) -> None:
    """(tag, raw value bytes) of every element pydicom reads, sequences walked into, pixels and the file
    meta (decoded as read) left out."""
    for tag in list(ds.keys()):
        if tag.group == 2 or (top and tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)):
            continue
        raw = ds.get_item(tag)
        if raw.VR == "SQ" or isinstance(ds[tag].value, Sequence):
            for item in ds[tag].value or ():
                _leaves(item, out, False)
            continue
        if isinstance(raw, RawDataElement):  # (a few are decoded as read: PixelRepresentation...)
            out[(int(tag), bytes(raw.value or b""))] += 1
        else:
            out[(int(tag), None)] += 1


def _pydicom_leaves(buf: bytes) -> Counter:
    out: Counter = Counter()
    _leaves(pydicom.dcmread(io.BytesIO(buf), force=True), out, True)
    return out


def _files(sample_dir: Path, corpus_dir: Path, vendors_dir: Path) -> list[Path]:
    files = sorted((sample_dir / "PACSMAN_data" / "dicomseries").glob("*.dcm"))[:3]
    for root in (corpus_dir, vendors_dir):
        folders: dict[Path, list[Path]] = {}
        for p in sorted(root.rglob("*")):
            if p.is_file() and (p.suffix in (".dcm", ".gz", "") or p.name.endswith(".dcm.gz")) and "Ref" not in p.parts:
                folders.setdefault(p.parent, []).append(p)
        files += [ps[0] for ps in folders.values()]
    return files


def test_the_walk_finds_the_elements_pydicom_reads(sample_dir, corpus_dir, vendors_dir):
    walked = 0
    for path in _files(sample_dir, corpus_dir, vendors_dir):
        buf = path.read_bytes()
        if path.name.endswith(".gz"):
            buf = gzip.decompress(buf)
        if buf[128:132] != b"DICM":
            continue
        found = elements(buf)
        if found is None:
            continue  # undecided: the whole file is read by pydicom, as before
        walked += 1
        theirs = _pydicom_leaves(buf)
        decoded = {t for t, v in theirs if v is None}
        theirs = Counter((t, None if t in decoded else v) for t, v in theirs.elements())
        mine = Counter((e.tag, None if e.tag in decoded else buf[e.start:e.end])
                       for e in found if not e.pixels and e.tag >> 16 != 2)
        assert mine == theirs, path
        assert [e.start for e in found] == sorted(e.start for e in found)
        pixels = [e for e in found if e.pixels]
        if pixels:
            assert sum(e.end - e.start for e in pixels) <= len(pydicom.dcmread(io.BytesIO(buf)).PixelData)
    assert walked >= 20


@pytest.fixture
def t1(sample_dir) -> Dataset:
    return pydicom.dcmread(sorted((sample_dir / "PACSMAN_data" / "dicomseries").glob("*.dcm"))[0])


def _write(ds: Dataset, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    root.mkdir(exist_ok=True)
    ds.save_as(root / "a.dcm")
    return root


def _in_pixels(ds: Dataset, text: bytes) -> None:
    pixels = bytearray(ds.PixelData)
    pixels[1000:1000 + len(text)] = text
    ds.PixelData = bytes(pixels)


@pytest.mark.parametrize("value", ["IPP77881234", "2339", "DEFAULT", "1.2.840.113619.2.55.3.604688119.868.1249343483.504"])
def test_a_string_in_the_pixel_samples_only_is_no_leak(t1, tmp_path, value):
    _in_pixels(t1, b" " + value.encode() + b" ")
    root = _write(t1, tmp_path)
    assert scan_for_leaks(root, [value, "DUPONTEL^JEAN"]) == []


@pytest.mark.parametrize(("value", "vr"), [("IPP77881234", "LO"), ("DEFAULT^MARIE", "PN"), ("2339", "PN"),
                                           ("HEHMRI7", "UN")])
def test_an_identity_after_the_pixels_is_found(t1, tmp_path, value, vr):
    _in_pixels(t1, b" " + value.split("^")[0].encode() + b" ")
    t1.private_block(0x7FE1, "ACME 1.0", create=True).add_new(0x02, vr, value if vr != "UN" else value.encode())
    root = _write(t1, tmp_path)
    assert [h.field for h in scan_for_leaks(root, [value])] == ["(7FE1,1002)"]


@pytest.mark.parametrize("value", ["DEFAULT", "2339", "IPP77881234"])
def test_an_identity_nested_in_a_private_sequence_is_found(t1, tmp_path, value):
    item = Dataset()
    item.InstitutionalDepartmentName = value
    inner = Dataset()
    inner.RequestAttributesSequence = Sequence([item])
    t1.private_block(0x0043, "ACME 1.0", create=True).add_new(0x05, "SQ", Sequence([inner]))
    root = _write(t1, tmp_path)
    assert [h.field for h in scan_for_leaks(root, [value])] == [
        "(0043,1005)[0].RequestAttributesSequence[0].InstitutionalDepartmentName"]


def test_a_common_string_outside_identity_elements_is_told_without_pydicom(t1, tmp_path, monkeypatch):
    t1.SeriesDescription = "HEAD routine"
    t1.private_block(0x0029, "ACME 1.0", create=True).add_new(0x01, "OB", b"\x00 head 2339 \x00")
    root = _write(t1, tmp_path)

    def refuse(*a, **k):
        raise AssertionError("pydicom read the file")

    monkeypatch.setattr(leakscan, "_dicom_fields", refuse)
    assert scan_for_leaks(root, ["HEAD", "2339"]) == []
    t1.InstitutionalDepartmentName = "Head"
    root = _write(t1, tmp_path)
    monkeypatch.undo()
    assert [h.field for h in scan_for_leaks(root, ["HEAD", "2339"])] == ["InstitutionalDepartmentName"]


def test_encapsulated_fragments_are_pixels_and_what_follows_them_is_searched(t1, tmp_path):
    """Compressed frames (encapsulated Pixel Data, PS3.5 A.4): a string in a fragment is no leak; one in an
    element after the Sequence Delimitation Item is."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    frame = bytearray(b"\xff\xd8" + bytes(range(256)) * 20 + b"\xff\xd9")
    frame[300:313] = b" IPP77881234 "
    t1.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    t1.PixelData = encapsulate([bytes(frame), bytes(frame)], has_bot=True)
    t1["PixelData"].VR = "OB"
    t1["PixelData"].is_undefined_length = True
    root = _write(t1, tmp_path)
    found = elements((root / "a.dcm").read_bytes())
    assert found is not None and sum(e.pixels for e in found) == 3  # the offset table and two fragments
    assert scan_for_leaks(root, ["IPP77881234"]) == []
    t1.private_block(0x7FE1, "ACME 1.0", create=True).add_new(0x02, "LO", "IPP77881234")
    root = _write(t1, tmp_path)
    assert [h.field for h in scan_for_leaks(root, ["IPP77881234"])] == ["(7FE1,1002)"]
