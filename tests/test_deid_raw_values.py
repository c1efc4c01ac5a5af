"""Values read and changed on their bytes (issue 12, session 14): dates (DA, DT), Patient's Birth
Date, action Z, and the string values read by collecting identifiers, the pixel risk check and the
batch. Each fast path must give what pydicom's decode, the same change and pydicom's write give;
and a whole file with planted identifiers (names, IDs, DA/DT/TM dates, nested sequences, private
tags) must come out byte for byte as by the general path (every value decoded by pydicom)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import batch, context, identifiers, pixels, values, walk
from pacs2bids.deid.batch import Known, SeriesJob, deid_batch
from pacs2bids.deid.context import FileContext, raw_value
from pacs2bids.deid.keyed import Keyed
from pacs2bids.deid.profile import Profile
from test_deid_raw import _bytes, _ds

DATE_FORMS = [b"20240131", b"20240131 ", b"20240131\x00\x00", b" 20240131", b"20240131\\19991231", b"20240131\\",
              b"", b" ", b"2024", b"not-a-date", b"20240230", b"20240101-20240301", b"2024.01.31",
              b"20240131\\\\20240201 ", b"2024\xe9"]
DT_FORMS = [b"20240131101112.123456", b"20240131101112+0100 ", b"202401", b"2024013123", b"20241231235959-1200",
            b"20240131\\20240201083000 ", b"", b"x2024", b"20240131101112.1\x00\x00"]
TEXT_FORMS = [b"PLAIN", b"PLAIN ", b" LEAD", b"A\\B ", b"A \\ B\x00", b"", b"  ", b"caf\xe9 ", b"ESC\x1b$B",
              b"Doe^John", b"Doe^John\\Roe^Jane ", b"Y=Z", b"1.2.3.4\x00", b"Doe\x00^J "]
PROFILES = {"shift": None, "keep": ["rtnLongFullDatesOpt", "cleanDescOpt"], "none": ["cleanDescOpt"]}


def _ctx(options) -> FileContext:
    return FileContext(Keyed(b"raw-test-secret-0123456789", "p"), Profile(options, [], []), "01", None, Counter(),
                       None)


@pytest.mark.parametrize("vr", ["DA", "DT", "TM", "CS", "AS", "UI", "SH", "LO", "PN"])
@pytest.mark.parametrize("raw", DATE_FORMS + DT_FORMS + TEXT_FORMS)
def test_raw_value_is_what_pydicom_decodes(vr, raw):
    tag = 0x00081030
    ds = _ds(tag, vr, raw)
    got = raw_value(ds.get_item(tag), searchable=True)
    value = ds[tag].value
    if got is None:  # left to pydicom: only text beyond plain ASCII (or a PN with components)
        assert vr in ("SH", "LO", "PN")
        return
    want = [str(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) else str(value)
    assert got == want


def test_raw_value_leaves_text_to_pydicom_in_other_character_sets():
    ds = _ds(0x00100020, "LO", b"ID123 ")
    assert raw_value(ds.get_item(0x00100020), searchable=False) is None
    assert raw_value(ds.get_item(0x00100020), searchable=True) == "ID123"


def test_raw_value_is_off_when_pydicom_checks_raise():
    """In RAISE mode pydicom may refuse a value on decoding: that refusal must still happen."""
    ds = _ds(0x00080020, "DA", b"20240131")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pydicom.config.settings, "_reading_validation_mode", pydicom.config.RAISE)
        assert raw_value(ds.get_item(0x00080020)) is None
    assert raw_value(ds.get_item(0x00080020)) == "20240131"


@pytest.mark.parametrize("options", list(PROFILES.values()), ids=list(PROFILES))
@pytest.mark.parametrize("vr,raw", [("DA", r) for r in DATE_FORMS] + [("DT", r) for r in DT_FORMS])
def test_raw_dates_give_what_pydicom_gives(options, vr, raw):
    on_bytes, decoded = _ds(0x00080020, vr, raw), _ds(0x00080020, vr, raw)
    a, b = _ctx(options), _ctx(options)
    walk._date(on_bytes, on_bytes.get_item(0x00080020), a, 0, "StudyDate", "why", walk.DEFAULT, False)
    walk._date(decoded, decoded[0x00080020], b, 0, "StudyDate", "why", walk.DEFAULT, False)
    assert _bytes(on_bytes, 0x00080020) == _bytes(decoded, 0x00080020)
    assert a.notes == b.notes and a.dates_shifted == b.dates_shifted
    if a.profile.shift_dates:
        assert on_bytes.get_item(0x00080020).is_raw  # shifted on its bytes, never decoded
    a, b = _ctx(options), _ctx(options)  # action D: the fallback without a dates option
    on_bytes, decoded = _ds(0x00080020, vr, raw), _ds(0x00080020, vr, raw)
    walk._date(on_bytes, on_bytes.get_item(0x00080020), a, 0, "StudyDate", "why", walk.REPLACE, False)
    walk._date(decoded, decoded[0x00080020], b, 0, "StudyDate", "why", walk.REPLACE, False)
    assert _bytes(on_bytes, 0x00080020) == _bytes(decoded, 0x00080020) and a.notes == b.notes
    assert on_bytes.get_item(0x00080020).is_raw


@pytest.mark.parametrize("options", list(PROFILES.values()), ids=list(PROFILES))
@pytest.mark.parametrize("raw", DATE_FORMS)
def test_raw_birth_dates_give_what_pydicom_gives(options, raw):
    on_bytes, decoded = _ds(0x00100030, "DA", raw), _ds(0x00100030, "DA", raw)
    a, b = _ctx(options), _ctx(options)
    values.birth_date(on_bytes, on_bytes.get_item(0x00100030), a)
    values.birth_date(decoded, decoded[0x00100030], b)
    assert _bytes(on_bytes, 0x00100030) == _bytes(decoded, 0x00100030) and a.notes == b.notes
    assert on_bytes.get_item(0x00100030).is_raw == (b"\\" not in raw)


@pytest.mark.parametrize("vr", sorted(values._EMPTY_RAW))
def test_action_z_on_bytes_gives_what_pydicom_gives(vr):
    raw = {"DS": b"1.5 ", "IS": b"12", "UI": b"1.2.3\x00"}.get(vr, b"Doe^John")
    on_bytes, decoded = _ds(0x00081030, vr, raw), _ds(0x00081030, vr, raw)
    a, b = _ctx(None), _ctx(None)
    walk._act(on_bytes, on_bytes.get_item(0x00081030), a, 0, "Z", "why")
    decoded[0x00081030]  # decoded first: the general path
    walk._act(decoded, decoded.get_item(0x00081030), b, 0, "Z", "why")
    assert on_bytes.get_item(0x00081030).is_raw
    assert _bytes(on_bytes, 0x00081030) == _bytes(decoded, 0x00081030) == _bytes(_ds(0x00081030, vr, b""), 0x00081030)
    assert a.notes == b.notes


def _cleaned_both_ways(tag, vr, raw, options, why, private):
    """The element cleaned on its bytes, then by the general path (the fast paths off): both
    datasets and both contexts."""
    from pacs2bids.deid.patterns import compile_identifiers, date_tokens

    on_bytes, decoded = _ds(tag, vr, raw), _ds(tag, vr, raw)
    contexts = []
    for ds in (on_bytes, decoded):  # the second by the general path: the fast paths off
        ctx = _ctx(options)
        ctx.pattern, ctx.dates = compile_identifiers({"PLANTED-ID-7731"}), date_tokens({"20230417", "20230418"})
        with pytest.MonkeyPatch.context() as mp:
            if ds is decoded:
                _general(mp)
            walk._clean(ds, ds.get_item(tag), ctx, 0, "x", why, private=private)
        contexts.append(ctx)
    return on_bytes, decoded, contexts


BINARY_FORMS = [b"\x80\x01 1.2.3.4.5.6.7.8.9 \xff\x00", b"\x80\x01 1.2.3.4.5.6.7.8.9 \xff\x00\x00", b"\x80 PLANTED-ID-7731 at 20230417 \x00", b"plain ascii 20230417",
                b"\x80\x01\x02", b"", b"\x81 1.2.840.10008.5.1.4.1.1.4 \x00", b"\x90 20230417\\20230418 \x00\x00"]


@pytest.mark.parametrize("options", list(PROFILES.values()), ids=list(PROFILES))
@pytest.mark.parametrize("private", [False, True])
@pytest.mark.parametrize("vr", ["OB", "OW"])
@pytest.mark.parametrize("raw", BINARY_FORMS)
def test_binary_values_scrubbed_on_bytes_give_what_pydicom_gives(options, private, vr, raw):
    tag, why = 0x00111004 if private else 0x00081030, "settings.keep_private" if private else "basicProfile C"
    on_bytes, decoded, contexts = _cleaned_both_ways(tag, vr, raw, options, why, private)
    assert contexts[0].notes == contexts[1].notes
    if tag in on_bytes:
        assert _bytes(on_bytes, tag) == _bytes(decoded, tag)
    else:
        assert tag not in decoded
    if raw and not (private and raw.isascii()) and not len(raw) % 2:
        assert on_bytes.get_item(tag).is_raw and b"PLANTED-ID-7731" not in on_bytes.get_item(tag).value


CLEANED_TEXT_FORMS = [b"MPRAGE", b"MPRAGE ", b"1234.5\\0\\77777 ", b"PLANTED-ID-7731", b"seen on 20230417", b"20230417",
                      b"20230417\\20230418", b"1.2.826.0.1.3680043.2.1125.1 ", b"call +33 6 12 34 56 78", b"a@b.org",
                      b"", b" \\ ", b"caf\xe9", b"T1 \\ 12345 \x00"]


@pytest.mark.parametrize("options", list(PROFILES.values()), ids=list(PROFILES))
@pytest.mark.parametrize("private", [False, True])
@pytest.mark.parametrize("vr", ["SH", "LO", "CS"])
@pytest.mark.parametrize("raw", CLEANED_TEXT_FORMS)
def test_text_checked_on_bytes_gives_what_pydicom_gives(options, private, vr, raw):
    tag, why = (0x00111002, "settings.keep_private") if private else (0x00081030, "basicProfile C")
    on_bytes, decoded, contexts = _cleaned_both_ways(tag, vr, raw, options, why, private)
    assert contexts[0].notes == contexts[1].notes
    assert (tag in on_bytes) == (tag in decoded)
    if tag in on_bytes:
        assert _bytes(on_bytes, tag) == _bytes(decoded, tag)
    if raw == b"1234.5\\0\\77777 ":
        assert on_bytes.get_item(tag).is_raw  # nothing to change: checked on its bytes, never decoded


# ---- a whole file: planted identifiers, the fast paths against the general path ----

NAME, PID, OTHER_ID, ACCESSION, INSTITUTION = "Planted^Patient", "PLANTED-ID-7731", "OTHER-ID-5512", "ACC-998877", "St Plant Hospital"


def _planted(src: Path, out: Path, syntax=ExplicitVRLittleEndian) -> Path:
    ds = pydicom.dcmread(src)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs = NAME, PID, OTHER_ID
    ds.PatientBirthDate, ds.PatientSex = "19710613", "F"
    ds.AccessionNumber, ds.StudyID, ds.InstitutionName = ACCESSION, "ST-4455", INSTITUTION
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyDate, ds.SeriesDate, ds.ContentDate = "20230417", "20230417 ", "20230418\\20230419"
    ds.StudyTime, ds.AcquisitionDateTime = "101112.5", "20230417101112.123+0200"
    ds.StudyDescription = f"scan of {NAME} at {INSTITUTION} on 20230417"
    item = Dataset()
    item.PatientID, item.AccessionNumber, item.IssuerOfPatientID = PID, ACCESSION, "ISSUER-X"
    item.StudyDate, item.ScheduledProcedureStepStartDate = "20230417", "20230416"
    item.ScheduledPerformingPhysicianName = "Nurse^Nina"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    inner = Dataset()
    inner.AcquisitionDateTime, inner.ContentDate = "20230417080000", "20230417"
    item.ReferencedImageSequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([item])
    ds.add_new(0x00110010, "LO", "PLANTED KEPT")
    ds.add_new(0x00111001, "DA", "20230417")
    ds.add_new(0x00111002, "LO", f"note {PID} 20230417")
    ds.add_new(0x00111003, "DT", "20230417101112")
    ds.add_new(0x00111004, "OB", b"\x80\x01 " + PID.encode() + b" 1.2.3.4.5.6.7.8.9 20230417 \xff\x00")
    ds.add_new(0x00130010, "LO", "PLANTED DROPPED")
    ds.add_new(0x00131001, "LO", NAME)
    ds.file_meta.TransferSyntaxUID = syntax
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)
    return out


def _general(mp: pytest.MonkeyPatch) -> None:
    """Every fast path of this session off: each value decoded and written by pydicom."""
    for module in (context, identifiers, values, walk, pixels, batch):
        mp.setattr(module, "raw_value", lambda elem, searchable=False: None)
    mp.setattr(values, "empty_raw", lambda ds, elem: False)
    mp.setattr(values, "binary_raw", lambda *args: False)
    mp.setattr(values, "text_raw", lambda *args: False)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("options", list(PROFILES.values()), ids=list(PROFILES))
def test_planted_file_same_bytes_by_both_paths(tmp_path, sample_dir, options, syntax):
    src = sorted((sample_dir / "dcm_qa_nih").rglob("*.dcm"))[0]
    planted = _planted(src, tmp_path / "in" / "planted.dcm", syntax)
    settings = PseudonymizationSettings(keep_private=['0011,"PLANTED KEPT",01', '0011,"PLANTED KEPT",02',
                                                      '0011,"PLANTED KEPT",03', '0011,"PLANTED KEPT",04'],
                                        **({} if options is None else {"options": options}))
    outputs = {}
    for path in ("fast", "general"):
        out = tmp_path / path
        out.mkdir()
        job = SeriesJob(f"planted-{path}-{options}-{syntax}", "p", b"raw-test-secret-0123456789", settings, "01", None, out,
                        Known(frozenset(), frozenset()))
        with pytest.MonkeyPatch.context() as mp:
            if path == "general":
                _general(mp)
            result = deid_batch(job, [(0, str(planted))])
        kind, detail = result.files[0][1], result.files[0][3]
        assert kind == "written", detail
        outputs[path] = ((out / detail).read_bytes(), result.notes, result.identifiers, result.dates)
    assert outputs["fast"] == outputs["general"]
    data = outputs["fast"][0]
    for planted_value in (NAME, PID, OTHER_ID, ACCESSION, INSTITUTION, "ISSUER-X", "Referrer", "Nurse", "ST-4455",
                          "1.2.3.4.5.6.7.8.9", "19710613"):
        assert planted_value.encode() not in data
    if options is None or "rtnLongFullDatesOpt" not in options:
        assert b"20230417" not in data and b"20230416" not in data


def test_the_fast_paths_leave_dates_and_emptied_values_undecoded(tmp_path, sample_dir, monkeypatch):
    """What this session changed: dates shifted, values emptied and values collected on their bytes."""
    src = sorted((sample_dir / "dcm_qa_nih").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(_planted(src, tmp_path / "planted.dcm"))
    seen: list[Dataset] = []
    monkeypatch.setattr(batch, "save", lambda d, path: seen.append(d))
    job = SeriesJob("undecoded", "p", b"raw-test-secret-0123456789", PseudonymizationSettings(), "01", None, tmp_path,
                    Known(frozenset(), frozenset()))
    batch.deid_batch(job, [(0, str(tmp_path / "planted.dcm"))])
    (done,) = seen
    for tag in (0x00080020, 0x00080021, 0x00080023, 0x0008002A, 0x00100030, 0x00080050, 0x00080090, 0x00200010,
                0x00080016, 0x00080018, 0x0020000D):
        assert isinstance(done._dict[Tag(tag)], RawDataElement), f"{tag:08X} decoded"
    assert ds.StudyDate == "20230417" and done.StudyDate != "20230417"
