"""What de-identification sets on every file (PS3.15 E.1.1, E.3.6) and its rebuilt File Meta
Information (PS3.10 7.1), after the walk (:mod:`pacs2bids.deid.walk`).

The attributes are the same for every file of a subject with one profile: in a file that
:mod:`pacs2bids.deid.writer` copies raw (explicit VR little endian), they are encoded once per
subject, profile and character set, by pydicom, and set as raw elements (never decoded nor encoded
again per file). Elsewhere, and in a dry run, they are set as pydicom attributes.
"""

from __future__ import annotations

import weakref

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from . import writer
from .context import FileContext, tool_version, value_of
from .keyed import Keyed
from .profile import Profile

# Per profile: (subject, pixels cleaned, character set) -> the encoded raw elements.
_ENCODED: "weakref.WeakKeyDictionary[Profile, dict]" = weakref.WeakKeyDictionary()
_PER_PROFILE = 64


def stamp(ds: Dataset, ctx: FileContext, *, pixels_cleaned: bool) -> None:
    """The attributes set by de-identification, their notes, the File Meta Information."""
    for name in ("PatientName", "PatientID"):
        ctx.note(name, "replaced", "subject code (P2)")
    if ctx.changes is None and writer.copies_raw(ds):
        charset = ds.get("SpecificCharacterSet", writer.default_encoding)
        key = (ctx.subject, pixels_cleaned, charset if isinstance(charset, str) else tuple(charset))
        cache = _ENCODED.setdefault(ctx.profile, {})
        raw = cache.get(key)
        if raw is None:
            if len(cache) >= _PER_PROFILE:
                cache.clear()
            raw = cache[key] = _encoded(attributes(ctx.subject, ctx.profile, pixels_cleaned), charset)
        for elem in raw:
            ds._dict[elem.tag] = elem  # as pydicom's reader sets raw elements
    else:
        for keyword, value in attributes(ctx.subject, ctx.profile, pixels_cleaned):
            setattr(ds, keyword, value)
    file_meta(ds, ctx.keyed)


def attributes(subject: str, profile: Profile, pixels_cleaned: bool) -> list[tuple[str, object]]:
    """``(keyword, value)`` of what is set, in order."""
    # one LO value within 64 characters (dcm2niix copies only that much into the sidecar);
    # the options applied are the CID 7050 codes of the sequence below
    method = f"pacs2bids {tool_version()}, PS3.15 Annex E ({profile.describe()['edition']}) Basic Profile"[:64]
    seq = Sequence()
    for value, meaning in profile.method_codes(pixels_cleaned):
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        seq.append(item)
    if profile.shift_dates:
        longitudinal = "MODIFIED"
    elif profile.keep_dates:
        longitudinal = "UNMODIFIED"
    else:
        longitudinal = "REMOVED"
    out = [("PatientName", subject), ("PatientID", subject), ("PatientIdentityRemoved", "YES"),
           ("DeidentificationMethod", method), ("DeidentificationMethodCodeSequence", seq),
           ("LongitudinalTemporalInformationModified", longitudinal)]
    if pixels_cleaned:
        out.append(("BurnedInAnnotation", "NO"))
    return out


def _encoded(values: list[tuple[str, object]], charset) -> list[RawDataElement]:
    """Each attribute as pydicom writes it in a dataset of ``charset``, as a raw element."""
    out = []
    for keyword, value in values:
        tag = Tag(tag_for_keyword(keyword))  # a BaseTag key, as pydicom's reader sets (its writer reads .element)
        vr = dictionary_VR(tag)
        parts: list[bytes] = []
        writer.element(parts, DataElement(tag, vr, value), charset)
        data = b"".join(parts)
        value_bytes = data[12:] if vr in writer.LONG_VRS else data[8:]
        out.append(RawDataElement(tag, vr, len(value_bytes), value_bytes, 0, False, True))
    return out


def file_meta(ds: Dataset, keyed: Keyed) -> None:
    """The File Meta Information rebuilt, with a zeroed preamble (PS3.10 7.1)."""
    old = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    # the dataset's UIDs read from their bytes where pydicom would give the same (str_of): left raw
    meta.MediaStorageSOPClassUID = value_of(ds, 0x00080016, old.get("MediaStorageSOPClassUID"))
    meta.MediaStorageSOPInstanceUID = value_of(ds, 0x00080018) or keyed.uid(
        str(old.get("MediaStorageSOPInstanceUID", ""))
    )
    meta.TransferSyntaxUID = old.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PACS2BIDS_{tool_version()}"[:16]
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
