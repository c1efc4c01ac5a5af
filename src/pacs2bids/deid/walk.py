"""The element walk: the profile applied to every element of one file, at every depth (P1-P14).

What each element becomes (PS3.15 E.1.1 action codes, :mod:`pacs2bids.deid.profile`):

- Patient's Name and Patient ID: the subject code (P2). Patient's Birth Date: shifted with the
  subject's dates, then cut to 1 January of that year (P4); emptied without a dates option.
- DA and DT: shifted by the subject's whole-day offset (Retain Longitudinal Temporal Information
  with Modified Dates, PS3.15 E.3.6), in nested sequences and kept private elements too; TM is
  unchanged (whole days). Values that are not dates are emptied.
- UI: ``2.25.<HMAC>`` (:mod:`pacs2bids.deid.keyed`), except the UIDs of the standard (SOP
  classes, transfer syntaxes, coding schemes: those in pydicom's UID dictionary).
- Clean Descriptors (``C`` on text): identifying values of the header (and of the project) are
  removed from the text; the rest (sequence names, the science) is kept.
- Private elements: kept by private creator, never by fixed group/element, when listed
  (:meth:`Profile.private_reason`), and then scrubbed like public ones; everything else private
  is removed (PS3.15 E.3.10).
- Set: Patient Identity Removed = YES, De-identification Method (text) and its code sequence
  (CID 7050), Longitudinal Temporal Information Modified = MODIFIED (PS3.15 E.1.1, E.3.6).

An element goes one of three ways: its Table E.1-1 action code (:func:`_act`), the pacs2bids
default for public attributes the table does not list (:func:`_default`), or cleaning (action
C, and every kept private element: :func:`_clean`). What its VR means on each way is written
once, in :data:`RULES`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from . import values
from .context import BYTE_SEARCHABLE_CHARSETS, FileContext, decoded, element, element_name, raw_value
from .profile import GE_PROTOCOL, Profile
from .stamp import stamp

_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_SET_BY_US = {0x00100010, 0x00100020, 0x00120062, 0x00120063, 0x00120064, 0x00280303, 0x00280301}
_CHARSET_TAG = 0x00080005
_DEFAULT_WHY = "not in Table E.1-1: pacs2bids default"
# Per profile: the public elements kept unread, by tag and VR (decided once, not per file).
_KEPT: "weakref.WeakKeyDictionary[Profile, dict]" = weakref.WeakKeyDictionary()
_TIME_KEPT = " (time of day kept: dates shift by whole days)"

# The three ways an element is decided (the ``how`` of a rule's handler).
REPLACE = "D"  # action D (and U on a sequence or a UID)
DEFAULT = "default"  # a public attribute absent from Table E.1-1
CLEAN = "C"  # action C, or a kept private element

# When the pacs2bids default reads or changes a VR: never (kept; removed in the Patient group),
# outside the Patient group (removed in it), or always.
NEVER, OUTSIDE_PATIENT, ALWAYS = 0, 1, 2

Handler = Callable[[Dataset, DataElement, FileContext, int, str, str, str, bool], None]


@dataclass(frozen=True)
class Rule:
    """What one VR gets on each way through the walk."""

    handle: Handler | None = None  # on a decoded element: (ds, elem, ctx, depth, name, why, how, private)
    dummy: Any = "ANONYMIZED"  # action D's value; None: action D goes to ``handle`` (REPLACE)
    empty: Callable[[], Any] = str  # action Z's value
    by_default: int = NEVER  # read or changed by the pacs2bids default
    cleans: bool = False  # read or changed by action C and in kept private elements
    text: bool = False  # raw text searched before decoding (FileContext.holds_no_identifier)
    kept_why: str = ""  # added to the note when action C keeps the value unread
    raw: bool = False  # ``handle`` takes the element undecoded (and decodes it only if it must)


def _walk_items(elem: DataElement, ctx: FileContext, depth: int) -> None:
    for item in elem.value or ():
        walk(item, ctx, depth + 1)


def _sequence(ds, elem, ctx, depth, name, why, how, private) -> None:
    _walk_items(elem, ctx, depth)
    if how != DEFAULT:
        ctx.note(name, "walked", why)


def _date(ds, elem, ctx, depth, name, why, how, private) -> None:
    if how == REPLACE:
        values.dates(ds, elem, ctx, name, why, fallback="19000101" if elem.VR == "DA" else "19000101000000")
    elif ctx.profile.keep_dates:
        values.normalised(ds, elem, ctx)
        ctx.note(name, "kept", why)
    elif how == CLEAN or ctx.profile.shift_dates:
        values.dates(ds, elem, ctx, name, why, fallback="")
    else:
        values.empty(decoded(ds, elem), ctx, name, why + " (date)")


def _time(ds, elem, ctx, depth, name, why, how, private) -> None:
    ctx.note(name, "kept", why + _TIME_KEPT)


def _uid(ds, elem, ctx, depth, name, why, how, private) -> None:
    values.uids(ds, elem, ctx, name, why)


def _person(ds, elem, ctx, depth, name, why, how, private) -> None:
    values.empty(elem, ctx, name, why + " (person name)")


def _text(ds, elem, ctx, depth, name, why, how, private) -> None:
    if not (private and values.private_date(ds, elem, ctx, name, why)):
        values.text(elem, ctx, name, why, private=private)


def _binary(ds, elem, ctx, depth, name, why, how, private) -> None:
    if not (private and values.private_date(ds, elem, ctx, name, why)):
        values.binary(elem, ctx, name, why)


def _none() -> None:
    return None


_DATE = Rule(_date, dummy=None, by_default=ALWAYS, cleans=True, raw=True)
_CLEANED_TEXT = Rule(_text, by_default=OUTSIDE_PATIENT, cleans=True, text=True)
_CODED_TEXT = Rule(_text, cleans=True, text=True)  # cleaned by action C and in kept private elements only
_BINARY = Rule(_binary, dummy=b"", cleans=True)
_OTHER_BINARY = Rule(_binary, cleans=True)  # OF OD OL OV: action D writes text, as it always did
_NUMBER = Rule(dummy=0, empty=_none)
_DECIMAL_STRING = Rule(dummy="0", empty=_none)
_OTHER = Rule()

#: VR -> what it gets on each way through the walk; a VR not listed gets :data:`_OTHER`.
RULES: dict[str, Rule] = {
    "SQ": Rule(_sequence, dummy=None, empty=Sequence, by_default=ALWAYS, cleans=True),
    "DA": _DATE,
    "DT": _DATE,
    "TM": Rule(_time, dummy=None, kept_why=_TIME_KEPT),
    "UI": Rule(_uid, dummy=None, by_default=ALWAYS, cleans=True, raw=True),
    "PN": Rule(_person, by_default=ALWAYS, cleans=True),
    **dict.fromkeys(("SH", "LO", "ST", "LT", "UT", "UC"), _CLEANED_TEXT),
    **dict.fromkeys(("AE", "CS"), _CODED_TEXT),
    "UN": Rule(_binary, dummy=b"", by_default=OUTSIDE_PATIENT, cleans=True),
    **dict.fromkeys(("OB", "OW"), _BINARY),
    **dict.fromkeys(("OF", "OD", "OL", "OV"), _OTHER_BINARY),
    **dict.fromkeys(("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"), _NUMBER),
    **dict.fromkeys(("DS", "IS"), _DECIMAL_STRING),
    "AS": Rule(dummy="000Y"),
}


def _act(ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext, depth: int, code: str, why: str) -> None:
    """A Table E.1-1 action code on a public element."""
    name = element_name(elem.tag)
    vr = elem.VR
    if code == "K" and vr != "SQ":
        ctx.note(name, "kept", why)
        return
    if code == "X" and ctx.changes is None:  # removed: nobody reads the value
        del ds[elem.tag]
        ctx.note(name, "removed", why)
        return
    if code == "C":
        _clean(ds, elem, ctx, depth, name, why, private=False)
        return
    if code == "Z" and ctx.changes is None and values.empty_raw(ds, elem):  # the same bytes, undecoded
        ctx.note(name, "emptied", why)
        return
    rule = RULES.get(vr, _OTHER)
    if not (rule.raw and code in ("D", "U")):
        elem = decoded(ds, elem)
    if code == "X":
        del ds[elem.tag]
        ctx.note(name, "removed", why, elem.value if vr != "SQ" else "")
    elif code == "Z":
        before = elem.value if vr != "SQ" else ""
        elem.value = rule.empty()
        ctx.note(name, "emptied", why, before, "")
    elif code == "K":  # a sequence: its items are walked
        _walk_items(elem, ctx, depth)
        ctx.note(name, "kept", why)
    elif code == "D" and rule.dummy is not None:
        values.replace(elem, ctx, name, why, rule.dummy)
    elif code == "D" or (code == "U" and vr in ("SQ", "UI")):
        rule.handle(ds, elem, ctx, depth, name, why, REPLACE, False)
    elif code == "U":
        del ds[elem.tag]
        ctx.note(name, "removed", why + " (not a UI value)")
    else:  # unknown code: strictest
        del ds[elem.tag]
        ctx.note(name, "removed", f"{why} (unknown action, strictest)")


def _default(ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext, depth: int) -> None:
    """Public attributes absent from Table E.1-1 (see :mod:`pacs2bids.deid.profile`)."""
    name = element_name(elem.tag)
    rule = RULES.get(elem.VR, _OTHER)
    if elem.tag.group != 0x0010:
        if rule.by_default == NEVER:
            ctx.note(name, "kept", _DEFAULT_WHY)
            return
        if rule.text and ctx.holds_no_identifier(elem):
            ctx.note(name, "kept", _DEFAULT_WHY + " (checked)")
            return
    elif rule.by_default != ALWAYS:
        del ds[elem.tag]
        ctx.note(name, "removed", _DEFAULT_WHY + " (Patient group)")
        return
    if rule.handle is _text and values.text_raw(ds, elem, ctx, name, _DEFAULT_WHY, False):
        return  # checked on its bytes: nothing to change
    rule.handle(ds, elem if rule.raw else decoded(ds, elem), ctx, depth, name, _DEFAULT_WHY, DEFAULT, False)


def _clean(
    ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext, depth: int, name: str, why: str, *, private: bool
) -> None:
    """Action C on a public element, or any kept private element."""
    rule = RULES.get(elem.VR, _OTHER)
    if not rule.cleans or elem.tag in _PIXEL_TAGS:
        ctx.note(name, "kept", why + rule.kept_why)
        return
    if rule.text and ctx.holds_no_identifier(elem):
        ctx.note(name, "kept", why + " (checked)")
        return
    if rule.handle is _binary and values.binary_raw(ds, elem, ctx, name, why, private):
        return  # scrubbed on its bytes, undecoded
    if rule.handle is _text and values.text_raw(ds, elem, ctx, name, why, private):
        return  # checked on its bytes: nothing to change
    rule.handle(ds, elem if rule.raw else decoded(ds, elem), ctx, depth, name, why, CLEAN, private)


def walk(ds: Dataset, ctx: FileContext, depth: int = 0) -> None:
    """Apply the profile to every element of ``ds`` (and of its sequences). Elements are
    decoded only when their value is read or changed: what is kept as it is stays in its
    raw form and is written back byte for byte."""
    tags = sorted(ds._dict, key=int)  # plain int comparisons: BaseTag.__lt__ is Python
    kept_blocks: set[tuple[int, int]] = set()
    creators: dict[tuple[int, int], str] = {}
    outer_searchable = ctx.bytes_searchable
    if _CHARSET_TAG in ds:  # an item's own character set holds for the items below it
        charset = raw_value(ds._dict[_CHARSET_TAG])
        charset = ds[_CHARSET_TAG].value if charset is None else charset
        ctx.bytes_searchable = isinstance(charset, str) and charset.strip() in BYTE_SEARCHABLE_CHARSETS
    try:
        for t in tags:
            if t >> 16 & 1 and 0x0010 <= t & 0xFFFF <= 0x00FF:  # private creators (plain int tests)
                creators[(t.group, t.element)] = values.creator(ds, t, ctx)
        memo = _KEPT.setdefault(ctx.profile, {})  # (tag, VR) -> what _kept_unread said
        for t in tags:
            _walk_element(ds, t, ctx, depth, creators, kept_blocks, memo)
    finally:
        ctx.bytes_searchable = outer_searchable
    for (group, blk), _creator in creators.items():
        if (group, blk) not in kept_blocks:
            tag = (group << 16) | blk
            if tag in ds:
                del ds[tag]


def _kept_unread(profile: Profile, tag: int, vr: str) -> tuple[str, str, str] | tuple[()]:
    """The note of a public element kept unread whatever the file (:func:`_act`, :func:`_default`); else ``()``."""
    rule = RULES.get(vr, _OTHER)
    resolved = profile.action(tag)
    if resolved is None:
        if tag >> 16 != 0x0010 and rule.by_default == NEVER:
            return (element_name(tag), "kept", _DEFAULT_WHY)
        return ()
    code, source = resolved
    code = profile.strictest(code, vr == "SQ")
    if code == "K" and vr != "SQ":
        return (element_name(tag), "kept", f"{source} {code}")
    if code == "C" and (not rule.cleans or tag in _PIXEL_TAGS):
        return (element_name(tag), "kept", f"{source} {code}" + rule.kept_why)
    return ()


def _walk_element(ds: Dataset, t, ctx: FileContext, depth: int, creators: dict, kept_blocks: set,
                  memo: dict) -> None:
    tag = int(t)  # plain int comparisons: pydicom's BaseTag compares in Python
    group, number = tag >> 16, tag & 0xFFFF
    if number == 0x0000:  # group lengths: recomputed or obsolete
        del ds[t]
        return
    if group & 1:  # private
        _walk_private(ds, t, ctx, depth, creators, kept_blocks, memo)
        return
    if group == 0x0002:
        return
    if depth == 0 and tag in _SET_BY_US:
        if tag == 0x00100010 or tag == 0x00100020:
            return
        del ds[t]
        return
    if tag == 0x00100030:  # Patient's Birth Date (P4)
        values.birth_date(ds, element(ds, t), ctx)
        return
    if tag == 0x00880200:  # Icon Image Sequence: a thumbnail of pixels nobody cleaned (P9)
        del ds[t]
        ctx.note("IconImageSequence", "removed", "thumbnail of the pixel data (P9)")
        return
    elem = element(ds, t)
    kept = memo.get((tag, elem.VR))
    if kept is None:
        kept = memo[(tag, elem.VR)] = _kept_unread(ctx.profile, tag, elem.VR)
    if kept:
        ctx.note(*kept)
        return
    resolved = ctx.profile.action(tag)
    if resolved is None:
        _default(ds, elem, ctx, depth)
        return
    code, source = resolved
    code = ctx.profile.strictest(code, elem.VR == "SQ")
    _act(ds, elem, ctx, depth, code, f"{source} {code}")


def _walk_private(ds: Dataset, t, ctx: FileContext, depth: int, creators: dict, kept_blocks: set,
                  memo: dict) -> None:
    """A private element: kept when its creator's block is on a keep list, cleaned; else removed."""
    tag = int(t)
    group, number = tag >> 16, tag & 0xFFFF
    if 0x0010 <= number <= 0x00FF:
        return  # private creators: decided after their blocks
    block = (group, number >> 8)
    creator = creators.get(block)
    if not creator:
        del ds[t]
        ctx.note(f"({group:04X},{number:04X})", "removed", "private element without private creator")
        return
    why = ctx.profile.private_reason(group, creator, number & 0xFF)
    if why is None:
        del ds[t]
        # named by its block, never by its creator's text (raw header text: P8)
        ctx.note(f"({group:04X},{number >> 8:02X}xx)", "removed", "private, not on a keep list (PS3.15 E.3.10)")
        return
    kept_blocks.add(block)
    elem = element(ds, t)
    kept = memo.get((tag, creator, elem.VR))
    if kept is None:
        kept = memo[(tag, creator, elem.VR)] = _private_kept_unread(tag, creator, elem.VR, why)
    if kept:
        ctx.note(*kept)
        return
    name = element_name(tag, creator.strip().upper())  # as on the keep list that matched it
    if (group, creator.strip().upper(), number & 0xFF) == GE_PROTOCOL:
        values.ge_protocol(ds, ds[t], ctx, name, why)
        return
    _clean(ds, elem, ctx, depth, name, why, private=True)


def _private_kept_unread(tag: int, creator: str, vr: str, why: str) -> tuple[str, str, str] | tuple[()]:
    """The note of a kept private element whose VR is never cleaned (:func:`_clean`); else ``()``."""
    upper = creator.strip().upper()
    rule = RULES.get(vr, _OTHER)
    if (tag >> 16, upper, tag & 0xFF) == GE_PROTOCOL or (rule.cleans and tag not in _PIXEL_TAGS):
        return ()
    return (element_name(tag, upper), "kept", why + rule.kept_why)


def apply(ds: Dataset, ctx: FileContext, *, pixels_cleaned: bool) -> None:
    """The whole profile on one file: the walk, the attributes set by de-identification, the
    File Meta Information rebuilt with a zeroed preamble (PS3.10 7.1; :mod:`pacs2bids.deid.stamp`)."""
    walk(ds, ctx, depth=0)
    stamp(ds, ctx, pixels_cleaned=pixels_cleaned)
