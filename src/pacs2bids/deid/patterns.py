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
    words: set[bytes] = set()
    for v in values:
        for s in variants(v):
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
