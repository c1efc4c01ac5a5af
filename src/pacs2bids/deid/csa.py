"""Siemens CSA headers and other kept binary private values: length-preserving scrubs.

Decision (P6, P14): the Siemens CSA headers, private block ``(0029,"SIEMENS CSA HEADER")``,
are *kept* although neither PS3.15 Table E.3.10-1 nor TCIA keeps them, because dcm2niix reads
slice timing (``MosaicRefAcqTimes``), phase-encoding polarity
(``PhaseEncodingDirectionPositive``), diffusion (``B_value``, ``DiffusionGradientDirection``,
``B_matrix``), mosaic layout (``NumberOfImagesInMosaic``) and the readout parameters of the
Phoenix protocol from them. Neither header carries the patient's name or ID, but the series
header's Phoenix protocol text (``MrPhoenixProtocol``) holds references to other instances
(``tReferenceImage0 = "1.3.12.2..."``, Frame of Reference) whose UIDs embed the acquisition
date and time and the scanner's serial number. So, in both headers:

- every UID-like token (digits and dots, at least five components) is replaced by a keyed
  token of exactly the same length (:meth:`Keyed.uid_like`): the CSA structure (item lengths,
  offsets) stays valid without being re-encoded, and no original UID survives (P13);
- every identifying value found in the file's header (name, ID, birth date, accession number,
  institution, station, serial number, physicians) is overwritten by ``X`` of the same length.
- every date of the file's own header (StudyDate, SeriesDate, AcquisitionDate, ContentDate,
  any DA or DT, at any depth) written in the text (``YYYYMMDD``, ``YYYY-MM-DD``, ``DD.MM.YYYY``...)
  is shifted in place by the subject's offset, like the public dates (same form, same length):
  the Phoenix protocol of some exports holds the acquisition date as a plain number, outside any
  UID. Other date-like numbers (software baselines such as ``N4_VE11C_LATEST_20160120``) are
  not the patient's and are left as they are: shifting them would give the offset away.

The same byte scrub is applied to every other kept private value of VR OB, OW or UN (P14).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .patterns import shift_date_token

# A UID-like token not preceded by a digit or a dot. The first digit is matched before that
# look-behind (which then spans it): a pattern that starts with a character class lets the
# regex engine skip ahead to the digits, 3x faster on a CSA header than the look-behind first.
_UID_TOKEN = re.compile(rb"[0-9](?<![0-9.][0-9])[0-9]{0,9}(?:\.[0-9]{1,40}){4,}(?![0-9])")
UID_TEXT = re.compile(r"(?<![0-9.])[0-9]{1,10}(?:\.[0-9]{1,40}){4,}(?![0-9])")  # a whole UID in a text value (5+ components)


@dataclass(frozen=True)
class Scrub:
    """What a length-preserving scrub replaces, and with what: UID-like tokens by ``uid_like``
    (original, length) -> token, the ``identifiers`` found by their pattern by ``X``, and the
    file's own dates (``dates``, from :func:`pacs2bids.deid.patterns.date_tokens`) shifted by
    ``days``. A pattern left None replaces nothing."""

    uid_like: Callable[[str, int], str]
    identifiers: re.Pattern[bytes] | None = None
    dates: re.Pattern[bytes] | None = None
    days: int = 0


def scrub_bytes(value: bytes, scrub: Scrub) -> tuple[bytes, int]:
    """Return ``value`` with UID-like tokens, identifying strings and the file's own dates
    replaced in place (same length), as ``scrub`` says, and the number of replacements made."""
    count = 0

    def _uid(m: re.Match[bytes]) -> bytes:
        nonlocal count
        count += 1
        token = m.group(0)
        return scrub.uid_like(token.decode("ascii"), len(token)).encode("ascii")

    out = _UID_TOKEN.sub(_uid, value)
    if scrub.identifiers is not None:

        def _mask(m: re.Match[bytes]) -> bytes:
            nonlocal count
            count += 1
            return b"X" * len(m.group(0))

        out = scrub.identifiers.sub(_mask, out)
    if scrub.dates is not None:

        def _shift(m: re.Match[bytes]) -> bytes:
            nonlocal count
            count += 1
            return shift_date_token(m.group(0), scrub.days)

        out = scrub.dates.sub(_shift, out)
    return out, count


def scrub_ge_protocol(value: bytes, scrub: Scrub) -> tuple[bytes, int]:
    """GE ``(0025,"GEMS_SERS_01",1B)`` Protocol Data Block: a 4-byte little-endian length and
    a gzip stream of the protocol text, which dcm2niix reads (slice order, phase encoding).
    The text is scrubbed like a CSA header, and re-compressed without the gzip header's
    file name and time stamp (an acquisition date). Raises :class:`ValueError` when the value
    is not of that form (the caller then removes it)."""
    import gzip
    import io

    start = value.find(b"\x1f\x8b")
    if start < 0 or start > 16:
        raise ValueError("not a gzip protocol data block")
    text = gzip.decompress(value[start:])
    text, n = scrub_bytes(text, scrub)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(text)
    body = buf.getvalue()
    out = len(body).to_bytes(4, "little") + body if start == 4 else value[:start] + body
    if len(out) % 2:
        out += b"\x00"
    return out, n + 1
