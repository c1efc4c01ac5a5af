"""Write a pseudonymised file: the same bytes as pydicom's ``save_as(path, enforce_file_format=True)``,
with the elements left undecoded copied as they were read.

pydicom writes every element through the same general function (a buffer, checks and look-ups per
element), which costs as much as reading the file. Most elements of a pseudonymised file are kept
unread (:mod:`pacs2bids.deid.walk`): their header is packed here and their value bytes copied.
Everything else is pydicom's own code: the File Meta Information, each decoded element (UIDs,
dates, texts that were changed, Pixel Data), every dataset written in another encoding than
explicit VR little endian or with a changed character set, and whole files in a transfer syntax
other than an explicit VR little endian one (implicit VR, big endian, deflated: written by
``save_as``). Sequences are walked here, their items' lengths computed as pydicom does.
"""

from __future__ import annotations

from pathlib import Path
from struct import Struct

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32 as LONG_VRS  # 4-byte length (PS3.5 7.1.2)

from .context import str_of

_SHORT = Struct("<HH2sH")  # tag, VR, 2-byte length
_LONG = Struct("<HH2sHL")  # tag, VR, reserved, 4-byte length
_UL = Struct("<L")
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF
_EXPLICIT_LE = (False, True)


def save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` to ``path`` as ``ds.save_as(path, enforce_file_format=True)`` would, byte for byte."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not _fast(ds, meta, ts):
        ds.save_as(path, enforce_file_format=True)
        return
    pixels = ds._dict.get(0x7FE00010)
    if pixels is not None and not _native_raw(pixels, ts):
        # as dcmwrite does (PS3.5 A.4): encapsulated data has an undefined length
        ds["PixelData"].is_undefined_length = ts.is_compressed
    head = DicomBytesIO()
    head.is_implicit_VR, head.is_little_endian = _EXPLICIT_LE
    head.write(getattr(ds, "preamble", None) or b"\x00" * 128)
    head.write(b"DICM")
    parts = [head.getvalue(), _meta(meta)]
    _dataset(parts, ds, default_encoding)
    with open(path, "wb") as f:
        f.writelines(parts)


def _native_raw(elem, ts) -> bool:
    """Native Pixel Data still raw, of a defined even length: pydicom would write it as it was read
    (its length defined, no padding), so it is copied undecoded (:func:`_raw`)."""
    return (isinstance(elem, RawDataElement) and not ts.is_compressed and elem.length != _UNDEFINED
            and isinstance(elem.value, bytes) and not len(elem.value) % 2 and elem.VR in ("OB", "OW"))


def _meta(meta) -> bytes:
    """``write_file_meta_info(enforce_standard=True)``: checked (and completed) by pydicom, its
    elements written one by one by pydicom, the group length first. Raw elements (a File Meta
    Information as read) are left to ``write_file_meta_info``."""
    if any(isinstance(e, RawDataElement) for e in meta._dict.values()):
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = _EXPLICIT_LE
        write_file_meta_info(fp, meta, enforce_standard=True)
        return fp.getvalue()
    validate_file_meta(meta, enforce_standard=True)
    body = b"".join(_by_pydicom(write_data_element, meta[t], default_encoding)
                    for t in sorted(meta.keys()) if t != 0x00020000)
    return _SHORT.pack(2, 0, b"UL", 4) + _UL.pack(len(body)) + body


def copies_raw(ds: Dataset) -> bool:
    """True when :func:`save` will copy the raw elements of ``ds`` as they are: it was read in explicit
    VR little endian, its transfer syntax is one (not deflated) and its character set is unchanged."""
    meta = getattr(ds, "file_meta", None)
    return (ds.original_encoding == _EXPLICIT_LE and ds.original_character_set == ds._character_set
            and meta is not None and _explicit_le(meta.get("TransferSyntaxUID")))


def _explicit_le(ts) -> bool:
    return (ts is not None and not ts.is_private and ts.is_transfer_syntax and not ts.is_implicit_VR
            and ts.is_little_endian and ts != DeflatedExplicitVRLittleEndian)


def _fast(ds: Dataset, meta, ts) -> bool:
    """True when the file is written in explicit VR little endian (not deflated) and ``save_as`` would
    change nothing of its File Meta Information but its group length (else ``save_as`` writes it)."""
    if meta is None or not _explicit_le(ts):
        return False
    if any(t >> 16 in (0, 2) for t in ds._dict) or len(getattr(ds, "preamble", None) or b"\x00" * 128) != 128:
        return False
    for meta_kw, ds_tag in (("MediaStorageSOPClassUID", 0x00080016), ("MediaStorageSOPInstanceUID", 0x00080018)):
        held, own = meta.get(meta_kw), str_of(ds, ds_tag)  # read from the bytes: left raw
        if held is None or (own and own != held):
            return False
    return True


def _dataset(parts: list, ds: Dataset, parent_encoding) -> None:
    """``pydicom.filewriter.write_dataset`` into ``parts``: elements in tag order, no group lengths
    beyond group 6; a dataset in another encoding or character set is pydicom's."""
    if ds.original_encoding != _EXPLICIT_LE or ds.original_character_set != ds._character_set:
        parts.append(_by_pydicom(write_dataset, ds, parent_encoding))
        return
    encoding = ds.get("SpecificCharacterSet", parent_encoding)
    d = ds._dict
    for tag in sorted(d, key=int):  # plain int comparisons (BaseTag.__lt__ is Python)
        if not tag & 0xFFFF and tag >> 16 > 6:
            continue
        elem = d[tag]
        if isinstance(elem, RawDataElement):
            if elem.value is None:  # a deferred read: pydicom reads it
                elem = ds.get_item(tag)
            elif _raw(parts, elem):
                continue
        element(parts, elem, encoding)


def element(parts: list, elem: DataElement, encoding) -> None:
    """A decoded element as ``write_data_element`` writes it in a dataset of ``encoding``."""
    if elem.VR == "SQ" and isinstance(elem, DataElement):
        _sequence(parts, elem, encoding)
    else:
        parts.append(_by_pydicom(write_data_element, elem, encoding))


def _raw(parts: list, elem: RawDataElement) -> bool:
    """An undecoded element: its header packed, its bytes copied. False when pydicom must write it
    (no two-letter VR, an undefined length, a value too long for a 2-byte length)."""
    vr, value = elem.VR, elem.value
    if vr is None or len(vr) != 2 or elem.length == _UNDEFINED or not isinstance(value, bytes):
        return False
    tag, n = elem.tag, len(value)
    if vr in LONG_VRS:
        parts.append(_LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, n))
    elif n > 0xFFFF:
        return False
    else:
        parts.append(_SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), n))
    parts.append(value)
    return True


def _sequence(parts: list, elem: DataElement, encoding) -> None:
    """``write_data_element`` of a decoded sequence: items of defined length unless read
    undefined, the sequence's length undefined when it was read so."""
    body: list[bytes] = []
    if not elem.is_empty:
        encodings = convert_encodings(encoding or [default_encoding])
        for item in elem.value:
            item_parts: list[bytes] = []
            _dataset(item_parts, item, encodings)
            if getattr(item, "is_undefined_length_sequence_item", False):
                body += [_ITEM, _UL.pack(_UNDEFINED), *item_parts, _ITEM_END]
            else:
                body += [_ITEM, _UL.pack(sum(map(len, item_parts))), *item_parts]
    undefined = elem.is_undefined_length
    tag = elem.tag
    parts.append(_LONG.pack(tag >> 16, tag & 0xFFFF, b"SQ", 0, _UNDEFINED if undefined else sum(map(len, body))))
    parts += body
    if undefined:
        parts.append(_SEQUENCE_END)


def _by_pydicom(fn, what, encoding) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = _EXPLICIT_LE
    fn(buffer, what, encoding)
    return buffer.getvalue()
