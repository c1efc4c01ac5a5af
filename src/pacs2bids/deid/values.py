"""What happens to one element's value: dates shifted, UIDs keyed, text cleaned, binary scrubbed.

Each function changes one decoded element in place and notes what it did on the file's
:class:`~pacs2bids.deid.context.FileContext`. Which of them an element gets is decided by the
walk (:mod:`pacs2bids.deid.walk`), from its action code and its VR.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from .context import PLAIN_TEXT, FileContext, as_written, decoded, is_standard_uid, raw_value, set_raw
from .identifiers import raw_uids
from .csa import UID_TEXT, Scrub, scrub_bytes, scrub_ge_protocol
from .keyed import birth_date_to_year, shift_da, shift_dt
from .patterns import clean_text, is_date_value, mask_personal_data



def replace(elem: DataElement, ctx: FileContext, name: str, why: str, value: Any) -> None:
    """Action D on a value without its own rule: a dummy value of its VR."""
    before = elem.value
    elem.value = value
    ctx.note(name, "replaced", why, before, elem.value)


def empty(elem: DataElement, ctx: FileContext, name: str, why: str) -> None:
    before = elem.value
    elem.value = ""
    ctx.note(name, "emptied", why, before, "")


# VRs whose empty value (walk.RULES: "" or None) pydicom writes as no bytes at all.
_EMPTY_RAW = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UR", "UT", "UI", "PN",
                        "DS", "IS"})


def empty_raw(ds: Dataset, elem: DataElement | RawDataElement) -> bool:
    """Action Z on a raw explicit VR little endian element of a string VR: set as a raw element
    of no bytes, what pydicom writes once the decoded element is emptied. False: not done
    (the caller decodes and empties it)."""
    if elem.VR not in _EMPTY_RAW or not _explicit_le_raw(elem):
        return False
    set_raw(ds, elem, b"")
    return True


def birth_date(ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext) -> None:
    """Patient's Birth Date (P4): shifted with the subject's dates, then cut to 1 January."""
    value = raw_value(elem) if ctx.changes is None else None
    if not isinstance(value, str):  # decoded by pydicom (several values, another encoding, a dry run)
        elem = decoded(ds, elem)
        value = str(elem.value or "")
    if ctx.profile.shift_dates and value:
        new = birth_date_to_year(value, ctx.days)
        _set(ds, elem, new or "")
        ctx.note("PatientBirthDate", "shifted-to-year", "P4: shifted, then 1 January", value, new)
    else:
        _set(ds, elem, "")
        ctx.note("PatientBirthDate", "emptied", "basicProfile Z", value, "")


def normalised(ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext) -> None:
    """A DA or DT value kept as it is: written as pydicom writes it once decoded (its padding
    made even), from its bytes when it can be (:func:`_set`), else decoded."""
    value = raw_value(elem) if ctx.changes is None else None
    if value is None:
        decoded(ds, elem)
    else:
        _set(ds, elem, value)


def _set(ds: Dataset, elem: DataElement | RawDataElement, value: str | list[str]) -> None:
    """A new DA or DT value: a raw element as pydicom's ``write_DA``/``write_DT`` write it (one
    string, or values joined by backslashes, padded with a space to an even length, in the default
    encoding: :func:`as_written`) when ``elem`` is raw, else set on the decoded element."""
    if elem.is_raw:
        as_written(ds, elem, value)
    else:
        elem.value = value


def dates(ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext, name: str, why: str,
          fallback: str) -> None:
    """A DA or DT value shifted by the subject's offset; ``fallback`` without a dates option. A raw
    element is read from its bytes and written back as a raw element, as pydicom would decode and
    write it (:func:`_set`); decoded by pydicom in a dry run or in another encoding."""
    raw = raw_value(elem) if ctx.changes is None else None
    if raw is None:
        elem = decoded(ds, elem)
        raw = elem.value
    if not ctx.profile.shift_dates:
        _set(ds, elem, fallback)
        ctx.note(name, "replaced" if fallback else "emptied", why, raw, fallback)
        return
    fn = shift_da if elem.VR == "DA" else shift_dt
    values = raw if isinstance(raw, (MultiValue, list)) else [raw]
    new, bad = [], 0
    for v in values:
        v = str(v or "").strip()
        if not v:
            new.append("")
            continue
        s = fn(v, ctx.days)
        if s is None:
            bad += 1
            s = ""
        new.append(s)
    after = new if len(new) > 1 else (new[0] if new else "")
    _set(ds, elem, after)
    ctx.dates_shifted = True
    ctx.note(name, "shifted", why + (" (unparsable values emptied)" if bad else ""), raw, after)




def _explicit_le_raw(elem: DataElement | RawDataElement) -> bool:
    return elem.is_raw and not elem.is_implicit_VR and elem.is_little_endian and isinstance(elem.value, bytes)


def creator(ds: Dataset, tag: int, ctx: FileContext) -> str:
    """A private creator's text as pydicom decodes it (``""`` when it is not one text value). Plain
    ASCII in a searchable character set is read from its bytes, and left raw in pydicom's own
    encoding of the value (what pydicom writes once it has decoded it)."""
    elem = ds._dict.get(tag)
    if (elem is not None and elem.VR == "LO" and ctx.bytes_searchable and _explicit_le_raw(elem)
            and PLAIN_TEXT.fullmatch(elem.value)):
        value = elem.value.decode("ascii").rstrip("\0 ")
        encoded = value.encode("ascii")
        encoded += b" " if len(encoded) % 2 else b""
        if encoded != elem.value:
            set_raw(ds, elem, encoded)
        return value
    value = ds[tag].value
    return value if isinstance(value, str) else ""


def uids(ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext, name: str, why: str) -> None:
    """Every UID that is not of the standard gets its keyed UID. A raw element is decoded and
    written here as pydicom does (``convert_UI``, ``write_UI``), as a new raw element."""
    if elem.is_raw:
        if ctx.changes is None and _explicit_le_raw(elem):
            _raw_uids(ds, elem, ctx, name, why)
            return
        elem = ds[elem.tag]
    values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
    new = []
    changed = False
    for v in values:
        v = str(v or "").strip("\x00 ")
        if not v or is_standard_uid(v) or (elem.keyword or "").endswith(("SOPClassUID", "TransferSyntaxUID")):
            new.append(v)
        else:
            new.append(ctx.keyed.uid(v))
            changed = True
    if changed:
        before = elem.value
        elem.value = [UID(x) for x in new] if len(new) > 1 else UID(new[0])
        ctx.note(name, "new-uid", why, before, elem.value)
    else:
        ctx.note(name, "kept", why + " (UID of the standard)")


def _raw_uids(ds: Dataset, elem: RawDataElement, ctx: FileContext, name: str, why: str) -> None:
    """:func:`uids` on the bytes: the values as ``convert_UI`` reads them, written back as
    ``write_UI`` writes them (joined by backslashes, a NUL to an even length)."""
    values = raw_uids(elem.value)
    values = values if isinstance(values, MultiValue) else [values]
    keyword = dictionary_keyword(elem.tag) if dictionary_has_tag(elem.tag) else ""
    new, changed = [], False
    for v in values:
        v = v.strip("\x00 ")
        if not v or is_standard_uid(v) or keyword.endswith(("SOPClassUID", "TransferSyntaxUID")):
            new.append(v)
        else:
            new.append(ctx.keyed.uid(v))
            changed = True
    text = "\\".join(new if changed else values)
    encoded = (text + "\0" if len(text) % 2 else text).encode("latin-1")
    if encoded != elem.value:
        set_raw(ds, elem, encoded)
    if changed:
        ctx.note(name, "new-uid", why)
    else:
        ctx.note(name, "kept", why + " (UID of the standard)")


def text(elem: DataElement, ctx: FileContext, name: str, why: str, *, private: bool = False) -> None:
    """Clean one kept text value: the header's identifying values removed
    (:func:`clean_text`), the file's own dates shifted in place, phone numbers, e-mail
    addresses and NIRs masked (:func:`mask_personal_data`); in a private value, a whole
    UID gets its keyed UID (as a public one would) and a UID inside text a keyed token of
    the same length."""
    new, total = _cleaned(elem.value if isinstance(elem.value, MultiValue) else [elem.value], ctx, private)
    if total:
        before = elem.value
        elem.value = new if len(new) > 1 else new[0]
        ctx.note(name, "cleaned", why + " (identifying values, dates or contact data removed)", before, elem.value)
    else:
        ctx.note(name, "kept", why + " (checked)")


def text_raw(ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext, name: str, why: str,
             private: bool) -> bool:
    """:func:`text` on the values of a raw element read from its bytes (:func:`raw_value`) when
    cleaning changes none of them: the element left raw, as pydicom writes it once decoded. False:
    not done (a dry run, a value pydicom must decode, a change to make, a private value that is a
    date for :func:`private_date`): the caller decodes it and takes the general path."""
    value = raw_value(elem, ctx.bytes_searchable) if ctx.changes is None else None
    if value is None:
        return False
    items = [value] if isinstance(value, str) else value
    if private:
        stripped = [v.strip(" \x00") for v in items]
        if any(stripped) and all(is_date_value(v) for v in stripped if v):
            return False
    if _cleaned(items, ctx, private)[1]:
        return False
    as_written(ds, elem, value)
    ctx.note(name, "kept", why + " (checked)")
    return True


def _cleaned(values: list, ctx: FileContext, private: bool) -> tuple[list, int]:
    """The values of :func:`text` cleaned, and how many changes were made."""
    total = 0
    new = []
    for v in values:
        if not isinstance(v, str):
            new.append(v)
            continue
        c, n = clean_text(v, ctx.pattern)
        if private and UID_TEXT.fullmatch(c.strip("\x00 ")) and not is_standard_uid(c.strip("\x00 ")):
            c, n = ctx.keyed.uid(c.strip("\x00 ")), n + 1
        elif private or ctx.dates_shift is not None:
            raw = c.encode("utf-8", "surrogateescape")
            raw2, k = scrub_bytes(raw, Scrub(ctx.keyed.uid_like if private else _same, None, ctx.dates_shift, ctx.days))
            if raw2 != raw:
                c, n = raw2.decode("utf-8", "surrogateescape"), n + k
        c, k = mask_personal_data(c)
        total += n + k
        new.append(c)
    return new, total


def _same(token: str, _length: int) -> str:
    """UID tokens in public text are left to the leak scan (public UIDs are replaced by element)."""
    return token


def binary(elem: DataElement, ctx: FileContext, name: str, why: str) -> None:
    """A kept binary value: UIDs and identifying strings overwritten, same length."""
    value = elem.value
    if not isinstance(value, (bytes, bytearray)):
        ctx.note(name, "kept", why)
        return
    new, n = ctx.scrub(bytes(value))
    if n:
        elem.value = new
        ctx.note(name, "scrubbed", why + " (UIDs and identifying strings overwritten, same length)")
    else:
        ctx.note(name, "kept", why + " (checked)")


def binary_raw(ds: Dataset, elem: DataElement | RawDataElement, ctx: FileContext, name: str, why: str,
               private: bool) -> bool:
    """:func:`binary` on the bytes of a raw OB or OW value of an even length (what pydicom decodes
    it to, and writes back unpadded), set back as a raw element when scrubbed. False: not done
    (a dry run, another encoding or VR; a private value that is ASCII text, which
    :func:`private_date` must look at): the caller decodes it and takes the general path."""
    if ctx.changes is not None or elem.VR not in ("OB", "OW") or not _explicit_le_raw(elem) or len(elem.value) % 2:
        return False
    value = elem.value
    if not value or private and value.isascii():  # empty: pydicom decodes it to None
        return False
    new, n = ctx.scrub(value)
    if len(new) % 2:
        return False
    if n:
        set_raw(ds, elem, new)
        ctx.note(name, "scrubbed", why + " (UIDs and identifying strings overwritten, same length)")
    else:
        ctx.note(name, "kept", why + " (checked)")
    return True


def ge_protocol(ds: Dataset, elem: DataElement, ctx: FileContext, name: str, why: str) -> None:
    """The GE protocol data block, scrubbed inside its gzip stream, or removed."""
    try:
        elem.value, _n = scrub_ge_protocol(bytes(elem.value or b""), ctx.scrubbing())
        ctx.note(name, "scrubbed", why)
    except (ValueError, OSError, EOFError):
        del ds[elem.tag]
        ctx.note(name, "removed", why + " (not a readable protocol block)")


def private_date(ds: Dataset, elem: DataElement, ctx: FileContext, name: str, why: str) -> bool:
    """A kept private element whose whole value is a date or date-time, whatever its VR
    (the Siemens CSA header "versions" (0029,1009)/(0029,1019) hold the acquisition date on
    some exports): shifted like a public date when a converter or the spec needs the
    element, removed otherwise (PS3.15 E.3.10 keeps safe private values, and a date kept
    verbatim gives the subject's date offset away). A binary (UN) value holding a whole UID
    gets its keyed UID, as a public one would. Returns False for other values."""
    raw = elem.value
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("ascii").strip(" \x00")
        except UnicodeDecodeError:
            return False
        if UID_TEXT.fullmatch(raw) and not is_standard_uid(raw):  # a UID kept as UN: keyed as a public one
            new_uid = ctx.keyed.uid(raw).encode("ascii")
            before, elem.value = elem.value, new_uid + (b"\x00" if len(new_uid) % 2 else b"")
            ctx.note(name, "new-uid", why + " (private value holding a UID)", before, elem.value)
            return True
        values = raw.split("\\")
    else:
        values = [str(v) for v in (raw if isinstance(raw, MultiValue) else [raw])]
    values = [v.strip(" \x00") for v in values]
    if not any(values) or not all(is_date_value(v) for v in values if v):
        return False
    if ctx.profile.keep_dates:
        ctx.note(name, "kept", why + " (date, rtnLongFullDatesOpt)")
        return True
    if not why.startswith(("needed by", "settings.keep_private")) or not ctx.profile.shift_dates:
        del ds[elem.tag]
        ctx.note(name, "removed", why + " (holds a date, not needed: PS3.15 E.3.10)", elem.value)
        return True
    _shift_private_dates(elem, ctx, name, why, values)
    return True


def _shift_private_dates(elem: DataElement, ctx: FileContext, name: str, why: str, values: list[str]) -> None:
    new = [(shift_da(v, ctx.days) if len(v) == 8 else shift_dt(v, ctx.days)) or "" if v else "" for v in values]
    before = elem.value
    if isinstance(before, (bytes, bytearray)):
        out = "\\".join(new).encode("ascii")
        elem.value = out + (b" " if len(out) % 2 else b"")
    else:
        elem.value = new if len(new) > 1 else new[0]
    ctx.dates_shifted = True
    ctx.note(name, "shifted", why + " (private value holding a date)", before, elem.value)
