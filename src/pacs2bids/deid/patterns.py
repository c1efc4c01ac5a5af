"""One compiled pattern for many identifying strings (used to clean text and to scan for leaks).

The strings are folded into a trie and written as one regular expression of nested
alternations: at each position the regex engine follows a single branch, so the cost grows
with the text, not with the number of identifiers (thousands of original UIDs per project).

Rules (documented, P14):
- values shorter than :data:`MIN_LENGTH` (4) characters are skipped: two- and three-letter
  codes ("M", "95", "LI") match everywhere and would drown real hits in noise;
- placeholder values (:data:`PLACEHOLDERS`: "DICOM", "phantom", "ANONYMOUS"...) are skipped:
  they identify nobody and are words of every README;
- matching is case-insensitive (names are typed in any case) and needs a boundary on both
  sides (no letter or digit just before or after), so ``1.2.3.4`` does not hit
  ``1.2.3.45`` and a name does not hit inside a longer word;
- a person name in DICOM PN form (``LAST^FIRST^MIDDLE``) also yields its components and the
  usual written forms (``FIRST LAST``, ``LAST FIRST``, ``LAST, FIRST``).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Iterable

MIN_LENGTH = 4

#: Placeholder values found in real exports' identity fields (QA phantoms, test exports,
#: already-anonymised studies). They identify nobody, and searching for them would fail every
#: dataset whose README or DICOM headers say "DICOM" or "phantom". Compared case-insensitively
#: with the whole value or PN component, never with part of one.
PLACEHOLDERS = frozenset(
    {
        "anon", "anonymous", "anonymized", "anonymised", "anonyme", "dicom", "phantom", "fantome", "test",
        "testing", "patient", "unknown", "inconnu", "none", "null", "nobody", "demo", "sample", "volunteer",
        "qa", "qc", "research", "study", "series", "scan", "mri", "irm",
    }
)


def variants(value: str) -> set[str]:
    """The strings searched for one identifying value."""
    value = str(value).strip().strip("\x00").strip()
    out: set[str] = set()
    if not value:
        return out
    if "^" in value or "=" in value:
        for group in value.split("="):  # PN component groups (alphabetic, ideographic, phonetic)
            parts = [p.strip() for p in group.split("^") if p.strip()]
            if not parts:
                continue
            out.add("^".join(parts))
            out.update(parts)
            if len(parts) >= 2:
                last, first = parts[0], parts[1]
                out.update({f"{first} {last}", f"{last} {first}", f"{last}, {first}", f"{last},{first}"})
            out.add(" ".join(parts))
    else:
        out.add(value)
    return {v for v in out if len(v) >= MIN_LENGTH and v.lower() not in PLACEHOLDERS}


def _trie_regex(words: Iterable[bytes]) -> bytes:
    trie: dict = {}
    for w in words:
        node = trie
        for b in w:
            node = node.setdefault(b, {})
        node[None] = True

    def emit(node: dict) -> bytes:
        end = None in node
        branches = [re.escape(bytes([k])) + emit(v) for k, v in sorted((k, v) for k, v in node.items() if k is not None)]
        if not branches:
            return b""
        body = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
        if end:
            return b"(?:" + body + b")?"
        return body

    return emit(trie)


@lru_cache(maxsize=64)
def _compile(words: frozenset[bytes]) -> re.Pattern[bytes] | None:
    if not words:
        return None
    body = _trie_regex(sorted(words))
    return re.compile(rb"(?<![A-Za-z0-9])(?:" + body + rb")(?![A-Za-z0-9])", re.IGNORECASE)


def looks_like_uid(value: str) -> bool:
    """Dotted digits, as a DICOM UID is written: replaced by element, never searched for in text."""
    return value.count(".") >= 2 and value.replace(".", "").isdigit()


def compile_identifiers(values: Iterable[str]) -> re.Pattern[bytes] | None:
    """A bytes pattern matching any variant of any value (UTF-8 and Latin-1 spellings);
    None when nothing is long enough to search."""
    return compile_strings(s for v in values for s in variants(v))


def compile_strings(strings: Iterable[str]) -> re.Pattern[bytes] | None:
    """A bytes pattern matching each string as written, in its cased and unaccented forms,
    in UTF-8 and Latin-1; None when nothing is long enough to search."""
    words: set[bytes] = set()
    for s in strings:
        for form in _cased_forms(s):
            for enc in ("utf-8", "latin-1"):
                try:
                    words.add(form.encode(enc))
                except UnicodeEncodeError:
                    pass
    return _compile(frozenset(words))


def _cased_forms(text: str) -> set[str]:
    """The spellings a name takes in free text. IGNORECASE on bytes folds ASCII letters only, so
    an accented letter must be listed in each case it can appear in (DURAND^HÉLÈNE is written
    "Hélène", "HÉLÈNE", "hélène"), and without its accents (systems that strip them: "Helene")."""
    forms = {text.lower(), text.upper(), text.title(), text}
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    if plain and plain != text and len(plain) >= len(text) - 2 * sum(not c.isascii() for c in text):
        forms.add(plain.lower())
    return forms


def clean_text(text: str, pattern: re.Pattern[bytes] | None) -> tuple[str, int]:
    """Remove every identifying value from ``text`` (Clean Descriptors, PS3.15 E.3.5), keep the
    rest (the science in a series description), and tidy the spaces left behind."""
    if pattern is None or not text:
        return text, 0
    raw = text.encode("utf-8", "surrogateescape")
    new, n = pattern.subn(b"", raw)
    if not n:
        return text, 0
    cleaned = new.decode("utf-8", "surrogateescape")
    cleaned = re.sub(r"[ _^-]{2,}", lambda m: m.group(0)[0], cleaned).strip(" _^-,")
    return cleaned, n


# -- personal data found by its form (Clean Descriptors, P14) --------------------------------
# A kept free-text value may hold a third party's contact or national number, which no header
# attribute names. These are found by their form and masked with "X" of the same length (the
# rest of the text, the science, stays readable; the length of a phone number tells nothing).
# Boundaries: no letter, digit, "." or "+" just before, no letter or digit just after, so that
# "3200", "1.5T", "0.9 mm" or a UID never match.
_B = r"(?<![\w.+])"
_E = r"(?![\w])"
_SEP = r"[ .\-]?"
PHONE = re.compile(
    _B
    + r"(?:"
    # French national: 0X XX XX XX XX, separators optional (space, dot, dash)
    + r"0[1-9](?:" + _SEP + r"\d{2}){4}"
    # French international: +33 or 0033, optional (0), then 9 digits in pairs
    + r"|(?:\+|00)33" + _SEP + r"(?:\(0\)" + _SEP + r")?[1-9](?:" + _SEP + r"\d{2}){4}"
    # other international (E.164): + country code, then groups, 7 to 14 digits in all
    + r"|\+[1-9]\d{0,2}(?:[ .\-]?\(?\d{1,4}\)?){2,6}"
    + r")"
    + _E
)
EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}" + _E)
# French NIR (numéro d'inscription au répertoire): sex, year, month, department (2A/2B for
# Corsica), commune, order number, then the 2-digit key; groups may be separated by spaces.
NIR = re.compile(
    r"(?<![\w])([1-478])\s?(\d{2})\s?(\d{2})\s?(\d{2}|2[AaBb])\s?(\d{3})\s?(\d{3})\s?(\d{2})" + _E
)


def nir_key_valid(groups: tuple[str, ...]) -> bool:
    """The NIR key is 97 - (the 13-digit number mod 97); Corsica's 2A and 2B count as 19 and 18."""
    *body, key = groups
    number = "".join(body).upper().replace("2A", "19").replace("2B", "18")
    return 97 - int(number) % 97 == int(key)


def mask_personal_data(text: str) -> tuple[str, int]:
    """Mask phone numbers (French and international), e-mail addresses and French NIRs (with
    a valid key) in ``text`` by ``X`` of the same length; returns the text and the count."""
    if not text or not any(c.isdigit() or c == "@" for c in text):
        return text, 0
    count = 0

    def _x(m: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return "X" * len(m.group(0))

    def _nir(m: re.Match[str]) -> str:
        return _x(m) if nir_key_valid(m.groups()) else m.group(0)

    out = EMAIL.sub(_x, text)
    out = NIR.sub(_nir, out)
    out = PHONE.sub(lambda m: _x(m) if 8 <= sum(c.isdigit() for c in m.group(0)) <= 15 else m.group(0), out)
    return out, count


# -- the file's own dates, wherever they are written (P4, P14) ------------------------------
def date_tokens(dates: Iterable[str]) -> re.Pattern[bytes] | None:
    """A bytes pattern finding the given dates (YYYYMMDD) as written in text or binary private
    values: ``YYYYMMDD``, ``YYYY-MM-DD``, ``YYYY.MM.DD``, ``YYYY/MM/DD``, ``DD.MM.YYYY``,
    ``DD/MM/YYYY``, ``DD-MM-YYYY``, not inside a longer run of digits (but ``YYYYMMDD`` followed
    by a time of day, ``YYYYMMDDHHMM...``). None without dates."""
    alts: set[str] = set()
    for d in dates:
        if not re.fullmatch(r"\d{8}", d or ""):
            continue
        y, m, dd = d[:4], d[4:6], d[6:]
        alts.add(f"{y}{m}{dd}")
        for sep in "-./":
            alts.add(re.escape(f"{y}{sep}{m}{sep}{dd}"))
            alts.add(re.escape(f"{dd}{sep}{m}{sep}{y}"))
    if not alts:
        return None
    # Each form, then the digit-free boundary behind it (a look-behind over its fixed length):
    # a pattern that starts with literals lets the regex engine skip to them (a look-behind
    # first made it try every form at every byte). A compact date may run on into its time of
    # day (20180918121530): shifted all the same.
    forms = []
    for a in sorted(alts):
        n = len(a.replace("\\", ""))
        end = rb"(?:(?![0-9])|(?=(?:[01][0-9]|2[0-3])[0-5][0-9]))" if a.isdigit() else rb"(?![0-9])"
        forms.append(a.encode() + rb"(?<![0-9][\s\S]{%d})" % n + end)
    return re.compile(b"|".join(forms))


def shift_date_token(token: bytes, days: int) -> bytes:
    """``token`` (one of :func:`date_tokens`' forms) shifted by ``days``, in the same form and
    length."""
    from datetime import date, timedelta

    text = token.decode("ascii")
    if text.isdigit():
        y, m, d, fmt = int(text[:4]), int(text[4:6]), int(text[6:]), "%Y%m%d"
    else:
        sep = text[2] if not text[2].isdigit() else text[4]
        a, b, c = text.split(sep)
        if len(a) == 4:
            y, m, d, fmt = int(a), int(b), int(c), f"%Y{sep}%m{sep}%d"
        else:
            y, m, d, fmt = int(c), int(b), int(a), f"%d{sep}%m{sep}%Y"
    return (date(y, m, d) + timedelta(days=days)).strftime(fmt).encode("ascii")


_WHOLE_DATE = re.compile(r"(19\d{2}|20\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?([+-]\d{4})?")


def is_date_value(value: str) -> bool:
    """True when a whole value reads as a DICOM date or date-time of 1900-2099 (``YYYYMMDD``,
    ``YYYYMMDDHHMMSS.FFFFFF&ZZXX``): a private text element holding one is a date, whatever its VR."""
    from datetime import date

    m = _WHOLE_DATE.fullmatch(value.strip(" \x00"))
    if not m:
        return False
    try:
        date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return False
    return True
