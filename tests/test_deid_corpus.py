"""Planted-identity corpus from real files: removal rate per category (headers, nested
sequences, private tags, descriptions, text objects, burned-in pixels).

Identity is planted into copies of real scanner files of every vendor in the corpus; the
burned-in text is the real one of dcm_qa_ct (Philips CT exam summaries) and deid-data
(ultrasound, secondary capture). Headers and text objects must be cleaned at 100 %.
"""

from __future__ import annotations

import gzip
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser, scan_for_leaks
from pacs2bids.deid.pixels import _to_grey8, tesseract_available

SECRET = b"corpus-test-secret-0123456789"
NAME = "Bellefontaine^Josephine^Adele"
IDENT = {
    "PatientName": NAME,
    "PatientID": "HCL20240417X",
    "PatientBirthDate": "19630715",
    "AccessionNumber": "ACC98127364",
    "InstitutionName": "Hopital Edouard Herriot Lyon",
    "ReferringPhysicianName": "Marchetti^Lucien",
    "OperatorsName": "Quintavalle^Romy",
    "StationName": "HEHMRI7",
    "DeviceSerialNumber": "SN4471932",
}


def _real_files(corpus: Path) -> list[tuple[str, bytes]]:
    picks = []
    for folder, pattern in (
        ("dcm_qa_nih", "*"),
        ("dcm_qa_ge", "*"),
        ("dcm_qa_philips", "*"),
        ("dcm_qa_xa30i", "*.gz"),
        ("PACSMAN_data", "*.dcm"),
        ("dcm_qa_fmap", "*"),
    ):
        for p in sorted((corpus / folder).rglob(pattern)):
            if not p.is_file():
                continue
            data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            if data[128:132] == b"DICM" and b"1.2.840.10008.5.1.4.1.1.4" in data[:2000]:
                picks.append((folder, data))
                break
    return picks


def _plant(ds: Dataset) -> dict[str, list[str]]:
    """Plant identity everywhere; returns the planted strings by category."""
    for kw, v in IDENT.items():
        setattr(ds, kw, v)
    item = Dataset()
    item.RequestedProcedureID = "RP55512873"
    item.ScheduledProcedureStepID = "SPS7718234"
    item.RequestingPhysician = "Vasseur^Gilberte"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.250.1.59.77.123456789.42"
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    item.ReferencedStudySequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([item])
    blk = ds.private_block(0x0041, "HOSPITAL RIS 1.0", create=True)
    blk.add_new(0x01, "LO", "Bellefontaine Josephine")
    blk.add_new(0x02, "OB", b"\x00\x01HCL20240417X\x00")
    desc = str(ds.get("SeriesDescription", "t1"))
    ds.SeriesDescription = f"{desc} Bellefontaine"
    ds.ImageComments = "exam of BELLEFONTAINE, JOSEPHINE born 19630715"
    return {
        "headers": [v for v in IDENT.values()],
        "nested": ["RP55512873", "SPS7718234", "Vasseur^Gilberte", "1.2.250.1.59.77.123456789.42"],
        "private": ["Bellefontaine Josephine", "HCL20240417X"],
        "descriptions": ["Bellefontaine", "BELLEFONTAINE, JOSEPHINE"],
    }


def _rate(root: Path, values: list[str]) -> float:
    hits = {v for v in values if scan_for_leaks(root, [v])}
    return 1 - len(hits) / len(values)


def test_planted_identity_removed_from_headers_and_text_objects(corpus_dir, tmp_path):
    picks = _real_files(corpus_dir)
    assert len(picks) >= 5, [p[0] for p in picks]
    p = Pseudonymiser("corpus", SECRET, PseudonymizationSettings(), tmp_path / "keys")
    planted: dict[str, list[str]] = {}
    for i, (folder, data) in enumerate(picks):
        ds = pydicom.dcmread(io.BytesIO(data))
        for cat, values in _plant(ds).items():
            planted.setdefault(cat, []).extend(values)
        src = tmp_path / "in" / f"{i}.dcm"
        src.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(src)
        res = p.pseudonymise_series([src], tmp_path / "out" / f"s{i}", subject="007", session=None, quarantine_dir=tmp_path / "q")
        assert len(res.written) == 1, (folder, res.quarantined)
        assert "Bellefontaine" not in res.series_description and res.series_description.strip(), folder
    # text objects: the XA30 Phoenix SR and the Philips presentation state are dropped
    text_objects = []
    for folder, marker in (("dcm_qa_xa30i", b"1.2.840.10008.5.1.4.1.1.88"), ("dcm_qa_philips_dwi", b"1.2.840.10008.5.1.4.1.1.11")):
        for f in sorted((corpus_dir / folder).rglob("*.gz")):
            data = gzip.decompress(f.read_bytes())
            if marker in data[:3000]:
                ds = pydicom.dcmread(io.BytesIO(data))
                ds.PatientName = NAME
                src = tmp_path / "in" / f"text{len(text_objects)}.dcm"
                ds.save_as(src)
                text_objects.append(src)
                break
    res = p.pseudonymise_series(text_objects, tmp_path / "out" / "text", subject="007", session=None, quarantine_dir=tmp_path / "q")
    assert len(res.dropped) == len(text_objects) == 2 and not res.written
    planted["text objects"] = [NAME]

    report = {cat: _rate(tmp_path / "out", values) for cat, values in planted.items()}
    print("\nremoval rate per category:", {k: f"{v:.0%}" for k, v in report.items()})
    assert report == {cat: 1.0 for cat in planted}
    # and the scanner with everything the project saw finds nothing at all
    assert scan_for_leaks(tmp_path / "out", p.identifiers()) == []
    assert set(IDENT.values()) - {IDENT["PatientBirthDate"]} <= p.identifiers() | {IDENT["PatientBirthDate"]}


def _ocr_words(ds: Dataset, tmp: Path) -> set[str]:
    from PIL import Image

    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    g = _to_grey8(np.asarray(arr))
    Image.fromarray(g).resize((g.shape[1] * 2, g.shape[0] * 2)).save(tmp / "page.png")
    out = subprocess.run(["tesseract", str(tmp / "page.png"), "stdout", "--psm", "11"], capture_output=True, text=True, check=True).stdout
    return {w.upper() for w in re.findall(r"[A-Za-z0-9/]{4,}", out)}


@pytest.mark.skipif(not tesseract_available(), reason="tesseract is not installed")
def test_burned_in_text_is_masked(corpus_dir, deid_data_dir, tmp_path):
    del deid_data_dir  # the pixels come from the corpus copy of deid-data
    files = [p for p in sorted((corpus_dir / "dcm_qa_ct").rglob("I*")) if p.is_file()]
    files += sorted((corpus_dir / "deid-data").rglob("*.dcm"))
    p = Pseudonymiser("pix", SECRET, PseudonymizationSettings(), tmp_path / "keys")
    found = removed = 0
    identifying = {"PLASTIC", "PATIENTFI", "00079241539", "08/29/1951", "CLEVELAN", "CCHS", "06/02/2015", "03/02/2017"}
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        before = _ocr_words(ds, tmp_path)
        res = p.pseudonymise_series([f], tmp_path / "out" / str(i), subject="01", session=None, quarantine_dir=tmp_path / "q")
        if res.quarantined:
            continue  # not published: counts as removed
        out = pydicom.dcmread(res.written[0])
        if res.record["pixels"]:
            assert out.BurnedInAnnotation == "NO" and "IconImageSequence" not in out
            assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            # cleaned pixels keep the keyed pseudonym of the original instance: a rerun names the same
            # file, and references to the instance still resolve (pydicom would draw a random UID)
            assert out.SOPInstanceUID == p.keyed.uid(ds.SOPInstanceUID)
            assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        after = _ocr_words(out, tmp_path)
        hit_before = {w for w in before if any(t in w for t in identifying)}
        found += len(hit_before)
        removed += len({w for w in hit_before if w not in after})
    print(f"\nburned-in identifying words: {removed}/{found} removed")
    assert found >= 4 and removed == found
