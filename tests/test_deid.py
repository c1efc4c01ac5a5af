"""pacs2bids.deid: keyed pseudonyms, the Annex E profile row by row, private tags, key store,
leak scanner, dry run, property tests. Real files only (the bundled sample and the corpus)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.sequence import Sequence

if TYPE_CHECKING:
    import numpy

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import KeyStore, LeakHit, Pseudonymiser, SeriesDeidResult, scan_for_leaks
from pacs2bids.deid.keyed import Keyed, parse_dt, shift_da, shift_dt
from pacs2bids.deid.profile import DEFAULT_OPTIONS, Profile
from pacs2bids.deid.identifiers import _IDENT_TAGS
from pacs2bids.errors import PseudonymisationError, SpecError

SECRET = b"unit-test-secret-0123456789"
OTHER = b"another-secret-9876543210xx"
WHY = "unit test of the key store"


@pytest.fixture(scope="module")
def t1_files(sample_dir) -> list[Path]:
    files = sorted((sample_dir / "PACSMAN_data" / "dicomseries").glob("*.dcm"), key=lambda p: int(p.stem[5:]))
    assert len(files) == 128
    return files


def make(tmp_path: Path, secret: bytes = SECRET, **kw) -> Pseudonymiser:
    return Pseudonymiser("proj", secret, PseudonymizationSettings(**kw), tmp_path / "keys")


def run(p: Pseudonymiser, files, tmp_path: Path, name="out", subject="001") -> SeriesDeidResult:
    return p.pseudonymise_series(files, tmp_path / name, subject=subject, session=None, quarantine_dir=tmp_path / "q")


# -- keyed functions --------------------------------------------------------------------
def test_uid_is_keyed_deterministic_and_valid():
    k1, k2, k3 = Keyed(SECRET, "proj"), Keyed(SECRET, "proj"), Keyed(OTHER, "proj")
    uid = "1.3.12.2.1107.5.2.32.35131.2015031915183965462301234"
    new = k1.uid(uid)
    assert new == k2.uid(uid) and new != k3.uid(uid) and new != Keyed(SECRET, "other").uid(uid)
    assert new.startswith("2.25.") and len(new) <= 64 and re.fullmatch(r"2\.25\.[1-9][0-9]*", new)


def test_dates_shift_by_whole_days_keeping_time_and_intervals():
    k = Keyed(SECRET, "proj")
    d = k.day_offset("001")
    assert -3650 <= d <= -1 and d == Keyed(SECRET, "proj").day_offset("001")
    assert shift_da("20240301", -1) == "20240229"
    assert shift_dt("20231231235959.5+0100", 1) == "20240101235959.5+0100"
    assert shift_dt("2023", -400) == "2021"
    assert shift_da("not a date", 3) is None


def test_unknown_option_and_bad_keep_private_are_refused():
    with pytest.raises(SpecError, match="unknown option"):
        Profile(["rtnEverythingOpt"])
    with pytest.raises(SpecError, match="exclude each other"):
        Profile(["rtnLongFullDatesOpt", "rtnLongModifDatesOpt"])
    with pytest.raises(SpecError, match="gggg"):
        Profile(None, ["0019,1234"])


# -- the safe core on a real series ----------------------------------------------------------
def test_core_replaces_identity_uids_dates(t1_files, tmp_path):
    src = [pydicom.dcmread(f) for f in t1_files[:3]]
    p = make(tmp_path)
    res = run(p, t1_files[:3], tmp_path)
    assert len(res.written) == 3 and not res.quarantined and not res.dropped
    offset = timedelta(days=p.keyed.day_offset("001"))
    for path in res.written:
        ds = pydicom.dcmread(path)
        orig = next(s for s in src if p.keyed.uid(s.SOPInstanceUID) == ds.SOPInstanceUID)
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.preamble == b"\x00" * 128
        assert str(ds.PatientName) == "001" and ds.PatientID == "001"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == p.keyed.uid(orig.StudyInstanceUID) == res.pseudo_study_uid
        assert ds.FrameOfReferenceUID == p.keyed.uid(orig.FrameOfReferenceUID)
        assert ds.SOPClassUID == orig.SOPClassUID
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}
        assert {"113100", "113107", "113111", "113105"} <= codes
        if orig.get("StudyDate"):
            assert parse_dt(ds.StudyDate + "000000") == parse_dt(orig.StudyDate + "000000") + offset
        if orig.get("PatientBirthDate"):
            assert ds.PatientBirthDate.endswith("0101")
        for kw in ("InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "AccessionNumber", "StationName"):
            assert not ds.get(kw), kw
        assert ds.Rows == orig.Rows and ds.PixelData == orig.PixelData
    rec = json.loads(json.dumps(res.to_dict()))
    assert rec["record"]["profile"]["edition"] == "2024b"
    text = json.dumps(rec)
    for ident in p.identifiers():
        if len(ident) >= 4:
            assert ident not in text


def test_per_file_step_runs_the_same_from_pickled_inputs(t1_files, tmp_path):
    """The per-file step (issue 12 runs it in worker processes): its inputs pickle, the project's
    keys included, and give the same file as the series loop writes."""
    import pickle
    from collections import Counter

    from pacs2bids.deid.context import FileContext
    from pacs2bids.deid.identifiers import collect
    from pacs2bids.deid.patterns import compile_identifiers, date_tokens, looks_like_uid
    from pacs2bids.deid.series import deid_dataset

    p = make(tmp_path)
    (written,) = run(p, t1_files[:1], tmp_path).written
    ds = pydicom.dcmread(t1_files[0])
    dates: set[str] = set()
    ids = frozenset(v for v in collect(ds, p.profile, dates) if not looks_like_uid(v))
    ctx = FileContext(p.keyed, p.profile, "001", compile_identifiers(ids), Counter(), None, dates=date_tokens(dates))
    ds, ctx = pickle.loads(pickle.dumps((ds, ctx)))
    assert deid_dataset(ds, ctx, pixels_reviewed=False) == (None, [])
    assert ds.SOPInstanceUID == pydicom.dcmread(written).SOPInstanceUID == p.keyed.uid(pydicom.dcmread(t1_files[0]).SOPInstanceUID)
    assert ds.StudyDate == pydicom.dcmread(written).StudyDate and ctx.notes


def test_series_description_keeps_science_loses_identity(t1_files, tmp_path):
    ds = pydicom.dcmread(t1_files[0])
    ds.PatientName = "Dupontel^Marguerite"
    ds.PatientID = "IPP77881234"
    ds.SeriesDescription = "T1 MPRAGE Dupontel IPP77881234 sag"
    ds.ProtocolName = "t1_mprage Marguerite Dupontel"
    f = tmp_path / "in.dcm"
    ds.save_as(f)
    res = run(make(tmp_path), [f], tmp_path)
    out = pydicom.dcmread(res.written[0])
    assert out.SeriesDescription == res.series_description == "T1 MPRAGE sag"
    assert out.ProtocolName == "t1_mprage"


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192", "ISO_IR 148"])
def test_accented_name_cleaned_from_undecoded_text_in_any_charset(t1_files, tmp_path, charset):
    """Text kept raw unless the pattern hits its bytes: the accented name must still go, in
    Latin-1, UTF-8 and a charset whose bytes are not searched (ISO_IR 148: decoded first)."""
    ds = pydicom.dcmread(t1_files[0])
    ds.SpecificCharacterSet = charset
    ds.PatientName = "Dupré^Hélène"
    ds.SeriesDescription = "T1 Hélène Dupré sag"
    ds.ImageComments = "séquence de Dupré"
    f = tmp_path / "in.dcm"
    ds.save_as(f)
    res = run(make(tmp_path, keep_text=["SeriesDescription", "ImageComments"]), [f], tmp_path)
    out = pydicom.dcmread(res.written[0])
    assert out.SeriesDescription == "T1 sag" and "Dupré" not in out.ImageComments
    raw = res.written[0].read_bytes()
    for enc in ("latin-1", "utf-8"):
        assert "Dupré".encode(enc) not in raw


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
@pytest.mark.parametrize("written", ["HÉLÈNE DURAND", "Hélène Durand", "hélène", "Helene DURAND", "DURAND, HELENE"])
def test_name_cleaned_from_text_in_any_case_and_without_accents(t1_files, tmp_path, charset, written):
    """Names are written in capitals in headers (DURAND^HÉLÈNE) and in any case, or without
    accents, in free text: an accented capital is not an ASCII letter, so byte patterns must list
    each spelling. The leak scanner shares the pattern: it must see them too."""
    ds = pydicom.dcmread(t1_files[0])
    ds.SpecificCharacterSet = charset
    ds.PatientName = "DURAND^HÉLÈNE"
    ds.StudyDescription = f"IRM cérébrale {written} contrôle"
    f = tmp_path / "in.dcm"
    ds.save_as(f)
    res = run(make(tmp_path, keep_text=["SeriesDescription", "StudyDescription"]), [f], tmp_path)
    out = pydicom.dcmread(res.written[0])
    import unicodedata

    text = unicodedata.normalize("NFKD", str(out.StudyDescription)).encode("ascii", "ignore").decode().upper()
    assert "DURAND" not in text and "HELENE" not in text, out.StudyDescription
    assert str(out.StudyDescription).startswith("IRM cérébrale") and "contrôle" in str(out.StudyDescription)
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "notes.txt").write_bytes(f"IRM {written}".encode("latin-1" if charset == "ISO_IR 100" else "utf-8"))
    assert scan_for_leaks(tmp_path / "scan", {"DURAND^HÉLÈNE"}), f"the leak scanner missed {written!r}"


# -- the table, row by row, at depth 1 and 3 --------------------------------------------------
_PLANT_VR_VALUES = {
    "DA": "20010203",
    "DT": "20010203040506",
    "TM": "040506",
    "UI": "1.2.3.4.5.6.7.8.9.424242",
}
_SKIP_ROWS = {0x00100010, 0x00100020, 0x00100030, 0x00120062, 0x00120063, 0x00120064, 0x00280303, 0x00880200}


def _rows(profile: Profile):
    for tag, row in sorted(profile.rows.items()):
        if tag in _SKIP_ROWS or (tag >> 16) < 0x0008 or (tag >> 16) == 0x7FE0:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr in ("SQ", "OB", "OW", "UN", "US or SS", "OB or OW", "US or SS or OW", "AT", "OF", "OD", "OL", "OV"):
            continue
        yield tag, vr


def _plant(ds: Dataset, tag: int, vr: str, ident: str):
    if vr in _PLANT_VR_VALUES:
        ds.add_new(tag, vr, _PLANT_VR_VALUES[vr])
    elif vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        ds.add_new(tag, vr, 7)
    elif vr in ("DS", "IS"):
        ds.add_new(tag, vr, "7")
    elif vr == "AS":
        ds.add_new(tag, vr, "042Y")
    elif vr == "UR":
        ds.add_new(tag, vr, "urn:keep")
    elif vr == "CS":
        ds.add_new(tag, vr, "PLANTCS")
    else:
        ds.add_new(tag, vr, f"Keep{tag:08X}" if vr in ("SH", "AE") else f"Keep{tag:08X} this {ident}")


def _nest(ds: Dataset, depth: int) -> Dataset:
    """An item ``depth`` levels down, through sequences absent from Table E.1-1 (walked)."""
    chain = ["SharedFunctionalGroupsSequence", "MRImagingModifierSequence", "MRTimingAndRelatedParametersSequence"]
    item = ds
    for kw in chain[:depth]:
        if kw not in item:
            setattr(item, kw, Sequence([Dataset()]))
        item = item[kw][0]
    return item


def _find(ds: Dataset, depth: int) -> Dataset:
    chain = ["SharedFunctionalGroupsSequence", "MRImagingModifierSequence", "MRTimingAndRelatedParametersSequence"]
    item = ds
    for kw in chain[:depth]:
        item = item[kw][0]
    return item


@pytest.mark.parametrize(
    "options",
    [None, [], ["rtnLongFullDatesOpt", "rtnUIDsOpt", "rtnDevIdOpt", "rtnInstIdOpt", "rtnPatCharsOpt"], ["cleanDescOpt", "cleanStructContOpt", "cleanGraphOpt", "rtnSafePrivOpt"]],
    ids=["default", "basic", "retain-all", "clean-all"],
)
def test_every_table_row_at_depth_1_and_3(t1_files, tmp_path, options):
    ident = "Zoltarovich"
    profile = Profile(options)
    rows = list(_rows(profile))
    assert len(rows) > 300
    ds = pydicom.dcmread(t1_files[0])
    ds.PatientName = f"{ident}^Hortense"
    for depth in (1, 3):
        item = _nest(ds, depth)
        for tag, vr in rows:
            _plant(item, tag, vr, ident)
    f = tmp_path / "planted.dcm"
    ds.save_as(f)
    p = make(tmp_path, options=options)
    res = run(p, [f], tmp_path)
    assert res.written, res.quarantined
    out = pydicom.dcmread(res.written[0])
    raw = res.written[0].read_bytes()
    retained = any(profile.strictest(profile.action(t)[0]) == "K" and v not in ("DA", "DT", "TM", "UI", "CS") for t, v in rows)
    assert (ident.encode() in raw) == retained  # only a Retain option keeps free text verbatim
    assert (b"1.2.3.4.5.6.7.8.9.424242" in raw) == ("rtnUIDsOpt" in profile.options)
    offset = timedelta(days=p.keyed.day_offset("001"))
    checked = 0
    for depth in (1, 3):
        item = _find(out, depth)
        for tag, vr in rows:
            code, _src = profile.action(tag)
            code = profile.strictest(code)
            elem = item.get(tag)
            name = keyword_for_tag(tag) or hex(tag)
            if code == "X":
                assert elem is None, name
            elif code == "Z":
                assert elem is not None and elem.value in ("", None, b""), name
            elif code == "K":
                assert elem is not None, name
                if vr in ("DA", "DT", "TM", "UI"):
                    assert elem.value == _PLANT_VR_VALUES[vr], name
            elif code in ("U", "D", "C"):
                assert elem is not None, name
                if vr == "UI":
                    assert elem.value != _PLANT_VR_VALUES[vr] and elem.value.startswith("2.25."), name
                elif vr in ("DA", "DT") and not profile.shift_dates:
                    assert elem.value != _PLANT_VR_VALUES[vr], name
                elif vr == "DA":
                    assert parse_dt(elem.value + "000000") == parse_dt("20010203000000") + offset, name
                elif vr == "DT":
                    assert parse_dt(elem.value) == parse_dt("20010203040506") + offset, name
                elif vr in ("LO", "LT", "ST", "UT", "SH", "UC") and code == "C" and tag not in _IDENT_TAGS:
                    assert "Keep" in str(elem.value), name  # the science stays, the name goes
            checked += 1
    assert checked == 2 * len(rows)


# -- private tags -----------------------------------------------------------------------------
def test_private_tags_kept_by_creator_not_by_number(tmp_path, sample_dir):
    src = sorted((sample_dir / "dcm_qa_nih").rglob("*"))
    siemens = next(p for p in src if p.is_file() and pydicom.misc.is_dicom(p) and "SIEMENS CSA HEADER" in str(pydicom.dcmread(p, stop_before_pixels=True).get((0x0029, 0x0010), "")))
    ds = pydicom.dcmread(siemens)
    # the diffusion b-value's creator moved to another block: still kept, by creator
    ds.private_block(0x0019, "SIEMENS MR HEADER")  # exists
    blk = ds.private_block(0x0011, "ACME IDENTITY", create=True)
    ds.PatientName = "Zoltarovich^Hortense"
    blk.add_new(0x01, "LO", "Zoltarovich^Hortense")
    ds.private_block(0x0019, "ACME OTHER", create=True).add_new(0x0C, "LO", "ShouldGo")
    f = tmp_path / "siemens.dcm"
    ds.save_as(f)
    p = make(tmp_path, keep_private=['0011,"ACME IDENTITY",01'])
    out = pydicom.dcmread(run(p, [f], tmp_path).written[0])
    creators = {str(e.value) for e in out if e.tag.is_private_creator}
    assert "SIEMENS CSA HEADER" in creators and "ACME OTHER" not in creators
    kept = out.private_block(0x0011, "ACME IDENTITY")
    assert kept[0x01].value == ""  # kept on request, and cleaned of the patient's name
    assert b"ShouldGo" not in res_bytes(out)
    csa = out.private_block(0x0029, "SIEMENS CSA HEADER")[0x20].value
    orig = ds.private_block(0x0029, "SIEMENS CSA HEADER")[0x20].value
    assert len(csa) == len(orig)
    for uid in set(re.findall(rb"(?<![0-9.])[0-9]+(?:\.[0-9]+){4,}", orig)):
        assert uid not in csa


_SAFE_VALUES = {
    "DS": "1.5", "IS": "7", "CS": "SAFECODE", "LO": "SafeText", "SH": "SafeText", "LT": "SafeText",
    "FL": 1.5, "FD": 1.5, "SS": 7, "US": 7, "SL": 7, "UL": 7, "UI": "1.2.3.4.5.6.7.8.9.77", "OB": b"\x01\x02\x03\x04",
}


def _safe_value(vr: str, vm: str):
    if vr == "SQ":
        return Sequence([Dataset()])
    value = _SAFE_VALUES.get(vr, b"\x01\x02\x03\x04")  # VR left blank by the table: planted as UN
    n = int(vm) if vm.isdigit() else 1
    return [value] * n if n > 1 else value


def _find_private(ds: Dataset, group: int, creator: str, element: int):
    """The private element (group, creator, element), whatever block the creator reserved."""
    for blk in range(0x10, 0x100):
        reserved = ds.get((group << 16) | blk)
        if reserved is not None and str(reserved.value).strip().upper() == creator.strip().upper():
            return blk, ds.get((group << 16) | (blk << 8) | element)
    return None, None


@pytest.mark.parametrize("moved", [False, True], ids=["block-10", "block-moved"])
@pytest.mark.parametrize("retain", [True, False], ids=["rtnSafePrivOpt", "without"])
def test_every_safe_private_row_kept_by_creator_only_under_retain_safe_private(t1_files, tmp_path, retain, moved):
    from pacs2bids.deid.profile import read_safe_private

    rows = read_safe_private()
    assert len(rows) == 130 and all(r["source"].startswith("PS3.15 Table E.3.10-1") for r in rows)
    ds = pydicom.dcmread(t1_files[0])
    ds.remove_private_tags()
    for group in sorted({int(r["group"], 16) for r in rows}):
        for n in range(3 if moved else 0):  # other creators first: the listed ones land past block 10
            ds.private_block(group, f"ACME FILLER {n}", create=True).add_new(0x01, "LO", "filler")
    blocks = set()
    for r in rows:
        group, element = int(r["group"], 16), int(r["element"], 16)
        ds.private_block(group, r["private_creator"], create=True).add_new(element, r["vr"] or "UN", _safe_value(r["vr"], r["vm"]))
        blocks.add(_find_private(ds, group, r["private_creator"], element)[0])
    assert (0x10 in blocks) != moved
    f = tmp_path / "planted.dcm"
    ds.save_as(f)
    src = pydicom.dcmread(f)
    options = None if retain else ["rtnLongModifDatesOpt", "cleanDescOpt"]
    out = pydicom.dcmread(run(make(tmp_path, options=options), [f], tmp_path).written[0])
    assert not moved or _find_private(out, 0x0099, "ACME FILLER 0", 0x01) == (None, None)
    for r in rows:
        group, element = int(r["group"], 16), int(r["element"], 16)
        _blk, elem = _find_private(out, group, r["private_creator"], element)
        name = f'({r["group"]},"{r["private_creator"]}",{r["element"]})'
        if not retain:
            assert elem is None, name
            continue
        assert elem is not None, name
        if r["vr"] in ("DS", "IS", "FL", "FD", "SS", "US", "SL", "UL", "CS", "LO", "SH", "LT"):
            assert elem.value == _find_private(src, group, r["private_creator"], element)[1].value, name
        if r["vr"] == "UI":
            assert elem.value.startswith("2.25."), name  # kept, with a new UID


def res_bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


# -- SOP classes ------------------------------------------------------------------------------
def test_sr_pr_private_classes_and_dicomdir_are_dropped(tmp_path, corpus_dir):
    import gzip

    files = []
    for i, p in enumerate(sorted((corpus_dir / "dcm_qa_philips_dwi").rglob("*.gz"))):
        data = gzip.decompress(p.read_bytes())
        ds = pydicom.dcmread(__import__("io").BytesIO(data), stop_before_pixels=True)
        if ds.get("Modality") != "MR" or "SOPClassUID" not in ds or ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.4":
            f = tmp_path / f"x{i}.dcm"
            f.write_bytes(data)
            files.append(f)
    files.append(next(p for p in sorted((corpus_dir / "dcm_qa_xa30i").rglob("*.gz")) if True))
    sr = [p for p in sorted((corpus_dir / "dcm_qa_xa30i").rglob("*.gz"))]
    for i, p in enumerate(sr):
        data = gzip.decompress(p.read_bytes())
        if b"1.2.840.10008.5.1.4.1.1.88.22" in data[:4000]:
            f = tmp_path / f"sr{i}.dcm"
            f.write_bytes(data)
            files.append(f)
            break
    files = [f for f in files if f.suffix == ".dcm"]
    res = run(make(tmp_path), files, tmp_path)
    reasons = {r for _, r in res.dropped}
    assert "presentation state" in reasons and "private SOP class" in reasons
    assert any("structured report" in r for r in reasons)
    assert not res.written
    for name, _ in res.dropped:
        assert re.fullmatch(r"[0-9a-f]{16}", name)


def test_unreadable_file_is_quarantined_with_reason(tmp_path, t1_files):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 10)
    res = run(make(tmp_path), [bad, t1_files[0]], tmp_path)
    assert len(res.written) == 1 and len(res.quarantined) == 1
    name, reason = res.quarantined[0]
    from pacs2bids.quarantine import Quarantine

    item = Quarantine(tmp_path / "q").get(name)
    assert item.reason == reason and item.state == "pending" and item.subject == "001"
    assert Quarantine(tmp_path / "q").path(item).read_bytes() == bad.read_bytes()


# -- overlays (Clean Graphics) ------------------------------------------------------------------
def _with_overlay(sample_dir: Path, tmp_path: Path, text: str | None) -> tuple[Path, "numpy.ndarray"]:
    """A real GE image with an overlay plane (6000) holding ``text`` drawn large, and an ROI
    outline (a rectangle: graphics, not text) in a corner that the text does not reach."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    src = next((sample_dir / "dcm_qa_ge" / "In" / "01_Ax_DWI_TENSOR_R2").glob("i*"))
    ds = pydicom.dcmread(src)
    rows, cols = int(ds.Rows), int(ds.Columns)
    img = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(img)
    draw.rectangle([170, 170, 240, 240], outline=255, width=2)
    if text:
        draw.text((8, 20), text, fill=255, font=ImageFont.load_default(size=22))
    bits = (np.asarray(img) > 127).astype(np.uint8)
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", np.packbits(bits.ravel(), bitorder="little").tobytes())
    out = tmp_path / "overlay.dcm"
    ds.save_as(out)
    return out, bits


def _overlay_words(ds, tmp_path: Path) -> set[str]:
    import subprocess

    import numpy as np
    from PIL import Image

    bits = ds.overlay_array(0x6000).astype(np.uint8) * 255
    Image.fromarray(bits).resize((bits.shape[1] * 2, bits.shape[0] * 2)).save(tmp_path / "ov.png")
    text = subprocess.run(["tesseract", str(tmp_path / "ov.png"), "stdout", "--psm", "11"],
                          capture_output=True, text=True, check=True).stdout
    return {w.upper() for w in re.findall(r"[A-Za-z0-9]{4,}", text)}


@pytest.mark.skipif(not __import__("shutil").which("tesseract"), reason="tesseract is not installed")
def test_clean_graphics_clears_text_drawn_in_an_overlay_and_keeps_the_rest(sample_dir, tmp_path):
    import numpy as np

    f, planted = _with_overlay(sample_dir, tmp_path, "DURAND JEAN 1961")
    assert {"DURAND", "JEAN", "1961"} <= _overlay_words(pydicom.dcmread(f), tmp_path)  # the plant is readable

    # Basic profile (no Clean Graphics): the overlay goes, as Table E.1-1 says (60xx,3000 X)
    res = make(tmp_path / "basic").pseudonymise_series([f], tmp_path / "o1", subject="001", session=None,
                                                        quarantine_dir=tmp_path / "q")
    assert 0x60003000 not in pydicom.dcmread(res.written[0])

    # Clean Graphics: the overlay stays, its text cleared, the ROI outline untouched
    res = make(tmp_path / "graph", options=list(DEFAULT_OPTIONS) + ["cleanGraphOpt"]).pseudonymise_series(
        [f], tmp_path / "o2", subject="001", session=None, quarantine_dir=tmp_path / "q")
    out = pydicom.dcmread(res.written[0])
    kept = out.overlay_array(0x6000)
    assert not {"DURAND", "JEAN", "1961"} & _overlay_words(out, tmp_path)
    assert np.array_equal(kept[165:, 165:], planted[165:, 165:]) and kept[165:, 165:].sum() > 200
    assert kept[:60, :].sum() < planted[:60, :].sum() // 4  # the text's strokes are gone
    assert res.record["pixels"] == [{"overlay_planes": 1, "overlay_boxes_cleared": res.record["pixels"][0]["overlay_boxes_cleared"],
                                     "overlay_planes_removed": []}]
    assert res.record["pixels"][0]["overlay_boxes_cleared"] >= 1

    # an overlay with graphics only is kept bit for bit
    (tmp_path / "plain").mkdir()
    g, outline = _with_overlay(sample_dir, tmp_path / "plain", None)
    res = make(tmp_path / "graph2", options=list(DEFAULT_OPTIONS) + ["cleanGraphOpt"]).pseudonymise_series(
        [g], tmp_path / "o3", subject="001", session=None, quarantine_dir=tmp_path / "q")
    assert np.array_equal(pydicom.dcmread(res.written[0]).overlay_array(0x6000), outline)


def test_clean_graphics_removes_an_overlay_it_cannot_read(sample_dir, tmp_path, monkeypatch):
    from pacs2bids.deid import pixels

    f, _ = _with_overlay(sample_dir, tmp_path, "DURAND JEAN 1961")
    monkeypatch.setattr(pixels, "tesseract_available", lambda: False)
    res = make(tmp_path, options=list(DEFAULT_OPTIONS) + ["cleanGraphOpt"]).pseudonymise_series(
        [f], tmp_path / "o", subject="001", session=None, quarantine_dir=tmp_path / "q")
    assert not [t for t in pydicom.dcmread(res.written[0]).keys() if t.group == 0x6000]
    assert res.record["pixels"][0]["overlay_planes_removed"] == ["overlay 6000: tesseract is not installed"]


# -- key store --------------------------------------------------------------------------------
def test_key_store_encrypted_reidentify_audited(t1_files, tmp_path):
    p = make(tmp_path)
    run(p, t1_files[:2], tmp_path)
    pid = str(pydicom.dcmread(t1_files[0]).PatientID)
    for f in (tmp_path / "keys").iterdir():
        assert pid.encode() not in f.read_bytes()
    ks = KeyStore(tmp_path / "keys", project="proj", secret=SECRET)
    assert pid in ks.identifiers() and ks.subjects() == ["001"]
    info = ks.reidentify("001", reason="audit test of the key store")
    assert pid in info["patient_ids"]
    with pytest.raises(KeyError):
        ks.reidentify("999", reason="audit test of the key store")
    log = ks.audit_log()
    assert [r["what"] for r in log] == ["reidentify", "reidentify (unknown subject)"]
    assert all(r["who"] and r["when"] for r in log)
    with pytest.raises(PseudonymisationError, match="cannot be decrypted"):
        KeyStore(tmp_path / "keys", project="proj", secret=OTHER).identifiers()
    with pytest.raises(PseudonymisationError, match=r"audit\.jsonl does not verify"):
        KeyStore(tmp_path / "keys", project="proj", secret=OTHER).audit_log()
    # a new Pseudonymiser sees what earlier runs recorded
    assert pid in make(tmp_path).identifiers()


def _record(ks: KeyStore, subject: str, n: int) -> None:
    ks.record_series(
        subject,
        patient_ids=[f"IPP{subject}"],
        patient_names=[f"Name^{subject}"],
        studies={f"1.2.3.{subject}": {"accession_number": f"ACC{subject}", "study_date": "20200101", "pseudo_study_uid": "2.25.1", "session": None}},
        identifiers=[f"IPP{subject}", f"1.2.3.{subject}.{n}"],
    )


def test_key_store_record_appends_one_line_and_rewrites_nothing(tmp_path):
    ks = KeyStore(tmp_path / "keys", project="proj", secret=SECRET)
    _record(ks, "001", 1)
    journal = tmp_path / "keys" / "keys.journal"
    before = journal.read_bytes()
    _record(ks, "002", 2)
    after = journal.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1 == 2
    assert not (tmp_path / "keys" / "keys.fernet").exists()  # no snapshot rewritten per series
    assert ks.subjects() == ["001", "002"] and {"IPP001", "1.2.3.002.2"} <= ks.identifiers()


def test_key_store_legacy_single_document_still_loads(tmp_path):
    from cryptography.fernet import Fernet

    from pacs2bids.deid.keyed import fernet_key

    folder = tmp_path / "keys"
    folder.mkdir()
    legacy = {"project": "proj", "subjects": {"007": {"patient_ids": ["IPP007"], "patient_names": ["Bond^James"], "studies": {"1.2.7": {"accession_number": "A7"}}}}, "identifiers": ["IPP007", "Bond^James"]}
    (folder / "keys.fernet").write_bytes(Fernet(fernet_key(SECRET, "proj")).encrypt(json.dumps(legacy).encode()))
    ks = KeyStore(folder, project="proj", secret=SECRET)
    _record(ks, "001", 1)
    assert ks.subjects() == ["001", "007"] and {"IPP007", "Bond^James", "IPP001"} <= ks.identifiers()
    assert ks.reidentify("007", reason=WHY)["patient_names"] == ["Bond^James"]
    ks.compact()
    assert (folder / "keys.journal").read_bytes() == b""
    assert ks.subjects() == ["001", "007"] and ks.reidentify("001", reason=WHY)["patient_ids"] == ["IPP001"]


def test_key_store_compacts_when_the_journal_grows(tmp_path):
    ks = KeyStore(tmp_path / "keys", project="proj", secret=SECRET, compact_bytes=2000)
    for i in range(12):
        _record(ks, f"{i:03d}", i)
    journal = (tmp_path / "keys" / "keys.journal").read_bytes()
    assert (tmp_path / "keys" / "keys.fernet").exists() and journal.count(b"\n") < 12
    assert ks.subjects() == [f"{i:03d}" for i in range(12)]
    assert {f"1.2.3.{i:03d}.{i}" for i in range(12)} <= ks.identifiers()


def test_key_store_torn_last_line_is_ignored_then_cut(tmp_path):
    ks = KeyStore(tmp_path / "keys", project="proj", secret=SECRET)
    _record(ks, "001", 1)
    journal = tmp_path / "keys" / "keys.journal"
    with open(journal, "ab") as f:
        f.write(b"gAAAAAB-half-written-token")  # a crash mid-write: no newline, never committed
    assert ks.subjects() == ["001"]
    _record(ks, "002", 2)
    assert b"half-written" not in journal.read_bytes() and ks.subjects() == ["001", "002"]


def test_key_store_tampered_or_other_secret_is_refused(tmp_path):
    ks = KeyStore(tmp_path / "keys", project="proj", secret=SECRET)
    _record(ks, "001", 1)
    with pytest.raises(PseudonymisationError, match="cannot be decrypted"):
        KeyStore(tmp_path / "keys", project="proj", secret=OTHER).subjects()
    journal = tmp_path / "keys" / "keys.journal"
    data = bytearray(journal.read_bytes())
    data[40] = ord("A") if data[40] != ord("A") else ord("B")
    journal.write_bytes(bytes(data))
    with pytest.raises(PseudonymisationError, match="cannot be decrypted"):
        ks.identifiers()
    with pytest.raises(PseudonymisationError, match="cannot be decrypted"):
        ks.reidentify("001", reason=WHY)


def _record_many(folder: str, worker: int, n: int) -> None:
    ks = KeyStore(Path(folder), project="proj", secret=SECRET, compact_bytes=3000)
    for i in range(n):
        _record(ks, f"{worker}{i:03d}", i)


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_key_store_concurrent_writers_lose_nothing(tmp_path, kind):
    import multiprocessing
    import threading

    folder, n = str(tmp_path / "keys"), 40
    if kind == "processes":
        # spawn, not fork: the session may already run threads (Prefect's harness), and a forked
        # child can inherit one of their locks held
        ctx = multiprocessing.get_context("spawn")
        workers = [ctx.Process(target=_record_many, args=(folder, w, n)) for w in (1, 2, 3)]
    else:
        workers = [threading.Thread(target=_record_many, args=(folder, w, n)) for w in (1, 2, 3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if kind == "processes":
        assert all(w.exitcode == 0 for w in workers)
    ks = KeyStore(Path(folder), project="proj", secret=SECRET)
    expected = {f"{w}{i:03d}" for w in (1, 2, 3) for i in range(n)}
    assert set(ks.subjects()) == expected
    assert {f"1.2.3.{s}.{int(s[1:])}" for s in expected} <= ks.identifiers()
    assert (tmp_path / "keys" / "keys.fernet").exists()  # compactions ran amid the appends


def test_key_store_process_reads_only_what_others_appended_since(tmp_path, monkeypatch):
    """A series task opens the key in time proportional to what was recorded since its process
    last read it, and still sees every record another process wrote or compacted."""
    import multiprocessing

    from cryptography.fernet import Fernet

    KeyStore.forget_cache()
    folder = tmp_path / "keys"
    writer = KeyStore(folder, project="proj", secret=SECRET)
    for i in range(20):
        _record(writer, f"{i:03d}", i)
    decrypted: list[bytes] = []
    real = Fernet.decrypt
    monkeypatch.setattr(Fernet, "decrypt", lambda self, token, ttl=None: decrypted.append(token) or real(self, token, ttl))

    reader = KeyStore(folder, project="proj", secret=SECRET)
    assert len(reader.subjects()) == 20 and len(decrypted) == 20  # first read: every line
    decrypted.clear()
    _record(writer, "020", 20)  # another series task of this process
    assert "IPP020" in KeyStore(folder, project="proj", secret=SECRET).values()
    assert len(decrypted) == 1  # only the new line
    decrypted.clear()
    # the original UIDs are not cached (test_key_store_cache_does_not_grow_with_the_uids): read anew
    assert "1.2.3.020.20" in KeyStore(folder, project="proj", secret=SECRET).identifiers()
    assert len(decrypted) == 21
    decrypted.clear()
    assert "IPP020" in Pseudonymiser("proj", SECRET, PseudonymizationSettings(), folder)._values
    assert not decrypted  # nothing new: nothing decrypted

    # another process appends, then compacts the journal into a new snapshot
    proc = multiprocessing.get_context("spawn").Process(target=_record_many, args=(str(folder), 9, 30))
    proc.start()
    proc.join()
    assert proc.exitcode == 0 and (folder / "keys.fernet").exists()
    assert set(reader.subjects()) == {f"{i:03d}" for i in range(21)} | {f"9{i:03d}" for i in range(30)}
    assert {"IPP9029", "1.2.3.9029.29"} <= reader.identifiers()
    # what a caller does with the answers does not change the store's
    reader.identifiers().clear()
    reader.reidentify("001", reason=WHY)["patient_ids"].append("X")
    assert reader.reidentify("001", reason=WHY)["patient_ids"] == ["IPP001"] and len(reader.identifiers()) > 50


def test_key_store_cache_does_not_grow_with_the_uids(tmp_path):
    """What a process keeps of the key store between calls grows with the patients, not with the instances:
    the original UIDs (one per instance: 56,000 at 20 copies of the shared corpus, 18 MB cached) are read
    from the files when asked for, not kept. 200 series of 150 UIDs each: kept under 1 MB (4 MB cached)."""
    import tracemalloc

    KeyStore.forget_cache()
    ks = KeyStore(tmp_path / "keys", project="proj", secret=SECRET, compact_bytes=400_000)
    uids = {f"1.3.12.2.1107.5.2.43.66051.{s:04d}{i:04d}.{10**15 + s * 1000 + i}"
            for s in range(200) for i in range(150)}
    by_series = sorted(uids)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for s in range(200):
            ks.record_series(f"{s // 10:03d}", patient_ids=[f"IPP{s // 10:05d}"],
                             patient_names=[f"NAME{s // 10}^JEAN"],
                             studies={f"1.2.3.{s}": {"study_date": "20200101", "pseudo_study_uid": f"2.25.{s}"}},
                             identifiers=by_series[s * 150:(s + 1) * 150] + [f"IPP{s // 10:05d}"])
            assert f"IPP{s // 10:05d}" in ks.values()  # what a series reads: the cache is filled
        found = ks.identifiers()
        assert uids <= found and len(found) == len(uids) + 20
        del found
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert (tmp_path / "keys" / "keys.fernet").exists()  # compactions ran: their snapshot holds every UID
    assert kept < 1e6, f"the key store's cache kept {kept / 1e6:.1f} MB"
    KeyStore.forget_cache()
    assert uids <= KeyStore(tmp_path / "keys", project="proj", secret=SECRET).identifiers()


# -- leak scanner -----------------------------------------------------------------------------
def test_scan_for_leaks_finds_every_kind_of_place(tmp_path, t1_files):
    import nibabel as nib
    import numpy as np

    root = tmp_path / "ds"
    (root / "sub-Dupontel").mkdir(parents=True)
    (root / "notes.tsv").write_text("a\tb\nx\tMARGUERITE DUPONTEL\n")
    (root / "ok.json").write_text(json.dumps({"SeriesDescription": "T1"}))
    img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.int16), np.eye(4))
    img.header["descrip"] = b"IPP77881234"
    nib.save(img, root / "x.nii.gz")
    ds = pydicom.dcmread(t1_files[0])
    ds.private_block(0x0011, "ACME", create=True).add_new(0x01, "OB", b"\x01\x02IPP77881234\x00")
    ds.save_as(root / "a.dcm")
    hits = scan_for_leaks(root, ["Dupontel^Marguerite", "IPP77881234", "AB"])
    got = {(h.path, h.field, h.kind) for h in hits}
    assert ("sub-Dupontel", "folder name", "name") in got
    assert ("notes.tsv", "content", "text") in got
    assert ("x.nii.gz", "descrip", "nifti-header") in got
    assert any(h.path == "a.dcm" and h.kind == "dicom" and "(0011,1001)" in h.field for h in hits)
    assert not any(h.path == "ok.json" for h in hits)
    assert all(isinstance(h, LeakHit) for h in hits)
    assert scan_for_leaks(root, ["AB", "xyz"]) == []  # shorter than 4: skipped, documented


# -- dry run ----------------------------------------------------------------------------------
def test_dry_run_masks_originals(t1_files, tmp_path):
    p = make(tmp_path)
    rows = p.dry_run(t1_files[:1])
    assert rows and not (tmp_path / "out").exists()
    ds = pydicom.dcmread(t1_files[0])
    text = json.dumps(rows)
    for v in (str(ds.PatientName), str(ds.get("InstitutionAddress", "")), ds.StudyInstanceUID):
        if len(v) >= 4:
            assert v not in text
    assert any(r["attribute"] == "StudyInstanceUID" and r["action"] == "new-uid" for r in rows)


# -- properties -------------------------------------------------------------------------------
_uid_part = st.integers(min_value=1, max_value=10**9).map(str)
_uids = st.lists(_uid_part, min_size=5, max_size=8).map(lambda p: "1.2.826.0.1." + ".".join(p)).filter(lambda u: len(u) <= 64)
_dates = st.dates(min_value=__import__("datetime").date(1950, 1, 1), max_value=__import__("datetime").date(2030, 12, 31))
_ident = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=6, max_size=12)


@hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uid=_uids, d=_dates, ident=_ident, gap=st.integers(min_value=1, max_value=7200))
def test_property_determinism_and_no_leak(t1_files, tmp_path_factory, uid, d, ident, gap):
    tmp = tmp_path_factory.mktemp("prop")
    # an ident that is part of what the output holds anyway ("MODIFI" in MODIFIED) proves nothing
    baseline = run(make(tmp / "base"), [t1_files[5]], tmp, "base").written[0].read_bytes()
    assume(ident.encode() not in baseline and ident.encode() not in t1_files[5].read_bytes())
    ds = pydicom.dcmread(t1_files[5])
    ds.SeriesInstanceUID = uid
    ds.PatientName = f"{ident}^Xavier"
    ds.OtherPatientIDs = ident + "77"
    start = d.strftime("%Y%m%d") + "235500"
    end_dt = parse_dt(start) + timedelta(seconds=gap)  # may cross midnight
    ds.AcquisitionDateTime = start
    ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    ds.SharedFunctionalGroupsSequence[0].FrameAcquisitionDateTime = end_dt.strftime("%Y%m%d%H%M%S")
    ds.SharedFunctionalGroupsSequence[0].ReferencedSOPInstanceUID = uid + ".1"
    f = tmp / "in.dcm"
    ds.save_as(f)
    a = run(make(tmp), [f], tmp, "a")
    b = run(make(tmp), [f], tmp, "b")
    c = run(make(tmp / "other", secret=OTHER), [f], tmp, "c")
    assert a.pseudo_series_uid == b.pseudo_series_uid != c.pseudo_series_uid
    out_a = pydicom.dcmread(a.written[0])
    assert a.written[0].read_bytes() == b.written[0].read_bytes()
    raw = a.written[0].read_bytes()
    for secret_value in (uid, ident, ds.SOPInstanceUID, ds.StudyInstanceUID):
        assert secret_value.encode() not in raw
    got = parse_dt(out_a.SharedFunctionalGroupsSequence[0].FrameAcquisitionDateTime) - parse_dt(out_a.AcquisitionDateTime)
    assert got == timedelta(seconds=gap)


def test_default_options_are_the_research_default():
    # the documented default (docs, profile.py), written out: a change of DEFAULT_OPTIONS fails here
    assert Profile().options == ("rtnSafePrivOpt", "rtnLongModifDatesOpt", "cleanDescOpt", "cleanPixelDataOpt")
    # and it acts: dates shifted (not emptied), safe private kept, descriptors cleaned, not removed
    profile = Profile()
    assert profile.shift_dates and not profile.keep_dates
    assert profile.action(0x0008103E) == ("C", "cleanDescOpt")  # SeriesDescription
    assert profile.private_reason(0x7053, "Philips PET Private Group", 0x00) is not None
    assert Profile(options=[]).private_reason(0x7053, "Philips PET Private Group", 0x00) is None


def test_scan_for_leaks_reads_parquet_values_not_only_bytes(tmp_path):
    """A Parquet table compressed with gzip (Huffman-coded literals) hides its strings from a byte scan: the scanner
    decodes Parquet and names the column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "ds" / ".pacs2bids" / "lineage"
    root.mkdir(parents=True)
    table = pa.table({"subject": ["01", "02"] * 50, "reason": ["fine"] * 99 + ["from patient IPP77881234 again"]})
    pq.write_table(table, root / "run-x.parquet", compression="gzip", write_statistics=False)
    assert b"IPP77881234" not in (root / "run-x.parquet").read_bytes()  # the byte scan alone would pass it
    hits = scan_for_leaks(tmp_path / "ds", ["IPP77881234"])
    assert [(h.path, h.field, h.kind) for h in hits] == [(".pacs2bids/lineage/run-x.parquet", "column reason", "parquet")]
    pq.write_table(pa.table({"subject": ["01"]}), root / "run-x.parquet", compression="zstd")
    assert scan_for_leaks(tmp_path / "ds", ["IPP77881234"]) == []
    (root / "broken.parquet").write_bytes(b"PAR1" + b"\0" * 20 + b"PAR1")
    with pytest.raises(OSError, match="Parquet"):  # cannot read: must not pass
        scan_for_leaks(tmp_path / "ds", ["IPP77881234"])
