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


def is_standard_uid(value: str) -> bool:
    """UIDs of the standard itself (SOP classes, transfer syntaxes, context groups, coding
    schemes): in pydicom's dictionary or under the DICOM root 1.2.840.10008 (PS3.5 9.1)."""
    return value in UID_dictionary or value.startswith("1.2.840.10008.")
