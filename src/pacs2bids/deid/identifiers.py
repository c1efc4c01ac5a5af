"""The identifying values of one file: collected for cleaning text, for the key store and the leak scan."""

from __future__ import annotations

import re

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .context import element, is_standard_uid
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


def raw_uids(value: bytes | None) -> str | MultiValue:
    """The UIDs of a raw UI value as pydicom's ``convert_UI`` gives them (str values; ``UID`` strips each)."""
    items = [v.strip() for v in (value or b"").decode("latin-1").rstrip("\0 ").rstrip(" \x00").split("\\")]
    return items[0] if len(items) == 1 else MultiValue(str, items)


def collect(ds: Dataset, profile: Profile, dates: set[str] | None = None) -> set[str]:
    """Identifying values of one file, at any depth (names, IDs, original UIDs...). When
    ``dates`` is given, the file's dates (``YYYYMMDD`` of every DA and DT value, public or
    private, at any depth) are added to it: they are shifted wherever text repeats them."""
    found: set[str] = set()

    def visit(d: Dataset) -> None:
        for tag, elem in d._dict.items():  # the dataset's own dict: no Tag conversion per element
            vr = elem.VR
            if elem.is_raw and (vr is None or vr == "UN" or elem.value is None):
                elem = element(d, tag)  # decoded: its VR is decided by pydicom
                vr = elem.VR
            if vr not in _READ_VRS and tag not in _IDENT_TAGS:
                continue  # nothing to collect: left undecoded, at no cost
            if vr == "SQ":
                for item in d[tag].value or ():
                    visit(item)
                continue
            private = bool(tag >> 16 & 1)  # tag.is_private, without the property call
            if vr == "DA" or vr == "DT":
                if dates is not None:
                    value = d[tag].value
                    for v in value if isinstance(value, MultiValue) else [value]:
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
            if vr == "UI" and elem.is_raw and not elem.is_implicit_VR and elem.is_little_endian:
                value = raw_uids(elem.value)  # as convert_UI reads them, without decoding the element
            else:
                value = d[tag].value
            if value in (None, "", b""):
                continue
            values = value if isinstance(value, MultiValue) else [value]
            if identifying:
                found.update(str(v).strip() for v in values if str(v).strip())
            else:
                found.update(str(v).strip() for v in values if v and not is_standard_uid(str(v).strip()))

    visit(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        found.add(str(meta.MediaStorageSOPInstanceUID))
    # A January 1st date carries its year only (exports and this profile truncate birth dates
    # so): searched for, it would hit every other subject's truncated date.
    return {v for v in found if v and not re.fullmatch(r"\d{4}0101", v)}
