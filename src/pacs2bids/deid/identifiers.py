"""The identifying values of one file: collected for cleaning text, for the key store and the leak scan."""

from __future__ import annotations

import re

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .context import BYTE_SEARCHABLE_CHARSETS, as_written, element, is_standard_uid, raw_value
from .profile import Profile

# Attributes whose values identify the patient, the visit or the site: collected from every
# file (at any depth) for cleaning text, for the key store and for the leak scan.
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MilitaryRank",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "PhysiciansOfRecord",
    "OperatorsName",
    "ScheduledPerformingPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
)
_IDENT_TAGS = {pydicom.datadict.tag_for_keyword(k): k for k in IDENTIFYING_KEYWORDS}
# The VRs whose values are read whatever the tag: sequences (walked), dates, person names, UIDs.
_READ_VRS = frozenset({"SQ", "DA", "DT", "PN", "UI"})
_CHARSET_TAG = 0x00080005


def raw_uids(value: bytes | None) -> str | MultiValue:
    """The UIDs of a raw UI value as pydicom's ``convert_UI`` gives them (str values; ``UID`` strips each)."""
    items = [v.strip() for v in (value or b"").decode("latin-1").rstrip("\0 ").rstrip(" \x00").split("\\")]
    return items[0] if len(items) == 1 else MultiValue(str, items)


def collect(ds: Dataset, profile: Profile, dates: set[str] | None = None) -> set[str]:
    """Identifying values of one file, at any depth (names, IDs, original UIDs...). When
    ``dates`` is given, the file's dates (``YYYYMMDD`` of every DA and DT value, public or
    private, at any depth) are added to it: they are shifted wherever text repeats them.
    Values of string VRs are read from their bytes when pydicom would give the same
    (:func:`~pacs2bids.deid.context.raw_value`): the elements stay undecoded for the walk."""
    found: set[str] = set()
    _visit(ds, profile, dates, found, True)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        found.add(str(meta.MediaStorageSOPInstanceUID))
    # A January 1st date carries its year only (exports and this profile truncate birth dates
    # so): searched for, it would hit every other subject's truncated date.
    return {v for v in found if v and not re.fullmatch(r"\d{4}0101", v)}


def charset_searchable(d: Dataset, outer: bool) -> bool:
    """Whether ``d``'s character set reads ASCII as ASCII (an item inherits its parent's)."""
    elem = d._dict.get(_CHARSET_TAG)
    if elem is None:
        return outer
    charset = raw_value(elem)
    charset = d[_CHARSET_TAG].value if charset is None else charset
    return isinstance(charset, str) and charset.strip() in BYTE_SEARCHABLE_CHARSETS


def _read(d: Dataset, tag: int, elem, value: str | list[str] | None):
    """The value read where pydicom used to decode it: from its bytes (``value``, a
    :func:`raw_value`), the element left as pydicom writes it once decoded; else decoded."""
    if value is None:
        return d[tag].value
    now = d._dict[tag]  # raw still, unless an earlier read decoded it
    if isinstance(now, RawDataElement) and elem.VR != "UI":  # UIDs were never decoded here
        as_written(d, now, value)
    return value


def _visit(d: Dataset, profile: Profile, dates: set[str] | None, found: set[str], searchable: bool) -> None:
    searchable = charset_searchable(d, searchable)
    for tag, elem in d._dict.items():  # the dataset's own dict: no Tag conversion per element
        vr = elem.VR
        if elem.is_raw and (vr is None or vr == "UN" or elem.value is None):
            elem = element(d, tag)  # decoded: its VR is decided by pydicom
            vr = elem.VR
        if vr not in _READ_VRS and tag not in _IDENT_TAGS:
            continue  # nothing to collect: left undecoded, at no cost
        if vr == "SQ":
            for item in d[tag].value or ():
                _visit(item, profile, dates, found, searchable)
            continue
        private = bool(tag >> 16 & 1)  # tag.is_private, without the property call
        value = raw_value(elem, searchable)  # None: decoded by pydicom (below)
        if vr == "DA" or vr == "DT":
            if dates is not None:
                value = _read(d, tag, elem, value)
                for v in value if isinstance(value, (MultiValue, list)) else [value]:
                    v = str(v or "").strip()
                    if len(v) >= 8 and v[:8].isdigit():
                        dates.add(v[:8])
            if tag not in _IDENT_TAGS:  # a date is collected as a value only when identifying
                continue
        identifying = tag in _IDENT_TAGS or vr == "PN"
        if not identifying and private:  # a private UI: never collected
            continue
        resolved = profile.action(tag) if not private else None
        if resolved is not None and resolved[0] == "K":
            continue  # retained on purpose by an option: neither cleaned nor a leak
        value = _read(d, tag, elem, value)
        if value in (None, "", b""):
            continue
        values = value if isinstance(value, (MultiValue, list)) else [value]
        if identifying:
            found.update(str(v).strip() for v in values if str(v).strip())
        else:
            found.update(str(v).strip() for v in values if v and not is_standard_uid(str(v).strip()))
