"""The bytes of a DICOM Part 10 file that the leak scan searches: all of them but the pixel samples.

The values of the top-level Pixel Data elements (7FE0,0010 Pixel Data, 7FE0,0008 Float Pixel Data,
7FE0,0009 Double Float Pixel Data) are image samples (or compressed frames of them), not text: an
identifier drawn into the image is the pixel review's concern (burned-in text, OCR), and a
run of bytes there that happens to spell a short number or a UID's digits is no leak. Every other
byte is searched: the file meta, every element before the pixels (private blocks, OB/UN values,
sequences at any depth), the headers of the pixel element and of its fragments, and everything
after it (trailing elements, padding).

Where the pixels are is decided from the element headers alone (PS3.5 7.1, 7.5, A.4), walking the
top-level data set as any reader does. Anything the walk cannot decide (big endian, deflated, a
length past the end, an item where none may be) gives ``None``: the whole file is searched, as before.
"""

from __future__ import annotations

import bisect
import struct
from typing import NamedTuple

from ..rawhead import ITEM as _ITEM
from ..rawhead import ITEM_END as _ITEM_END
from ..rawhead import LONG_VRS as _LONG_VRS
from ..rawhead import SEQ_END as _SEQ_END
from ..rawhead import UNDEFINED as _UNDEFINED
from ..rawhead import Undecided as _Undecided
from ..rawhead import element_header

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_VRS = _LONG_VRS | frozenset(vr.encode() for vr in (
    "AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()))
#: Transfer syntaxes read here: every little endian one that is not deflated (the rest: ``None``).
_BIG_ENDIAN, _DEFLATED = "1.2.840.10008.1.2.2", ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")


def _header(buf: bytes, at: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """Tag, VR (None: implicit or an item tag), value length and where the value starts
    (:func:`pacs2bids.rawhead.element_header`); a VR that is not one undecided (a reader could take it
    otherwise)."""
    tag, vr, length, value = element_header(buf, at, implicit)
    if vr is not None and vr not in _VRS:
        raise _Undecided()
    return tag, vr, length, value


class Element(NamedTuple):
    """Where an element's value lies in the file (``start``-``end``), its tag, its VR as written
    (None: implicit VR, or a sequence read as one value) and whether it holds the top-level pixel
    samples (or one of their fragments)."""

    start: int
    end: int
    tag: int
    vr: bytes | None
    pixels: bool


def _items(buf: bytes, at: int, stop: int | None, implicit: bool, out: list[Element]) -> int:
    """The elements of the items of a sequence whose value starts at ``at`` (ends at ``stop``, or
    at its Sequence Delimitation Item when None), into ``out``; returns where the sequence ends."""
    while stop is None or at < stop:
        tag, _vr, length, at = _header(buf, at, implicit)
        if tag == _SEQ_END and stop is None:
            return at
        if tag != _ITEM:
            raise _Undecided()
        at = _elements(buf, at, None if length == _UNDEFINED else at + length, implicit, out, nested=True)
    if at != stop:
        raise _Undecided()
    return at


def _elements(buf: bytes, at: int, stop: int | None, implicit: bool, out: list[Element], nested: bool) -> int:
    """The elements from ``at`` up to ``stop`` (None: up to an Item Delimitation Item, past which
    it returns; the end of the file at the top level), sequences walked into, into ``out``."""
    end = len(buf) if stop is None else stop
    while at < end:
        tag, vr, length, at = _header(buf, at, implicit)
        if tag == _ITEM_END and nested and stop is None:
            return at
        if tag >> 16 == 0xFFFE:
            raise _Undecided()  # an item or a delimiter where none may be
        if tag in PIXEL_TAGS and not nested:
            if length == _UNDEFINED:
                spans = _fragments(buf, at)
                out.extend(Element(a, b, tag, vr, True) for a, b in spans[:-1])
                at = spans[-1][1]
                continue
            out.append(Element(at, at + length, tag, vr, True))
        elif length == _UNDEFINED:
            if not (vr in (b"SQ", b"UN") or (implicit and vr is None)):
                raise _Undecided()
            at = _items(buf, at, None, implicit or vr == b"UN", out)  # UN: an implicit VR sequence (PS3.5 6.2.2)
            continue
        elif vr == b"SQ":
            at = _items(buf, at, at + length, implicit, out)
            continue
        else:
            out.append(Element(at, at + length, tag, vr, False))
        at += length
    if (stop is None and nested) or at > len(buf) or (stop is not None and at != stop):
        raise _Undecided()
    return at


def _fragments(buf: bytes, at: int) -> list[tuple[int, int]]:
    """The value spans of the items of encapsulated pixel data starting at ``at`` (PS3.5 A.4), and
    where the Sequence Delimitation Item ends (as a last, empty span)."""
    spans = []
    while True:
        tag, _vr, length, at = _header(buf, at, True)
        if tag == _SEQ_END:
            spans.append((at, at))
            return spans
        if tag != _ITEM or length == _UNDEFINED or at + length > len(buf):
            raise _Undecided()
        spans.append((at, at + length))
        at += length


def _syntax(buf: bytes, out: list[Element]) -> tuple[str, int]:
    """The transfer syntax of the file meta group (its elements into ``out``), and where the data
    set starts."""
    at, syntax = 132, ""
    while buf[at:at + 2] == b"\x02\x00":
        tag, vr, length, value = _header(buf, at, False)
        if length == _UNDEFINED or value + length > len(buf):
            raise _Undecided()
        out.append(Element(value, value + length, tag, vr, False))
        if tag == 0x00020010:
            syntax = buf[value:value + length].decode("ascii", "replace").rstrip("\0 ")
        at = value + length
    return syntax, at


def elements(buf: bytes) -> list[Element] | None:
    """Every element of ``buf`` (a whole Part 10 file) holding a value, file meta and sequences'
    items included, in the order of the file; ``None`` when the walk cannot decide."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    out: list[Element] = []
    try:
        syntax, at = _syntax(buf, out)
        if syntax == _BIG_ENDIAN or syntax in _DEFLATED or not syntax.startswith("1.2.840.10008.1.2"):
            return None
        _elements(buf, at, None, syntax == "1.2.840.10008.1.2", out, nested=False)
    except (_Undecided, struct.error, UnicodeDecodeError):
        return None
    return out


def element_at(found: list[Element], starts: list[int], pos: int) -> Element | None:
    """The element of ``found`` (``starts``: their starts) whose value holds the byte at ``pos``."""
    i = bisect.bisect_right(starts, pos) - 1
    if i >= 0 and found[i].start <= pos < found[i].end:
        return found[i]
    return None


def without_pixels(buf: bytes, found: list[Element]) -> bytes:
    """``buf`` without its pixel samples (each span replaced by one NUL byte, so that no string is
    made across it)."""
    parts, at = [], 0
    for e in found:
        if e.pixels:
            parts.append(buf[at:e.start])
            at = e.end
    if not parts:
        return buf
    parts.append(buf[at:])
    return b"\x00".join(parts)
