"""The rule of the leak scan (:mod:`pacs2bids.deid.leakscan`): which identifying strings are searched.

Which values are searched, and where (the rule; README "Decisions" says the same)
-------------------------------------------------------------------------------------
The values come from the key store: those of the identity attributes of every file seen
(:data:`pacs2bids.deid.identifiers.IDENTIFYING_KEYWORDS`: patient name parts, IDs, other IDs,
birth date, address, telephone, accession number, institution name/address/department,
physicians, operators, station, device serial, procedure IDs; every PN element; original UIDs).
Protocol and procedure words, body parts and codes (ProtocolName, BodyPartExamined,
RequestedProcedureDescription, code sequences...) are not identities: they are never collected.

Each value is split into the strings searched for (:func:`pacs2bids.deid.patterns.variants`:
a person name gives its parts and its written forms "FIRST LAST", "LAST, FIRST"...). Each string
is then one of:

- *distinctive*: searched in every byte of every file (but a DICOM file's pixel samples:
  :mod:`pacs2bids.deid.dicomtext`), in any case and with or without accents,
  as a whole word (no letter or digit either side). That is a person's name written with another
  part of it ("Marie Default", "DEFAULT^MARIE", "Default_Marie"), and any other string with at
  least one word that is neither a common word nor a short number ("IPP77881234", "Dupontel",
  "Hopital Edouard Herriot", an address, a birth date "19630715", an original UID);
- *common*: a string whose every word is a common word (a lower-case entry of a system word
  list, English or French, accents ignored: "DEFAULT", "HEAD", "ROUTINE", "TECH", "Research
  MRI", and the first names that are words too: "Marie", "Jean", "Martin"), a number of fewer
  than 7 digits ("2339", "17240": years, sizes, counts and times look the same), or shorter
  than 4 characters once its common words are set aside — unless it holds a token of 8 characters
  or more, without spaces, mixing letters and digits ("GATE-PID-551177", "IPP-2024-0042": an ID
  written from common parts is distinctive as a whole). Such a string matches by chance in
  the product's own words ("pacs2bids default"), in kept descriptions ("HEAD ROUTINE") and coil
  names ("Head_32"): it is found only where an identity is held, as the whole value or a whole
  name component of a DICOM identity element (the attributes above and every PN element, at any
  depth, private blocks included) or of a JSON field or Parquet column named after one
  (dcm2niix sidecars: ``"InstitutionalDepartmentName": "DEFAULT"``). In free text, a common
  first name is caught next to its other part (a distinctive string).

A date element (DA, DT) of a DICOM file is not searched when the pseudonymisation shifted or emptied
every date (``scan_for_leaks(..., dates_shifted=True)``: the extraction's scan, unless the profile keeps
full dates): it holds a shifted date, which meets a birth date of the project by chance only.

A UID found only in an element that names a class (``*SOPClassUID``, ``*TransferSyntaxUID``) is no
hit: the pseudonymiser keeps those as they are, a private class (Siemens' CSA non-image storage
1.3.12.2.1107.5.9.1) included, and it names a kind of object, not a patient.

Word lists: every file of ``/usr/share/dict`` (Debian ``wamerican``, ``wfrench``; installed by
scripts/bootstrap.sh). Only lower-case entries count: "marie" (French verb) makes "Marie"
common, while "Hélène", listed nowhere in lower case, stays distinctive. With no word list the
scanner warns and searches every string everywhere (stricter, never looser). Values shorter
than 4 characters, placeholders ("DICOM", "phantom"...) and January 1st dates are skipped
(:mod:`pacs2bids.deid.patterns`).
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .identifiers import IDENTIFYING_KEYWORDS
from .leakfind import Finder, lowered
from .patterns import MIN_LENGTH, compile_strings, variants

log = logging.getLogger(__name__)

_WORD_LIST_DIR = Path("/usr/share/dict")
#: A number with fewer digits than this is common: years, sizes, counts and times look alike.
DISTINCTIVE_DIGITS = 7
#: A token (no space) of at least this many characters that mixes letters and digits is distinctive
#: whatever its parts: hospital IDs and accession numbers are often written that way.
COMPOUND_LENGTH = 8
_WORD = re.compile(r"[^\W_]+")


def _fold(text: str) -> str:
    """Lower case, accents and extra spaces removed: how common strings are compared."""
    plain = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    return " ".join(plain.lower().split())


@lru_cache(maxsize=1)
def _word_lists() -> tuple[Path, ...]:
    """The word lists of ``/usr/share/dict`` (warns once when there is none)."""
    try:
        lists = tuple(sorted({p.resolve() for p in _WORD_LIST_DIR.iterdir()  # "words" links to one of the others
                              if p.is_file() and not p.name.startswith("README")}))
    except OSError:
        lists = ()
    if not lists:
        log.warning(
            "no word list in %s (Debian packages wamerican and wfrench): the leak scanner searches every "
            "identifying string everywhere, common words included", _WORD_LIST_DIR,
        )
    return lists


def known_words(words: Iterable[str]) -> frozenset[str]:
    """Those of ``words`` (folded: :func:`_fold`) that a word list of ``/usr/share/dict`` holds in lower
    case, accents removed. The lists are read a line at a time and only the words asked for are
    kept: their 380,000 entries held as a set would take 55 MB of the run's memory for the rest
    of its life, for the few thousand words a project's identifiers have."""
    wanted = set(words)
    found: set[str] = set()
    for p in _word_lists() if wanted else ():
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    w = line.strip()
                    if w and w == w.lower() and "'" not in w:
                        # ASCII and lower case already: folding only joins its spaces (NFKD is a no-op)
                        w = " ".join(w.split()) if w.isascii() else _fold(w)
                        if w in wanted:
                            found.add(w)
        except OSError:
            continue
    return frozenset(found)


def _words(folded: str) -> list[str]:
    """The words of a folded string that a word list may hold (not numbers)."""
    return [w for w in _WORD.findall(folded) if not w.isdigit()]


def common_strings(strings: Iterable[str]) -> set[str]:
    """Those of ``strings`` that are common (:func:`is_common`), the word lists read once for all."""
    strings = list(strings)
    words = known_words(w for s in strings for w in _words(_fold(s)))
    return {s for s in strings if _is_common(s, words)}


def is_common(text: str) -> bool:
    """True when every word of ``text`` is a common word or a number of fewer than
    :data:`DISTINCTIVE_DIGITS` digits, or when what is left once they are set aside is shorter
    than 4 characters (see the module docstring). Reads the word lists: for many strings, use
    :func:`common_strings`."""
    return bool(common_strings([text]))


def _is_common(text: str, words: frozenset[str]) -> bool:
    """:func:`is_common`, ``words`` holding the common words among those of ``text``."""
    folded = _fold(text)
    if any(len(t) >= COMPOUND_LENGTH and any(c.isdigit() for c in t) and any(c.isalpha() for c in t)
           for t in folded.split()):
        return False  # a code such as "GATE-PID-551177": common parts, but distinctive as a whole
    rest = []
    for w in _WORD.findall(folded):
        if w.isdigit():
            if len(w) >= DISTINCTIVE_DIGITS:
                return False
            continue
        if w not in words:
            rest.append(w)
    digits = sum(c.isdigit() for c in text)
    if not rest:
        return digits < DISTINCTIVE_DIGITS
    return len("".join(rest)) < MIN_LENGTH and digits < DISTINCTIVE_DIGITS


_UNCOMPILED = object()


class Rules:
    """The identifying strings of a scan, sorted by the rule above.

    ``pattern`` (the distinctive strings, every spelling, case-folding) and ``common_pattern`` (to
    skip files that cannot hold a common string) are given, or compiled on first use from the
    strings as written (``written``: :func:`build_rules`); ``finder`` (whole files: both kinds, one
    pass) is built from the strings when not given, never empty. Built by :func:`build_rules` without
    ``keep_strings``, ``distinctive`` leaves out the strings of digits and dots (the finder alone holds
    them, as digests) and the patterns cannot be compiled."""

    def __init__(self, distinctive: Iterable[str] = frozenset(), common: Iterable[str] = frozenset(),
                 pattern: re.Pattern[bytes] | None = None, common_pattern: re.Pattern[bytes] | None = None,
                 _keywords: Iterable[str] = frozenset(), finder: Finder | None = None,
                 written: tuple[frozenset[str], frozenset[str]] | None = None, _partial: bool = False):
        self.distinctive, self.common = frozenset(distinctive), frozenset(common)  # common: folded (_fold)
        self._keywords = frozenset(_keywords)
        self._written = dict(zip(("pattern", "common_pattern"), written)) if written is not None else {}
        self._patterns = {"pattern": pattern, "common_pattern": common_pattern}
        for name in self._written:  # compiled on first use
            if self._patterns[name] is None:
                self._patterns[name] = _UNCOMPILED
        self._lock = threading.Lock()
        # built by build_rules without keep_strings: the strings of digits and dots are in the finder alone
        self._partial = _partial and finder is not None
        self.finder = finder if finder is not None else Finder.of(self.distinctive, self.common)
        # True when pseudonymisation shifted (or emptied) the value of every DA and DT element of the
        # DICOM files scanned: a string found in one is a shifted date, never an original value
        self.dates_shifted = False

    def _compiled(self, name: str) -> re.Pattern[bytes] | None:
        if self._partial:
            raise RuntimeError("these rules hold their UIDs as digests alone (the finder): "
                               "build them with build_rules(..., keep_strings=True) to compile the patterns")
        with self._lock:
            if self._patterns[name] is _UNCOMPILED:
                self._patterns[name] = compile_strings(self._written[name])
            return self._patterns[name]

    @property
    def pattern(self) -> re.Pattern[bytes] | None:
        return self._compiled("pattern")

    @property
    def common_pattern(self) -> re.Pattern[bytes] | None:
        return self._compiled("common_pattern")

    def holds_common(self, value: object) -> bool:
        """True when ``value`` (an identity field's value: text, PN or a list) is, or has as a
        whole name component, a common identifying string."""
        if not self.common or value is None:
            return False
        if isinstance(value, (list, tuple)):
            return any(self.holds_common(v) for v in value)
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        text = str(value)
        parts = {text} | set(re.split(r"[\\^=]", text))
        return any(_fold(p) in self.common for p in parts if p.strip())

    def is_identity_field(self, name: str) -> bool:
        return name in self._keywords


def _name_forms(value: str) -> set[str]:
    """The forms of a person name with two parts written next to each other (beyond those of
    :func:`variants`): joined by an underscore or a hyphen, as in file names."""
    out: set[str] = set()
    if "^" not in value:
        return out
    for group in value.split("="):
        parts = [p.strip() for p in group.split("^") if p.strip()]
        if len(parts) >= 2:
            last, first = parts[0], parts[1]
            out.update({f"{first}_{last}", f"{last}_{first}", f"{first}-{last}", f"{last}-{first}"})
    return out


def _plain_number(value: str) -> str | None:
    """``value`` as :func:`variants` trims it, when it is only digits and dots with at least
    :data:`DISTINCTIVE_DIGITS` digits (an original UID, a long number: most of a key store); such a
    string is its own only variant, has no other spelling and is distinctive (:func:`is_common`)."""
    v = value.strip().strip("\x00").strip()
    if len(v) >= MIN_LENGTH and v.isascii() and not v.strip("0123456789.") and len(v) - v.count(".") >= DISTINCTIVE_DIGITS:
        return v
    return None


def build_rules(identifiers: Iterable[str], *, keep_strings: bool = False) -> Rules:
    """Sort the strings of ``identifiers`` into distinctive and common ones (module docstring).

    ``identifiers`` is read once, as it comes (no copy of it): the strings of digits and dots (original
    UIDs) go straight into the rules, each once, with no intermediate strings. Their finder then holds
    them as digests alone (:class:`~pacs2bids.deid.leakfind.Finder`): the rules keep them as strings
    (``distinctive``, and the case-folding ``pattern``) only when ``keep_strings`` is true (tests and
    benchmarks comparing the finder with the patterns). At 20 copies of the shared corpus, 56,000 UIDs
    held twice (``str`` and ``bytes``) took 34 MB for the rest of the run."""
    distinctive: set[str] = set()
    numbers: set[bytes] = set()  # as the finder searches them: ASCII, no case
    others: set[str] = set()
    for v in identifiers:
        v = str(v)
        if (n := _plain_number(v)) is not None:
            numbers.add(n.encode("ascii"))
        else:
            others.add(v)
    maybe: set[str] = set()  # common or distinctive: the word lists tell, read once for all of them
    for value in others:
        found = variants(value)
        pairs = {s for s in found if "^" in s or " " in s or "," in s} if "^" in value else set()
        forms = _name_forms(value)
        for s in found | forms:
            if not s or len(s) < MIN_LENGTH:
                continue
            (distinctive if s in pairs or s in forms else maybe).add(s)
    del others
    common = common_strings(maybe - distinctive)
    distinctive |= maybe - common
    del maybe
    finder = Finder(lowered(distinctive) | numbers, lowered(common))
    if keep_strings:
        distinctive |= {n.decode("ascii") for n in numbers}
    del numbers
    distinctive_set, common_set = frozenset(distinctive), frozenset(common)
    del distinctive, common
    return Rules(  # the case-folding patterns are compiled when first asked for (few scans need them)
        distinctive=distinctive_set,
        common=frozenset(_fold(s) for s in common_set),
        _keywords=frozenset(IDENTIFYING_KEYWORDS),
        finder=finder,
        written=(distinctive_set, common_set) if keep_strings else None,
        _partial=not keep_strings,
    )
