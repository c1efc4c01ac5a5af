"""Elements changed or checked on their bytes (issue 12): private creators and UIDs read from the
raw value and written back as a raw element must give what pydicom's decode, the same change and
pydicom's write give, for every padding and multi-value form, and the same keyed UIDs."""

from __future__ import annotations

from collections import Counter

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag

from pacs2bids.deid import values
from pacs2bids.deid.context import FileContext
from pacs2bids.deid.identifiers import raw_uids
from pacs2bids.deid.keyed import Keyed
from pacs2bids.deid.profile import Profile

UID_FORMS = [
    b"1.2.3.4\x00", b"1.2.3.45 ", b"1.2.3.45\x00\x00\x00", b" 1.2.3.4\\1.2.840.10008.5.1.4.1.1.4\x00\x00",
    b"1.2.840.10008.1.2.1 ", b"1.2.840.10008.1.2.1\x00", b"", b"\\ ", b"1.2.3\\\\1.2.4", b"1.2.3.4 \\1.2.5 ",
    b"2.25.1234567\xe9", b"1.2.3\x00\\1.2.4\x00",
]
CREATOR_FORMS = [b"SIEMENS CSA HEADER", b"SIEMENS CSA HEADER\x00\x00", b"SIEMENS MR HEADER ", b"GEMS_PARM_01\x00",
                 b"  PADDED IN FRONT", b"A\\B ", b"", b"Philips Imaging DD 001 "]


def _ds(tag: int, vr: str, value: bytes) -> Dataset:
    ds = Dataset()
    ds.set_original_encoding(False, True, None)
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


def _bytes(ds: Dataset, tag: int) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_data_element(fp, ds.get_item(tag), ["iso8859"])
    return fp.getvalue()


def _ctx() -> FileContext:
    return FileContext(Keyed(b"raw-test-secret-0123456789", "p"), Profile([], [], []), "01", None, Counter(), None)


@pytest.mark.parametrize("tag", [0x00081155, 0x00080016, 0x00091010])  # a public UID, a SOP class, a private UI
@pytest.mark.parametrize("raw", UID_FORMS)
def test_raw_uids_give_what_pydicom_gives(tag, raw):
    on_bytes, decoded = _ds(tag, "UI", raw), _ds(tag, "UI", raw)
    assert raw_uids(raw) == decoded[tag].value  # identifiers.collect: what convert_UI reads
    a, b = _ctx(), _ctx()
    values.uids(on_bytes, on_bytes.get_item(tag), a, "x", "why")
    values.uids(decoded, decoded[tag], b, "x", "why")
    assert on_bytes.get_item(tag).is_raw  # never decoded
    assert _bytes(on_bytes, tag) == _bytes(decoded, tag)
    assert on_bytes[tag].value == decoded[tag].value and a.notes == b.notes


@pytest.mark.parametrize("raw", CREATOR_FORMS)
def test_raw_private_creators_give_what_pydicom_gives(raw):
    on_bytes, decoded = _ds(0x00290010, "LO", raw), _ds(0x00290010, "LO", raw)
    text = decoded[0x00290010].value
    assert values.creator(on_bytes, 0x00290010, _ctx()) == (text if isinstance(text, str) else "")
    assert _bytes(on_bytes, 0x00290010) == _bytes(decoded, 0x00290010)


def test_a_creator_in_another_character_set_is_decoded_by_pydicom():
    ds = _ds(0x00290010, "LO", b"SIEMENS CSA HEADER\x00\x00")
    ctx = _ctx()
    ctx.bytes_searchable = False  # e.g. ISO 2022: pydicom decodes it
    assert values.creator(ds, 0x00290010, ctx) == "SIEMENS CSA HEADER"
    assert not ds.get_item(0x00290010).is_raw
