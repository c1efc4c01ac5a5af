"""The leak scanner's rule (pacs2bids.deid.leakscan): distinctive identifying strings are searched
in every byte; common words and short numbers only where an identity is held. Both sides, on real
files (the bundled PACSMAN sample) with identities planted in copies."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser, scan_for_leaks
from pacs2bids.deid.leakrules import build_rules, common_strings, is_common, known_words

SECRET = b"unit-test-secret-0123456789"


@pytest.fixture(scope="module")
def t1_file(sample_dir) -> Path:
    files = sorted((sample_dir / "PACSMAN_data" / "dicomseries").glob("*.dcm"))
    assert files
    return files[0]


@pytest.fixture(scope="module", autouse=True)
def word_lists():
    """The rule needs the system word lists (scripts/bootstrap.sh installs them): without them the
    scanner is stricter, and the 'does not block' half of these tests would fail, as it should."""
    asked = {"default", "head", "routine", "tech", "dupontel", "hehmri"}
    assert known_words(asked) == asked - {"dupontel", "hehmri"}, "install Debian wamerican and wfrench"


def _pseudonymiser(tmp_path: Path) -> Pseudonymiser:
    return Pseudonymiser("proj", SECRET, PseudonymizationSettings(), tmp_path / "keys")


def test_rule_sorts_strings():
    common = ("DEFAULT", "HEAD", "ROUTINE", "TECH", "Research MRI", "2339", "175689", "DEFAUT", "Head_32", "HEAD 32")
    distinctive = ("IPP77881234", "Dupontel", "Hélène", "19630715", "SN4471932", "HEHMRI7",
                   # an ID written from common parts and a short number is distinctive as a whole
                   "GATE-PID-551177", "IPP-2024-0042", "head_32_551177")
    assert common_strings(common + distinctive) == set(common)
    assert is_common("Research MRI") and not is_common("Research Dupontel")  # one string: the lists read for it
    rules = build_rules(["DEFAULT^MARIE"])
    assert rules.common == {"default", "marie"}  # each part alone is a common word ...
    assert {"MARIE DEFAULT", "DEFAULT, MARIE", "DEFAULT^MARIE", "Marie_Default".upper()} <= {s.upper() for s in rules.distinctive}


def test_common_words_of_removed_attributes_do_not_block(t1_file, tmp_path):
    """The failure of issue 9: values of removed attributes that are ordinary words ("DEFAULT" in a
    department, "HEAD" as a phantom's name, "ROUTINE", "TECH") hit the product's own words
    ("pacs2bids default" in every de-identification record), kept descriptions and coil names."""
    ds = pydicom.dcmread(t1_file)
    ds.InstitutionalDepartmentName = "DEFAULT"
    ds.PatientName = "HEAD"
    ds.OperatorsName = "TECH"
    ds.RequestedProcedureID = "ROUTINE"
    ds.StudyID = "2339"
    ds.SeriesDescription = "HEAD ROUTINE"
    src = tmp_path / "in.dcm"
    ds.save_as(src)
    p = _pseudonymiser(tmp_path)
    out = tmp_path / "ds"
    res = p.pseudonymise_series([src], out / "sourcedata", subject="001", session=None, quarantine_dir=tmp_path / "q")
    assert res.written
    (out / "record.json").write_text(json.dumps(res.record, indent=1))
    assert "pacs2bids default" in (out / "record.json").read_text()
    (out / "sub-001_T1w.json").write_text(json.dumps(
        {"SeriesDescription": "HEAD ROUTINE", "ReceiveCoilName": "Head_32", "ProtocolName": "t1 default tech",
         "AcquisitionTime": "10:23:39.000000", "started": "2339 files"}))
    ids = p.identifiers()
    assert {"DEFAULT", "HEAD", "TECH", "ROUTINE"} <= ids
    assert scan_for_leaks(out, ids) == []


def test_common_name_is_caught_next_to_its_other_part_or_in_a_name_field(t1_file, tmp_path):
    """A patient named DEFAULT^MARIE: both parts are words, so neither alone is searched in free
    text; the full name is, in any order, case and separator, and either part in an identity field."""
    ident = ["DEFAULT^MARIE"]
    root = tmp_path / "ds"
    root.mkdir()
    (root / "README").write_text("pacs2bids default profile; Marie Curie was born in Warsaw")
    assert scan_for_leaks(root, ident) == []
    for i, text in enumerate(["exam of Marie Default", "DEFAULT, MARIE", "default marie", "dossier DEFAULT^MARIE"]):
        (root / f"note{i}.txt").write_text(text)
        assert [(h.path, h.kind) for h in scan_for_leaks(root, ident)] == [(f"note{i}.txt", "text")], text
        (root / f"note{i}.txt").unlink()
    (root / "sub-01_Marie_Default.txt").write_text("x")
    assert [h.field for h in scan_for_leaks(root, ident)] == ["file name"]
    (root / "sub-01_Marie_Default.txt").unlink()
    # in a sidecar field named after an identity attribute
    (root / "a.json").write_text(json.dumps({"SeriesDescription": "default", "InstitutionalDepartmentName": "Default"}))
    assert [(h.path, h.field) for h in scan_for_leaks(root, ident)] == [("a.json", "InstitutionalDepartmentName")]
    (root / "a.json").unlink()
    # in DICOM name fields, at depth and in a private block, in any case
    ds = pydicom.dcmread(t1_file)
    ds.PatientName = "Marie"
    item = Dataset()
    item.RequestingPhysician = "default"
    ds.RequestAttributesSequence = Sequence([item])
    ds.private_block(0x0033, "HOSPITAL RIS 1.0", create=True).add_new(0x13, "PN", "DÉFAULT^Anne")
    ds.SeriesDescription = "default head"
    ds.save_as(root / "a.dcm")
    fields = {h.field for h in scan_for_leaks(root, ident)}
    assert fields == {"PatientName", "RequestAttributesSequence[0].RequestingPhysician", "(0033,1013)"}
    # an accented spelling alone in a Latin-1 file (the file is read because the pattern lists it)
    ds = pydicom.dcmread(t1_file)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.OperatorsName = "Désiré"
    ds.save_as(root / "a.dcm")
    assert [h.field for h in scan_for_leaks(root, ["Désiré^Jean"])] == ["OperatorsName"]


def test_short_numbers_only_in_identity_fields(t1_file, tmp_path):
    """A 4 to 6 digit ID or serial looks like a year, a size or a time: it is found only where it was."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "summary.json").write_text(json.dumps({"started": "2339-12-01T10:00:00", "size": 17240}))
    assert scan_for_leaks(root, ["2339", "17240"]) == []
    (root / "sub-01_T1w.json").write_text(json.dumps({"DeviceSerialNumber": "17240"}))
    assert [h.field for h in scan_for_leaks(root, ["2339", "17240"])] == ["DeviceSerialNumber"]
    (root / "sub-01_T1w.json").unlink()
    ds = pydicom.dcmread(t1_file)
    ds.StudyID = "2339"
    ds.save_as(root / "a.dcm")
    assert [h.field for h in scan_for_leaks(root, ["2339", "17240"])] == ["StudyID"]


_PLANTED = ["Bellefontaine^Joséphine", "IPP77881234", "19630715", "ACC98127364", "Hopital Edouard Herriot",
            "12 rue des Lilas 69003 Lyon", "HEHMRI7", "SN4471932", "DEFAULT^MARIE",
            "GATE-PID-551177"]
_PLACES = ["header", "nested", "private-pn", "private-ob", "free-text", "file-meta"]


@pytest.mark.parametrize(("where", "value"), [
    (w, v) for w in _PLACES for v in _PLANTED
    if w != "file-meta" or ("^" not in v and len(v) <= 16)  # an AE title: 16 characters, no name
])
def test_planted_identity_is_caught_everywhere(t1_file, tmp_path, where, value):
    """Every kind of identity, planted raw (not pseudonymised) in a real file, is found by the scanner
    given that value alone (what the key store holds)."""
    ds = pydicom.dcmread(t1_file)
    pn = "^" in value
    if where == "header":
        setattr(ds, "ReferringPhysicianName" if pn else "InstitutionName", value)
    elif where == "nested":
        item = Dataset()
        if pn:
            item.RequestingPhysician = value
        elif len(value) > 16:
            item.RequestedProcedureDescription = value
        else:
            item.RequestedProcedureID = value
        ds.RequestAttributesSequence = Sequence([item])
    elif where == "private-pn":
        ds.private_block(0x0033, "HOSPITAL RIS 1.0", create=True).add_new(0x13, "PN" if pn else "LO", value)
    elif where == "private-ob":
        ds.private_block(0x0041, "ACME", create=True).add_new(0x02, "OB", b"\x00\x01" + value.encode("latin-1") + b"\x00")
    elif where == "free-text":
        written = value.replace("^", " ").upper() if pn else value
        ds.ImageComments = f"exam of {written} again"
    else:
        ds.file_meta.SourceApplicationEntityTitle = value
    root = tmp_path / "ds"
    root.mkdir()
    ds.save_as(root / "a.dcm")
    hits = scan_for_leaks(root, [value])
    assert hits and all(h.path == "a.dcm" and h.kind == "dicom" for h in hits), (where, value, hits)


def _fragment(raw: bytes, values_text: str) -> str | None:
    """A distinctive alphanumeric run that the compressed bytes hold between two non-alphanumeric
    bytes, and that no decoded value holds as a whole word: a match by chance."""
    runs = [m.group().decode() for m in re.finditer(rb"(?<![A-Za-z0-9])[A-Za-z0-9]{5,12}(?![A-Za-z0-9])", raw)]
    common = common_strings(runs)
    for s in runs:
        if s in common or re.search(rf"(?<![A-Za-z0-9]){s}(?![A-Za-z0-9])", values_text, re.I):
            continue
        return s
    return None


def test_parquet_of_hex_digests_does_not_match_by_chance(tmp_path):
    """The DICOMweb false block of issue 9: the compressed pages of a lineage table full of hex
    digests hold short runs of characters that match an identifier by chance. Values are read
    decoded; a real identifier in a value is still caught, by column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "ds" / ".pacs2bids" / "lineage"
    root.mkdir(parents=True)
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    table = pa.table({"sha256": digests, "keyed": [hashlib.sha256(d.encode()).hexdigest() for d in digests],
                      "size": list(range(3000)), "path": [f"sourcedata/sub-01/{d[:12]}.dcm" for d in digests]})
    path = root / "instances-x.parquet"
    pq.write_table(table, path, compression="snappy")
    raw = path.read_bytes()
    values_text = "\n".join(str(v) for col in table.columns for v in col.to_pylist())
    chance = _fragment(raw, values_text)
    assert chance, "no chance match in these bytes: the test proves nothing"
    rules = build_rules([chance], keep_strings=True)
    assert rules.pattern.search(raw)  # a scan of the raw bytes would block the run
    assert scan_for_leaks(tmp_path / "ds", [chance]) == []
    # a real identifier in a value is still caught, by column, with its statistics
    leaky = table.set_column(3, "path", pa.array([f"sourcedata/IPP77881234/{d[:12]}.dcm" for d in digests]))
    pq.write_table(leaky, path, compression="snappy")
    got = {h.field for h in scan_for_leaks(tmp_path / "ds", [chance, "IPP77881234"])}
    assert got == {"column path", "statistics"}


def test_deid_record_names_attributes_never_values(t1_file, tmp_path):
    """The de-identification record names attributes and actions: a private creator's text is
    raw header text, so removed private blocks are named by group and block only."""
    ds = pydicom.dcmread(t1_file)
    ds.private_block(0x0041, "DUPONTEL HOSPITAL RIS", create=True).add_new(0x01, "LO", "x")
    ds.InstitutionalDepartmentName = "Neuroradiologie Bellefontaine"
    ds.PatientName = "Bellefontaine^Josephine"
    src = tmp_path / "in.dcm"
    ds.save_as(src)
    p = _pseudonymiser(tmp_path)
    res = p.pseudonymise_series([src], tmp_path / "out", subject="001", session=None, quarantine_dir=tmp_path / "q")
    text = json.dumps(res.record)
    assert "(0041,10xx)" in res.record["attributes"]
    for v in ("DUPONTEL", "Bellefontaine", "Josephine", "Neuroradiologie"):
        assert v.lower() not in text.lower(), v
    root = tmp_path / "rec"
    root.mkdir()
    (root / "record.json").write_text(text)
    assert scan_for_leaks(root, p.identifiers()) == []


def test_class_uids_kept_by_the_pseudonymiser_are_no_hit(t1_file, tmp_path):
    """A private SOP class UID (Siemens CSA non-image, 1.3.12.2.1107.5.9.1, in the corpus's CT) is
    collected as a non-standard UID but kept on purpose (it names a kind of object): found only
    there, it is no hit; the same value anywhere else still is."""
    ds = pydicom.dcmread(t1_file)
    item = Dataset()
    item.ReferencedSOPClassUID = "1.3.12.2.1107.5.9.1"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.SourceImageSequence = Sequence([item])
    root = tmp_path / "ds"
    root.mkdir()
    ds.save_as(root / "a.dcm")
    assert scan_for_leaks(root, ["1.3.12.2.1107.5.9.1"]) == []
    ds.ImageComments = "from 1.3.12.2.1107.5.9.1"
    ds.save_as(root / "a.dcm")
    assert [h.field for h in scan_for_leaks(root, ["1.3.12.2.1107.5.9.1"])] == ["ImageComments"]
