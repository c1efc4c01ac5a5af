"""The head of a received Part 10 file, walked from its element headers alone (PS3.5 7.1, 7.5).

:func:`walk_head` gives the UIDs a received instance is filed under (SOP, Study and Series
Instance UIDs), where its head ends and its transfer syntax, from its first bytes in memory: a few
microseconds, no pydicom object. Anything it cannot decide raises :class:`Undecided`, and
:mod:`pacs2bids.sink` asks pydicom then (the verdicts cannot differ).
"""

from __future__ import annotations

import functools
import struct

from pydicom.uid import UID

# What the check of a payload reads from its head: the UIDs it is filed under. They come before
# group 0021, where some vendors keep private sequences of a hundred KiB (Siemens XA).
HEAD_TAGS = [0x00080018, 0x0020000D, 0x0020000E]
_HEAD_TAG_SET = frozenset(HEAD_TAGS)


class Undecided(Exception):
    """The fast walk of a head cannot decide (an unusual encoding): pydicom reads it."""


LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
#: Value length of undefined length, and the item and delimiter tags (PS3.5 7.5)
UNDEFINED, ITEM, ITEM_END, SEQ_END = 0xFFFFFFFF, 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_EXPLICIT, _IMPLICIT, _U32 = struct.Struct("<HH2sH"), struct.Struct("<HHI"), struct.Struct("<I")


def element_header(buf: bytes, at: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """The header of the element at ``at`` (PS3.5 7.1): tag, VR (None: implicit, or an item
    tag), value length and where the value starts."""
    if at + 8 > len(buf):
        raise Undecided()
    group, elem, length = struct.unpack_from("<HHI", buf, at)
    if implicit or group == 0xFFFE:
        return group << 16 | elem, None, length, at + 8
    vr = buf[at + 4:at + 6]
    if vr in LONG_VRS:
        if at + 12 > len(buf):
            raise Undecided()
        return group << 16 | elem, vr, struct.unpack_from("<I", buf, at + 8)[0], at + 12
    return group << 16 | elem, vr, struct.unpack_from("<H", buf, at + 6)[0], at + 8


def _past_sequence(buf: bytes, at: int, implicit: bool) -> int:
    """Where a sequence of undefined length whose items start at ``at`` ends (PS3.5 7.5)."""
    while True:
        tag, _vr, length, at = element_header(buf, at, implicit)
        if tag == SEQ_END:
            return at
        if tag != ITEM:
            raise Undecided()
        if length != UNDEFINED:
            at += length
            continue
        while True:  # an item of undefined length: its elements, up to the Item Delimitation Item
            tag, vr, length, at = element_header(buf, at, implicit)
            if tag == ITEM_END:
                break
            if length != UNDEFINED:
                at += length
            elif vr == b"SQ" or (implicit and vr is None):
                at = _past_sequence(buf, at, implicit)
            else:
                raise Undecided()


def walk_head(buf: bytes) -> tuple[UID, dict[int, str], int]:
    """The transfer syntax, the ``HEAD_TAGS`` values and where the head ends, of the Part 10
    file starting ``buf``, from its element headers alone (no pydicom object: a few
    microseconds). Raises :class:`Undecided` for anything else than little endian, not
    deflated, a UID missing, empty or multi-valued, or a head longer than ``buf``."""
    if buf[128:132] != b"DICM":
        raise Undecided()
    at, syntax = 132, None
    while buf[at:at + 2] == b"\x02\x00":  # the file meta group, explicit VR little endian
        tag, _vr, length, at = element_header(buf, at, False)
        if tag == 0x00020010:
            syntax = buf[at:at + length].decode("ascii", "replace").rstrip("\0 ")
        at += length
    implicit = _implicit(syntax)
    found: dict[int, str] = {}
    end, explicit, implicit_header, long_length = len(buf), _EXPLICIT.unpack_from, _IMPLICIT.unpack_from, _U32.unpack_from
    while True:  # _element, inlined: about 96 elements per image
        start = at
        if at + 8 > end:
            raise Undecided()
        if implicit:
            group, elem, length = implicit_header(buf, at)
            vr, at = None, at + 8
        else:
            group, elem, vr, length = explicit(buf, at)
            if group == 0xFFFE:
                vr, length, at = None, long_length(buf, at + 4)[0], at + 8
            elif vr in LONG_VRS:
                if at + 12 > end:
                    raise Undecided()
                length, at = long_length(buf, at + 8)[0], at + 12
            else:
                at += 8
        tag = group << 16 | elem
        if tag > 0x0020000E:
            break
        if length == UNDEFINED:
            if not (vr == b"SQ" or (implicit and vr is None)):
                raise Undecided()
            at = _past_sequence(buf, at, implicit)
            continue
        if tag in _HEAD_TAG_SET:
            found[tag] = buf[at:at + length].decode("ascii").rstrip("\0 ")
        at += length
    if len(found) < 3 or not all(found.values()) or any("\\" in v for v in found.values()):
        raise Undecided()
    return _uid(syntax), found, start


@functools.lru_cache(maxsize=64)
def _uid(syntax: str) -> UID:
    """``UID(syntax)``, made once per transfer syntax (pydicom's UID checks its value)."""
    return UID(syntax)


@functools.lru_cache(maxsize=64)
def _implicit(syntax: str | None) -> bool:
    """Whether the transfer syntax ``syntax`` is implicit VR; :class:`Undecided` unless it is
    little endian and not deflated (or unknown to pydicom)."""
    try:
        uid = UID(syntax or "")
        if not syntax or not uid.is_little_endian or uid.is_deflated:
            raise Undecided()
        return uid.is_implicit_VR
    except ValueError:
        raise Undecided() from None
