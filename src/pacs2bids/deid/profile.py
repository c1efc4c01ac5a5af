"""The de-identification profile as data: PS3.15 Annex E Table E.1-1 plus private-tag rules.

Loaded from package data (``pacs2bids/data/deid``):

- ``confidentiality_profile_attributes.json``: Table E.1-1 of PS3.15 edition 2024b, one row
  per attribute with the Basic Profile action and each option's action.
- ``safe_private_attributes.csv``: PS3.15 Table E.3.10-1 "Safe Private Attributes", one row per
  private attribute (private creator, group, element within the block, VR, VM, meaning, source);
  kept when the Retain Safe Private option is on.
- ``TCIAPrivateTagKB-02-01-2024-formatted.csv``: TCIA's private-tag knowledge base; its keep
  rows (``k``) are kept when the Retain Safe Private option is on.

Private attributes are matched by private creator, group and the element's low byte, never by
the block number the creator happens to reserve (PS3.5 7.8.1).

Resolving an action (:meth:`Profile.action`): the Basic Profile column first, then each
enabled option's column in the table's order overrides it. Composite codes depend on the
attribute's Type in the IOD, which a generic tool does not know, so the strictest reading is
taken (``X`` before ``Z`` before ``D``), except ``X/Z/U*`` on reference sequences, which
become ``U`` (recurse and replace the UIDs inside): new UIDs are keyed hashes, as safe as a
removal, and the references stay usable (P3).

Public attributes absent from the table (pacs2bids's documented default, see
:func:`default_action`): sequences are walked; PN values are emptied; UI values get new UIDs
(unless a well-known UID of the standard); DA/DT are shifted (or emptied without a dates
option); other attributes of the Patient group (0010) are removed; short and long text (SH,
LO, ST, LT, UT, UC) is kept but cleaned of the identifying values found in the header;
everything else (numbers, codes, pixel data) is kept.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pydicom.datadict import dictionary_keyword

from ..errors import SpecError

EDITION = "2024b"
DATA = "data/deid"
PROFILE_FILE = "confidentiality_profile_attributes.json"
TCIA_FILE = "TCIAPrivateTagKB-02-01-2024-formatted.csv"
SAFE_PRIVATE_FILE = "safe_private_attributes.csv"

# Column order of Table E.1-1; a later enabled option overrides an earlier one.
TABLE_OPTIONS = (
    "rtnSafePrivOpt",
    "rtnUIDsOpt",
    "rtnDevIdOpt",
    "rtnInstIdOpt",
    "rtnPatCharsOpt",
    "rtnLongFullDatesOpt",
    "rtnLongModifDatesOpt",
    "cleanDescOpt",
    "cleanStructContOpt",
    "cleanGraphOpt",
)
PIXEL_OPTION = "cleanPixelDataOpt"
ALL_OPTIONS = TABLE_OPTIONS + (PIXEL_OPTION,)
DEFAULT_OPTIONS = ("rtnLongModifDatesOpt", "rtnSafePrivOpt", "cleanDescOpt", PIXEL_OPTION)
#: Free-text descriptors kept (cleaned) under the Clean Descriptors option when the spec does not
#: say (``pseudonymization.keep_text``): series classification and researchers read them.
DEFAULT_KEEP_TEXT = ("SeriesDescription", "ProtocolName")

# PS3.16 CID 7050 "De-identification Method": code values (scheme DCM) of the profile and options.
CID_7050 = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    PIXEL_OPTION: ("113101", "Clean Pixel Data Option"),
    "cleanGraphOpt": ("113103", "Clean Graphics Option"),
    "cleanStructContOpt": ("113104", "Clean Structured Content Option"),
    "cleanDescOpt": ("113105", "Clean Descriptors Option"),
    "rtnLongFullDatesOpt": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "rtnLongModifDatesOpt": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "rtnPatCharsOpt": ("113108", "Retain Patient Characteristics Option"),
    "rtnDevIdOpt": ("113109", "Retain Device Identity Option"),
    "rtnUIDsOpt": ("113110", "Retain UIDs Option"),
    "rtnSafePrivOpt": ("113111", "Retain Safe Private Option"),
    "rtnInstIdOpt": ("113112", "Retain Institution Identity Option"),
}

# What dcm2niix reads to rebuild slice timing, phase encoding, diffusion and mosaics, beyond the
# safe private attributes and TCIA's keep rows (checked by tests/test_deid_dcm2niix.py on every series of the corpus). The
# Siemens CSA headers are kept and scrubbed (see pacs2bids.deid.csa).
CONVERTER_PRIVATE = {
    # (0029,"SIEMENS CSA HEADER",09/19), the headers' "versions", are not read by dcm2niix and hold
    # the acquisition date on some exports (dcm_qa_nih: 20180918, the StudyDate): removed, as TCIA says
    (0x0029, "SIEMENS CSA HEADER", 0x08),
    (0x0029, "SIEMENS CSA HEADER", 0x10),  # CSA image header: MosaicRefAcqTimes, PE polarity, B-matrix
    (0x0029, "SIEMENS CSA HEADER", 0x18),
    (0x0029, "SIEMENS CSA HEADER", 0x20),  # CSA series header: Phoenix protocol (scrubbed)
    (0x0043, "GEMS_PARM_01", 0x2A),  # GE user defined data: phase-encoding polarity
    (0x2005, "PHILIPS MR IMAGING DD 005", 0x0F),  # Philips per-frame private data (walked): image type
    (0x2005, "PHILIPS MR IMAGING DD 006", 0x96),  # Philips slice number (IS): DWI volume order
    (0x0025, "GEMS_SERS_01", 0x1B),  # GE protocol data block: slice order (scrubbed, re-zipped)
}
CSA_SCRUBBED = {(0x0029, "SIEMENS CSA HEADER", 0x10), (0x0029, "SIEMENS CSA HEADER", 0x20), (0x0025, "GEMS_SERS_01", 0x1B)}
GE_PROTOCOL = (0x0025, "GEMS_SERS_01", 0x1B)

_TAG = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")
_MASK = re.compile(r"\(([0-9A-FX]{4}),([0-9A-FX]{4})\)")
_TCIA_LAST = re.compile(r'\(([0-9a-fA-F]{4}),"?([^"]*)"*,([0-9a-fA-F]{2})\)$')

_STRICT = "XZDU"


def _resource(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / DATA / name


@dataclass(frozen=True)
class Row:
    name: str
    tag: str
    basic: str
    options: dict[str, str] = field(default_factory=dict)


def parse_private_key(text: str) -> tuple[int, str, int]:
    """Parse ``'gggg,"CREATOR",ee'`` (the spec's keep_private form) into a rule key."""
    m = re.fullmatch(r'\s*\(?([0-9a-fA-F]{4}),\s*"([^"]+)"\s*,\s*([0-9a-fA-F]{2})\)?\s*', text)
    if not m:
        raise SpecError(
            f"pseudonymization.keep_private: {text!r} is not of the form gggg,\"CREATOR\",ee "
            "(group in hex, private creator in double quotes, element within the block in hex)"
        )
    group = int(m.group(1), 16)
    if group % 2 == 0:
        raise SpecError(f"pseudonymization.keep_private: {text!r}: a private group is odd")
    return group, m.group(2).strip().upper(), int(m.group(3), 16)


def read_safe_private() -> list[dict[str, str]]:
    """The rows of ``safe_private_attributes.csv`` (PS3.15 Table E.3.10-1), as read."""
    with _resource(SAFE_PRIVATE_FILE).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@lru_cache(maxsize=1)
def _table() -> tuple[dict[int, Row], tuple[tuple[int, int, Row], ...], Row | None]:
    """Table E.1-1, parsed once per process: rows by tag, rows by tag mask, the private row."""
    rows: dict[int, Row] = {}
    masked: list[tuple[int, int, Row]] = []
    private_row = None
    for raw in json.loads(_resource(PROFILE_FILE).read_text(encoding="utf-8")):
        row = Row(raw["name"], raw["tag"], raw["basicProfile"], {k: v for k, v in raw.items() if k in TABLE_OPTIONS})
        m = _TAG.fullmatch(raw["tag"])
        if m:
            rows[int(m.group(1) + m.group(2), 16)] = row
            continue
        m = _MASK.fullmatch(raw["tag"])
        if m:
            text = m.group(1) + m.group(2)
            mask = int("".join("0" if c == "X" else "F" for c in text), 16)
            value = int(text.replace("X", "0"), 16)
            masked.append((mask, value, row))
        elif "ODD" in raw["tag"].upper():
            private_row = row
    return rows, tuple(masked), private_row


@lru_cache(maxsize=1)
def _safe_private() -> frozenset[tuple[int, str, int]]:
    return frozenset(
        (int(rec["group"], 16), rec["private_creator"].strip().upper(), int(rec["element"], 16))
        for rec in read_safe_private()
    )


@lru_cache(maxsize=1)
def _tcia_keep() -> frozenset[tuple[int, str, int]]:
    keep = set()
    with _resource(TCIA_FILE).open(newline="", encoding="utf-8-sig") as f:
        for rec in csv.DictReader(f):
            if rec["private_disposition"].strip().lower() != "k":
                continue
            last = rec["element_sig_pattern"].rsplit("]", 1)[-1]
            m = _TCIA_LAST.match(last)
            if m:
                keep.add((int(m.group(1), 16), m.group(2).strip().upper(), int(m.group(3), 16)))
    return frozenset(keep)


class Profile:
    """Table E.1-1 with a chosen set of options, and the private keep rules."""

    def __init__(
        self,
        options: list[str] | tuple[str, ...] | None = None,
        keep_private: list[str] = (),
        keep_text: list[str] | tuple[str, ...] | None = None,
    ):
        chosen = tuple(DEFAULT_OPTIONS if options is None else options)
        unknown = [o for o in chosen if o not in ALL_OPTIONS]
        if unknown:
            raise SpecError(
                f"pseudonymization.options: unknown option(s) {unknown}; choose among {list(ALL_OPTIONS)}"
            )
        if "rtnLongFullDatesOpt" in chosen and "rtnLongModifDatesOpt" in chosen:
            raise SpecError(
                "pseudonymization.options: rtnLongFullDatesOpt and rtnLongModifDatesOpt exclude each other; keep one"
            )
        self.options = tuple(o for o in ALL_OPTIONS if o in chosen)
        self.user_private = {parse_private_key(k) for k in keep_private}
        rows, masked, self.private_row = _table()
        self.rows: dict[int, Row] = dict(rows)
        self.masked: list[tuple[int, int, Row]] = list(masked)
        self._resolved: dict[int, tuple[str, str] | None] = {}
        self._private_memo: dict[tuple[int, str, int], str | None] = {}  # private_reason, per element seen
        self.keep_text = self._keep_text_tags(DEFAULT_KEEP_TEXT if keep_text is None else keep_text)

    def _keep_text_tags(self, keywords) -> frozenset[int]:
        """The tags of ``keep_text``: each must be a free-text row (not a sequence) that the Clean
        Descriptors option cleans, or the setting would silently mean nothing."""
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        tags = set()
        for kw in keywords:
            tag = tag_for_keyword(str(kw))
            row = self.row(tag) if tag is not None else None
            if row is None or not row.options.get("cleanDescOpt", "").startswith("C") or dictionary_VR(tag) == "SQ":
                raise SpecError(
                    f"pseudonymization.keep_text: {kw!r} is not a free-text descriptor that PS3.15 Table E.1-1 "
                    "cleans under the Clean Descriptors option; use DICOM keywords such as SeriesDescription, "
                    "ProtocolName, StudyDescription, ImageComments"
                )
            tags.add(int(tag))
        return frozenset(tags)

    @property
    def shift_dates(self) -> bool:
        return "rtnLongModifDatesOpt" in self.options

    @property
    def keep_dates(self) -> bool:
        return "rtnLongFullDatesOpt" in self.options

    def has(self, option: str) -> bool:
        return option in self.options

    def row(self, tag: int) -> Row | None:
        row = self.rows.get(tag)
        if row is None:
            for mask, value, r in self.masked:
                if tag & mask == value:
                    return r
        return row

    def action(self, tag: int) -> tuple[str, str] | None:
        """The resolved action code for a public tag and where it came from, or None when the
        tag is not in Table E.1-1. Resolved once per tag (the options do not change)."""
        if tag in self._resolved:
            return self._resolved[tag]
        row = self.row(tag)
        resolved = None
        if row is not None:
            code, source = row.basic, "basicProfile"
            for opt in self.options:
                if opt in row.options:
                    if opt == "cleanDescOpt" and not self._clean_desc_keeps(tag, row.options[opt]):
                        continue
                    code, source = row.options[opt], opt
            resolved = (code, source)
        self._resolved[int(tag)] = resolved
        return resolved

    def _clean_desc_keeps(self, tag: int, code: str) -> bool:
        """Clean Descriptors (PS3.15 E.3.5) keeps, cleaned, only the free text the project allows
        (``keep_text``); any other descriptor gets the Basic profile's action (X, Z or D), the safe
        choice for text that science does not need: a third party's name, a phone number or an
        address cannot all be found by patterns. Sequences stay walked (``C``): their text
        attributes are decided one by one."""
        from pydicom.datadict import dictionary_VR, dictionary_has_tag

        if not code.startswith("C") or tag in self.keep_text:
            return True
        return dictionary_has_tag(tag) and dictionary_VR(tag) == "SQ"

    @staticmethod
    def strictest(code: str, is_sequence: bool = False) -> str:
        """Reduce a composite code (``X/Z/D`` ...) to one action (see module docstring)."""
        if "/" not in code:
            return code
        parts = code.replace("*", "").split("/")
        if is_sequence and "U" in parts:
            return "U"
        for c in _STRICT:
            if c in parts:
                return c
        return parts[0]

    # -- private -------------------------------------------------------------------------
    @property
    def safe_private(self) -> frozenset[tuple[int, str, int]]:
        """PS3.15 Table E.3.10-1, as (group, CREATOR, element low byte); read once per process."""
        return _safe_private()

    @property
    def tcia_keep(self) -> frozenset[tuple[int, str, int]]:
        """TCIA's keep rows, as (group, CREATOR, element low byte); read once per process."""
        return _tcia_keep()

    def private_reason(self, group: int, creator: str, elem: int) -> str | None:
        """Why a private element is kept (``None``: it is removed). PS3.15 E.3.10."""
        seen = (group, creator, elem)
        if seen not in self._private_memo:  # the same few thousand elements in every file
            self._private_memo[seen] = self._private_reason(group, creator, elem)
        return self._private_memo[seen]

    def _private_reason(self, group: int, creator: str, elem: int) -> str | None:
        key = (group, creator.strip().upper(), elem)
        if key in self.user_private:
            return "settings.keep_private"
        if key in CONVERTER_PRIVATE:
            return "needed by dcm2niix (scrubbed)" if key in CSA_SCRUBBED else "needed by dcm2niix"
        if "rtnSafePrivOpt" in self.options:
            if key in self.safe_private:
                return "PS3.15 Table E.3.10-1 safe private"
            if key in self.tcia_keep:
                return "TCIA private tag knowledge base: keep"
        return None

    def method_codes(self, pixels_cleaned: bool) -> list[tuple[str, str]]:
        codes = [CID_7050["basic"]]
        for opt in self.options:
            if opt == PIXEL_OPTION and not pixels_cleaned:
                continue
            codes.append(CID_7050[opt])
        return codes

    def describe(self) -> dict:
        return {
            "standard": "DICOM PS3.15 Annex E, Table E.1-1",
            "edition": EDITION,
            "options": list(self.options),
            "keep_text": sorted(dictionary_keyword(t) for t in self.keep_text),
            "private_sources": [
                f"PS3.15 Table E.3.10-1 ({SAFE_PRIVATE_FILE})",
                "TCIAPrivateTagKB-02-01-2024 keep rows",
                "converter needs (pacs2bids.deid.profile.CONVERTER_PRIVATE)",
                "settings.keep_private",
            ],
        }
