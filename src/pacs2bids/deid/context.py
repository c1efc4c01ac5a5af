"""The state of one file's walk, and how elements are named and read in it.

:class:`FileContext` carries what every element of one file is decided with: the project's
keyed functions and profile, the subject's date offset, the file's cleaning pattern and dates,
and the notes that become the de-identification record (:mod:`pacs2bids.deid.record`).
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from importlib import metadata
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_has_tag, dictionary_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from .csa import Scrub, scrub_bytes
from .keyed import Keyed
from .profile import Profile

# A kept binary private value scrubbed once per series: the Siemens CSA series header (the
# Phoenix protocol) is the same in every instance of a series.
_SCRUB_CACHE_SIZE = 8


@lru_cache(maxsize=1)
def tool_version() -> str:
    """This package's version, as written in the files and the record."""
    try:
        return metadata.version("pacs2bids")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "0+unknown"


def mask(value: Any) -> str:
    """Show a value's shape, never its content (dry-run output)."""
    text = str(value)
    if not text:
        return ""
    return f"{text[0]}***({len(text)})"


class FileContext:
    """Per-file state of the walk: the subject's offset, the cleaning pattern, the notes."""

    def __init__(
        self,
        keyed: Keyed,
        profile: Profile,
        subject: str,
        pattern,
        notes: Counter,
        changes: list | None,
        scrubbed: dict | None = None,
        dates: re.Pattern[bytes] | None = None,
    ):
        self.keyed = keyed
        self.profile = profile
        self.subject = subject
        self.days = keyed.day_offset(subject)
        self.pattern = pattern
        self.notes = notes
        self.changes = changes
        self.dates_shifted = False
        self.scrubbed = {} if scrubbed is None else scrubbed  # (value, pattern) -> scrub_bytes result
        self.bytes_searchable = True  # the current dataset's character set (see walk.walk)
        self.dates = dates  # the file's own dates, as written in text (patterns.date_tokens)

    def holds_no_identifier(self, elem: DataElement | RawDataElement) -> bool:
        """True when ``elem`` is still raw (undecoded) text in which the cleaning pattern finds
        nothing: then cleaning would change nothing and the value need not be decoded."""
        if not elem.is_raw or not self.bytes_searchable:
            return False
        value = elem.value or b""
        # a date, a UID, a phone number or a NIR has at least 5 digits, an e-mail address an "@"
        if b"@" in value or len(value) - len(value.translate(None, b"0123456789")) >= 5:
            return False
        return self.pattern is None or self.pattern.search(value) is None

    def scrub(self, value: bytes) -> tuple[bytes, int]:
        """:func:`scrub_bytes` with this file's pattern, remembered for the series."""
        key = (value, self.pattern, self.dates, self.days)
        done = self.scrubbed.get(key)
        if done is None:
            if len(self.scrubbed) >= _SCRUB_CACHE_SIZE:
                self.scrubbed.clear()
            done = self.scrubbed[key] = scrub_bytes(value, self.scrubbing())
        return done

    def scrubbing(self) -> Scrub:
        """The byte scrub of this file's kept binary values: keyed UID tokens, its identifying
        values and its dates."""
        return Scrub(self.keyed.uid_like, self.pattern, self.dates_shift, self.days)

    @property
    def dates_shift(self) -> re.Pattern[bytes] | None:
        """The file's dates to shift inside text and binary values (None when dates are kept as
        they are, rtnLongFullDatesOpt). Without a dates option the date elements are emptied, and
        their dates found inside text are shifted all the same: the original never stays."""
        return None if self.profile.keep_dates else self.dates

    def note(self, name: str, action: str, why: str, before: Any = None, after: Any = None) -> None:
        self.notes[(name, action, why)] += 1
        if self.changes is not None and action != "kept":
            self.changes.append(
                {"attribute": name, "action": action, "why": why, "before": mask(before), "after": mask(after) if action in ("cleaned",) else str(after) if after is not None else ""}
            )


@lru_cache(maxsize=8192)
def element_name(tag: int, creator: str | None = None) -> str:
    """How an element is named in records: its keyword, or its tag (private: with its creator)."""
    if creator is not None:
        return f'({tag >> 16:04X},"{creator}",{tag & 0xFF:02X})'
    if dictionary_has_tag(tag):
        return dictionary_keyword(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def decoded(ds: Dataset, elem: DataElement | RawDataElement) -> DataElement:
    """The decoded element (pydicom decodes a raw element on first access and keeps it)."""
    return ds[elem.tag] if elem.is_raw else elem


def element(ds: Dataset, tag) -> DataElement | RawDataElement:
    """The element at ``tag``, left raw when its VR is known without decoding it (explicit VR
    other than UN, which pydicom may replace by the dictionary's VR on decoding)."""
    elem = ds._dict.get(tag)  # Dataset.get_item without its Tag conversion (a hot path)
    if elem is None or (elem.is_raw and (elem.value is None or elem.VR in (None, "UN"))):
        return ds[tag]  # absent, deferred or VR to be decided: pydicom's own way
    return elem


# Character sets whose encoded text can be searched as bytes with the identifiers' UTF-8 and
# Latin-1 spellings (compile_identifiers) and give the same hits as the decoded text.
BYTE_SEARCHABLE_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"})
# Printable ASCII without a backslash, NUL padding: one value, the same text in every character
# set (raw_value reads text VRs only in those its callers search as bytes).
PLAIN_TEXT = re.compile(rb"[\x00\x20-\x5b\x5d-\x7e]*")
# VRs pydicom decodes with its default encoding whatever the character set (convert_string), one
# value split at backslashes once the padding is stripped; text VRs (convert_text) strip each value.
_DEFAULT_ENCODED = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
_TEXT = frozenset({"SH", "LO"})


def raw_value(elem: DataElement | RawDataElement, searchable: bool = False) -> str | list[str] | None:
    """The value pydicom gives when it decodes ``elem`` (a str, or a list of them when it holds
    several), read from the bytes of a raw explicit VR little endian element of a string VR (UI,
    CS, DA, DT, TM, AS; SH, LO and PN when ``searchable``: a character set whose ASCII is ASCII)
    without decoding it (a PN as ``str`` of pydicom's PersonName). None when ``elem`` must be decoded by pydicom (then do so), and always
    when pydicom's reading checks RAISE: it may refuse the value, and that must still happen."""
    if not isinstance(elem, RawDataElement) or elem.is_implicit_VR or not elem.is_little_endian:
        return None
    if pydicom_config.settings.reading_validation_mode == pydicom_config.RAISE:
        return None
    vr, value = elem.VR, elem.value
    if not isinstance(value, bytes):
        return None
    if vr in _DEFAULT_ENCODED:
        items = value.decode("latin-1").rstrip(" \x00").split("\\")
        if vr == "UI":
            items = [v.strip() for v in items]  # as UID() keeps them
    elif vr in _TEXT and searchable and PLAIN_TEXT.fullmatch(value.replace(b"\\", b"")):
        items = [v.rstrip("\x00 ") for v in value.decode("ascii").split("\\")]
    elif vr == "PN" and searchable and b"=" not in value and PLAIN_TEXT.fullmatch(value.replace(b"\\", b"")):
        items = value.rstrip(b"\x00 ").decode("ascii").split("\\")  # convert_PN: str() of each name
    else:
        return None
    return items[0] if len(items) == 1 else items


def set_raw(ds: Dataset, elem: DataElement | RawDataElement, value: bytes) -> None:
    """A new value as a raw element (explicit VR little endian), written as it is."""
    ds._dict[elem.tag] = RawDataElement(elem.tag, elem.VR, len(value), value, elem.value_tell, False, True)


def as_written(ds: Dataset, elem: RawDataElement, value: str | list[str]) -> None:
    """Leave ``elem`` as pydicom writes it once decoded to ``value`` (a :func:`raw_value`): the
    values joined by backslashes, padded to an even length (a NUL for UI, else a space); raw
    still. The same bytes as before pydicom decoded in its place (and wrote what it decoded)."""
    data = (value if isinstance(value, str) else "\\".join(value)).encode("latin-1")
    if len(data) % 2:
        data += b"\x00" if elem.VR == "UI" else b" "
    if data != elem.value:
        set_raw(ds, elem, data)


def value_of(ds: Dataset, tag: int, default: Any = None) -> Any:
    """``ds[tag].value`` (``default`` when absent), read from its bytes when it is one value that
    can be (:func:`raw_value`; default-encoded VRs only: the character set is not looked at), the
    element then left as pydicom would write it (:func:`as_written`)."""
    elem = ds._dict.get(tag)
    if elem is None:
        return default
    value = raw_value(elem)
    if isinstance(value, str):
        as_written(ds, elem, value)
        return value
    return ds[tag].value


def str_of(ds: Dataset, tag: int) -> str:
    """``str(ds.get(keyword, ""))`` without decoding the element where it can (:func:`value_of`)."""
    return str(value_of(ds, tag, ""))


def is_standard_uid(value: str) -> bool:
    """UIDs of the standard itself (SOP classes, transfer syntaxes, context groups, coding
    schemes): in pydicom's dictionary or under the DICOM root 1.2.840.10008 (PS3.5 9.1)."""
    return value in UID_dictionary or value.startswith("1.2.840.10008.")
