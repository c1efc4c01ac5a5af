"""Dates, times and UIDs in kept private elements (issue 10 item 1).

Public dates are shifted by the subject's offset; a kept private value must not hold the
original date (StudyDate 20180918 stood verbatim in the Siemens CSA "versions" (0029,1009) and
(0029,1019) of dcm_qa_nih, and as a plain number in the Phoenix protocol of dcm_qa_mosaic), or
the offset can be read off it. Checked on every Siemens series of the bundled sample, of
../shared/data/dicom and of ../shared/data/dicom-vendors, and on planted private values in
copies of real files.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser
from pacs2bids.deid.keyed import shift_da
from pacs2bids.dicomfiles import iter_dicom_bytes

SECRET = b"private-dates-secret-0123456789"
SUBJECT = "01"
DCM2NIIX = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or "dcm2niix"
_TOKEN = re.compile(rb"(?<![0-9])(?:19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])(?![0-9])")


def _dates_of(ds: Dataset) -> set[str]:
    """Every date of a file: DA values and the date part of DT values, public and private, at
    any depth (but Patient's Birth Date, published as 1 January of its shifted year, P4)."""
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    walk(item)
            elif elem.VR in ("DA", "DT") and elem.value and elem.tag != 0x00100030:  # birth date: P4, year kept
                values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
                found.update(str(v)[:8] for v in values if str(v)[:8].isdigit() and len(str(v)) >= 8)

    walk(ds)
    return found


def _forms(d: str) -> list[bytes]:
    y, m, dd = d[:4], d[4:6], d[6:]
    out = [d]
    for sep in "-./":
        out += [f"{y}{sep}{m}{sep}{dd}", f"{dd}{sep}{m}{sep}{y}"]
    return [re.escape(f).encode() for f in out]


def _siemens_series(roots: list[Path], dst: Path) -> dict[str, tuple[list[Path], set[str], str]]:
    """Copies of every Siemens series under ``roots``: name -> (files, original dates, source folder)."""
    series: dict[str, list[Path]] = defaultdict(list)
    dates: dict[str, set[str]] = defaultdict(set)
    names: dict[str, str] = {}
    where: dict[str, str] = {}
    for root in roots:
        for path, data in iter_dicom_bytes(root):
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            if "SIEMENS" not in str(ds.get("Manufacturer", "")).upper() or "SeriesInstanceUID" not in ds:
                continue
            key = str(ds.SeriesInstanceUID)
            name = names.setdefault(key, f"s{len(names):03d}")
            where.setdefault(name, str(path.parent))
            f = dst / name / f"{len(series[name]):05d}.dcm"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
            series[name].append(f)
            dates[name] |= _dates_of(ds)
    return {n: (series[n], dates[n], where[n]) for n in series}


def _private_values(ds: Dataset):
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _private_values(item)
        elif elem.tag.is_private and elem.tag.element >= 0x1000:
            v = elem.value
            yield elem, (bytes(v) if isinstance(v, (bytes, bytearray)) else str(v).encode("latin-1", "replace"))


def _check_no_original_date(series: dict, tmp: Path) -> dict[str, list[Path]]:
    p = Pseudonymiser("dates", SECRET, PseudonymizationSettings(), tmp / "keys")
    days = p.keyed.day_offset(SUBJECT)
    written: dict[str, list[Path]] = {}
    leaks, offsets = [], []
    for name, (files, originals, where) in series.items():
        assert originals, (name, where)
        res = p.pseudonymise_series(files, tmp / "out" / name, subject=SUBJECT, session=None, quarantine_dir=tmp / "q")
        assert not res.quarantined, (where, res.quarantined)
        if not res.written:
            assert res.dropped, where  # the XA30 Phoenix Document (an SR): dropped by default
            continue
        written[name] = res.written
        needle = re.compile(rb"(?<![0-9])(?:" + b"|".join(f for d in originals for f in _forms(d)) + rb")(?![0-9])")
        shifted = {shift_da(d, days).encode() for d in originals}
        input_tokens = {m.group(0) for f in files for m in _TOKEN.finditer(f.read_bytes())}
        for out in res.written:
            data = out.read_bytes()
            leaks += [(where, out.name, m.group(0), data[max(0, m.start() - 40):m.end()]) for m in needle.finditer(data)]
            # a date in a kept private value is either shifted like the public dates, or a constant
            # of the input that is not the patient's (a software baseline): never shifted otherwise
            for elem, value in _private_values(pydicom.dcmread(out, stop_before_pixels=True)):
                for m in _TOKEN.finditer(value):
                    if m.group(0) not in shifted and m.group(0) not in input_tokens:
                        offsets.append((where, str(elem.tag), m.group(0)))
    assert not leaks, leaks[:5]
    assert not offsets, offsets[:5]
    return written


def test_no_original_date_survives_in_siemens_files_of_the_sample(sample_dir, tmp_path):
    series = _siemens_series([sample_dir], tmp_path / "raw")
    assert len(series) >= 4
    written = _check_no_original_date(series, tmp_path)
    # the CSA header "versions" that held the study date are gone; the CSA headers themselves stay
    nih = [n for n, (_f, d, w) in series.items() if "20180918" in d]
    assert nih
    out = pydicom.dcmread(written[nih[0]][0], stop_before_pixels=True)
    block = out.private_block(0x0029, "SIEMENS CSA HEADER")
    assert 0x09 not in block and 0x19 not in block
    assert 0x10 in block and 0x20 in block


def test_no_original_date_survives_in_siemens_files_of_the_corpora(corpus_dir, vendors_dir, tmp_path):
    series = _siemens_series([corpus_dir, vendors_dir], tmp_path / "raw")
    assert len(series) >= 30
    written = _check_no_original_date(series, tmp_path)
    # dcm_qa_mosaic's Phoenix protocol holds the study date as a number (lFinalMatrixSizePhase =
    # 20171021): shifted in place, and dcm2niix reads the same image and timing from the copy
    mosaic = [n for n, (_f, _d, w) in series.items() if "cmrr_Int_HF_9" in w]
    assert mosaic
    for name in mosaic:
        _same_dcm2niix(series[name][0], written[name], tmp_path / "cmp" / name)


def _same_dcm2niix(raw: list[Path], pseudo: list[Path], tmp: Path) -> None:
    import json

    outs = []
    for label, files in (("a", raw), ("b", pseudo)):
        src, dst = tmp / f"in-{label}", tmp / f"out-{label}"
        src.mkdir(parents=True)
        dst.mkdir()
        for f in files:
            (src / f.name).symlink_to(f)
        proc = subprocess.run([DCM2NIIX, "-b", "y", "-z", "n", "-f", "%s_%e", "-o", str(dst), str(src)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-1000:]
        outs.append(dst)
    a, b = sorted(outs[0].glob("*.nii")), sorted(outs[1].glob("*.nii"))
    assert a and len(a) == len(b)
    for x, y in zip(a, b):
        ix, iy = nib.load(x), nib.load(y)
        assert ix.shape == iy.shape and np.allclose(ix.affine, iy.affine)
        assert np.array_equal(np.asanyarray(ix.dataobj), np.asanyarray(iy.dataobj))
        jx, jy = json.loads(x.with_suffix(".json").read_text()), json.loads(y.with_suffix(".json").read_text())
        for k in ("SliceTiming", "PhaseEncodingDirection", "TotalReadoutTime", "EchoTime", "RepetitionTime",
                  "EffectiveEchoSpacing", "MultibandAccelerationFactor"):
            assert jx.get(k) == jy.get(k), k


def test_planted_private_dates_and_uids_are_shifted_keyed_or_removed(sample_dir, tmp_path):
    src = next(p for p in sorted((sample_dir / "dcm_qa_nih").rglob("*.dcm")))
    ds = pydicom.dcmread(src)
    assert "SIEMENS" in ds.Manufacturer.upper()
    study = ds.StudyDate
    other_uid = "1.3.12.2.1107.5.2.43.66044.2018091812244919155211234"
    mine = ds.private_block(0x0011, "PLANTED SITE DATA", create=True)
    mine.add_new(0x01, "DA", "20180917")  # a private DA: shifted like a public date
    mine.add_new(0x02, "LO", study)  # a whole date in LO, kept by the spec: shifted
    mine.add_new(0x03, "UI", other_uid)  # a private UID: keyed like a public one
    mine.add_new(0x04, "LT", f"ref {other_uid} on {study[6:]}.{study[4:6]}.{study[:4]}")  # inside text
    mine.add_new(0x05, "LO", "20180918121530.250000")  # a whole date-time in LO: shifted
    mine.add_new(0x06, "SH", "VE11C")  # not a date: kept as it is
    mine.add_new(0x07, "UN", other_uid.encode() + b"\x00")  # a UID stored as UN: keyed like a public one
    mine.add_new(0x08, "LO", "1.0.2")  # a version, not a UID: kept
    tcia = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    tcia.add_new(0x0F, "SH", study)  # a TCIA "keep" row holding a date: not needed, removed
    f = tmp_path / "in.dcm"
    ds.save_as(f)
    keep = [f'0011,"PLANTED SITE DATA",{e:02X}' for e in range(1, 9)]
    p = Pseudonymiser("dates", SECRET, PseudonymizationSettings(keep_private=keep), tmp_path / "keys")
    res = p.pseudonymise_series([f], tmp_path / "out", subject=SUBJECT, session=None, quarantine_dir=tmp_path / "q")
    out = pydicom.dcmread(res.written[0])
    days = p.keyed.day_offset(SUBJECT)
    delta = date.fromisoformat(_iso(out.StudyDate)) - date.fromisoformat(_iso(study))
    assert delta.days == days != 0
    got = out.private_block(0x0011, "PLANTED SITE DATA")
    assert got[0x01].value == shift_da("20180917", days)
    assert got[0x02].value == out.StudyDate
    assert got[0x03].value == p.keyed.uid(other_uid)
    text = got[0x04].value
    shifted = shift_da(study, days)
    assert other_uid not in text and text.startswith("ref ")
    assert text.endswith(f" on {shifted[6:]}.{shifted[4:6]}.{shifted[:4]}")
    assert len(text) == len(mine[0x04].value)  # same length: a UID token and a date, replaced in place
    assert got[0x05].value == shifted + "121530.250000"
    assert got[0x06].value == "VE11C"
    assert got[0x07].value.rstrip(b"\x00").decode() == p.keyed.uid(other_uid)
    assert got[0x08].value == "1.0.2"
    assert 0x0F not in out.private_block(0x0019, "SIEMENS MR HEADER")
    raw = res.written[0].read_bytes()
    assert study.encode() not in raw and other_uid.encode() not in raw and b"20180917" not in raw


def _iso(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:]}"


@pytest.mark.parametrize("value", ["20180918", "20180918101010"])
def test_csa_version_date_removed_even_when_stored_as_un(sample_dir, tmp_path, value):
    """Implicit-VR files carry private values as UN bytes: a whole date is recognised there too."""
    src = next(p for p in sorted((sample_dir / "dcm_qa_nih").rglob("*.dcm")))
    ds = pydicom.dcmread(src)
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER")
    del ds[block.get_tag(0x09)]
    ds.add_new(block.get_tag(0x09), "UN", value.encode())
    ds.save_as(tmp_path / "in.dcm")
    keep = ['0029,"SIEMENS CSA HEADER",09']  # even kept by the spec: shifted, never verbatim
    p = Pseudonymiser("dates", SECRET, PseudonymizationSettings(keep_private=keep), tmp_path / "keys")
    res = p.pseudonymise_series([tmp_path / "in.dcm"], tmp_path / "out", subject=SUBJECT, session=None,
                                quarantine_dir=tmp_path / "q")
    out = pydicom.dcmread(res.written[0])
    got = out.private_block(0x0029, "SIEMENS CSA HEADER")[0x09].value
    got = got.decode() if isinstance(got, bytes) else got
    assert got.strip() == shift_da(value[:8], p.keyed.day_offset(SUBJECT)) + value[8:]


def test_an_earlier_visit_date_quoted_later_is_shifted_too(sample_dir, tmp_path):
    """A second visit's description quotes the first visit's date: shifted like the first visit's own, when one
    Pseudonymiser sees both (the flow makes one per series task: across tasks the key store would have to
    give the subject's recorded study dates)."""
    files = sorted((sample_dir / "dcm_qa_nih").rglob("*.dcm"))[:2]
    first, second = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    first_date = first.StudyDate
    for elem in second.iterall():  # the second visit's own dates are all another day
        if elem.VR == "DA" and elem.value:
            elem.value = "20190301"
        elif elem.VR == "DT" and elem.value:
            elem.value = "20190301" + str(elem.value)[8:]
    assert _dates_of(second) == {"20190301"} != {first_date}
    second.SeriesDescription = f"T1 suivi, comparer au {first_date}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first.save_as(tmp_path / "a" / "1.dcm")
    second.save_as(tmp_path / "b" / "2.dcm")
    p = Pseudonymiser("dates", SECRET, PseudonymizationSettings(), tmp_path / "keys")
    a = p.pseudonymise_series([tmp_path / "a" / "1.dcm"], tmp_path / "oa", subject=SUBJECT, session="1",
                              quarantine_dir=tmp_path / "q")
    b = p.pseudonymise_series([tmp_path / "b" / "2.dcm"], tmp_path / "ob", subject=SUBJECT, session="2",
                              quarantine_dir=tmp_path / "q")
    shifted_first = pydicom.dcmread(a.written[0]).StudyDate
    assert pydicom.dcmread(b.written[0]).SeriesDescription == f"T1 suivi, comparer au {shifted_first}"
    assert first_date.encode() not in b.written[0].read_bytes()
