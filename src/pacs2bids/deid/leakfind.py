"""How the leak scan finds the strings of its rules in a file's bytes (:class:`Finder`), for
:mod:`pacs2bids.deid.leakrules` (which strings) and :mod:`pacs2bids.deid.leakscan` (where)."""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Iterator

import ahocorasick_rs
import numpy as np

from .patterns import _cased_forms

_ALNUM = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789")


def lowered(strings: Iterable[str]) -> frozenset[bytes]:
    """The spellings :func:`compile_strings` searches for (cased forms, UTF-8 and Latin-1),
    lowered as ``bytes.lower`` lowers: ASCII letters only, as ``re.IGNORECASE`` folds bytes."""
    words: set[bytes] = set()
    for s in strings:
        if s.isascii() and not s.strip("0123456789."):  # digits and dots: one spelling, no case
            words.add(s.encode("ascii"))
            continue
        for form in _cased_forms(s):
            for enc in ("utf-8", "latin-1"):
                try:
                    words.add(form.encode(enc).lower())
                except UnicodeEncodeError:
                    pass
    return frozenset(w for w in words if w)


#: A string of digits and dots at least :data:`_RUN_LENGTH` long (an original UID: most of a key store) is
#: found without a pattern of its own (:class:`Finder`); shorter ones (dates, numbers) are in the pattern.
_NUMERIC = re.compile(rb"[0-9][0-9.]*[0-9]")
_RUN_LENGTH = 12


_RUN = re.compile(rb"[0-9.]*")


def _dotted_prefixes(numbers: Iterable[bytes]) -> Iterable[bytes]:
    """Each part of each of ``numbers`` that ends before one of its dots."""
    for w in numbers:
        at = w.find(b".")
        while at >= 0:
            yield w[:at]
            at = w.find(b".", at + 1)


def _digest(data: bytes) -> int:
    """A 64-bit keyless digest of ``data``: the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _digests(strings: Iterable[bytes]) -> np.ndarray:
    return np.fromiter((_digest(s) for s in strings), dtype=np.uint64)


class _Digests:
    """A set of byte strings held as their sorted 64-bit digests (8 bytes each, against about 100 as a set of
    ``bytes``): a string held is always found; one not held is found by chance with a probability of
    ``len / 2**64`` (under 1e-13 for a million strings), a false block at worst, never a miss."""

    __slots__ = ("_sorted",)

    def __init__(self, strings: Iterable[bytes] = (), *, digests: np.ndarray | None = None):
        self._sorted = np.unique(_digests(strings) if digests is None else digests)

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, data: bytes) -> bool:
        d = np.uint64(_digest(data))
        i = int(self._sorted.searchsorted(d))
        return i < len(self._sorted) and self._sorted[i] == d


#: 0 for a byte where no string of the rules can go on (neither an ASCII letter, a digit nor a dot), else 1
_GOES_ON = bytes(1 if b < 128 and (chr(b).isalnum() or b == ord(".")) else 0 for b in range(256))

#: Bytes read at a time by :meth:`Finder.stream_kinds`.
STREAM_CHUNK = 1024 * 1024


def _last_stop(buf: bytes, lo: int) -> int:
    """The index (``lo`` or more) of the last byte of ``buf`` where no string can go on, or -1."""
    at = max(lo, len(buf) - 4096)  # most texts have one in their last bytes: translate those first
    while True:
        i = buf[at:].translate(_GOES_ON).rfind(0)
        if i >= 0:
            return at + i
        if at == lo:
            return -1
        at = lo


#: Up to this many bytes of strings, the automaton is a DFA (3x the speed of an NFA here; 23 MB for the 340 kB of a
#: synthetic key store of 1,200 patients); beyond, a contiguous NFA (no memory to speak of).
_DFA_BYTES = 64 * 1024


def _implementation(size: int) -> ahocorasick_rs.Implementation:
    return ahocorasick_rs.Implementation.DFA if size <= _DFA_BYTES else ahocorasick_rs.Implementation.ContiguousNFA


class Finder:
    """One pass over a file's bytes for both kinds of string (:meth:`kinds`).

    Same matches as :attr:`Rules.pattern` and :attr:`Rules.common_pattern` (a whole word, ASCII
    letters in any case: ``re.IGNORECASE`` on bytes folds ASCII only, as ``bytes.lower`` does),
    searched in the lowered bytes; the boundary before a match is checked here.

    Strings of digits and dots (original UIDs, dates, numbers: most of a key store) are not searched
    whole: where one may start is found by its first :data:`_RUN_LENGTH` bytes (few distinct ones: UIDs
    share their roots), and the strings the run of digits and dots there can hold (starting at its start
    or after a dot, ending at a dot or its end: the patterns' boundaries) are looked up among their 64-bit
    digests (:class:`_Digests`: 8 bytes a UID), walking on only while the run still starts a known string. The cost grows with the bytes, not with the
    number of UIDs. Those first bytes and the other strings are searched together, in one pass of an
    Aho-Corasick automaton (``ahocorasick_rs``, every occurrence, overlapping ones included) over the
    lowered bytes; the boundaries of each occurrence are checked here (the regexes of every string, for
    callers asking for them, are :class:`~pacs2bids.deid.leakrules.Rules`' own)."""

    def __init__(self, distinctive: frozenset[bytes], common: frozenset[bytes]):
        given = {"distinctive": distinctive, "common": common}
        self._has = {kind: bool(words) for kind, words in given.items()}
        numeric = {w for kind in (distinctive, common) for w in kind if len(w) >= _RUN_LENGTH and _NUMERIC.fullmatch(w)}
        self._words = {kind: words - numeric for kind, words in given.items()}
        # the strings of digits and dots (most of a key store: one per original UID) as digests (:class:`_Digests`),
        # and the parts of each before a dot; those several share (the roots, few) also as they are, looked up first
        self._numbers = {kind: _Digests(words & numeric) for kind, words in given.items()}
        seen: set[int] = set()
        shared: set[bytes] = set()
        for p in _dotted_prefixes(numeric):
            d = _digest(p)
            if d in seen:
                shared.add(p)
            else:
                seen.add(d)
        self._prefixes = _Digests(digests=np.fromiter(seen, dtype=np.uint64, count=len(seen)))
        self._shared = frozenset(shared)
        self._shortest = min(map(len, numeric), default=0)
        self._longest = max((len(w) for words in given.values() for w in words), default=0)
        del seen, shared
        words = sorted(self._words["distinctive"] | self._words["common"])
        # the kinds of each word, by its index; then where a string of digits and dots can start
        self._word_kinds = [tuple(k for k in ("distinctive", "common") if w in self._words[k]) for w in words]
        heads = sorted({w[:_RUN_LENGTH] for w in numeric})
        self._searched = words + heads
        self._automaton = ahocorasick_rs.BytesAhoCorasick(
            self._searched, implementation=_implementation(sum(map(len, self._searched)))) if self._searched else None
        del numeric

    @classmethod
    def of(cls, distinctive: Iterable[str], common: Iterable[str]) -> "Finder":
        return cls(lowered(distinctive), lowered(common))

    @property
    def empty(self) -> bool:
        """No string to search for."""
        return not (self._has["distinctive"] or self._has["common"])

    @property
    def searches_distinctive(self) -> bool:
        return self._has["distinctive"]

    def _numbers_at(self, low: bytes, s: int) -> set[str]:
        """The kinds of the strings of digits and dots starting at ``s`` in ``low``: each ends at a dot
        or where the run of digits and dots ends (then with no letter after it)."""
        b = _RUN.match(low, s).end()
        run_ends = b == len(low) or low[b] not in _ALNUM
        kinds: set[str] = set()
        e = low.find(b".", s, b)
        while True:
            stop = b if e < 0 else e
            piece = low[s:stop]
            if (stop < b or run_ends) and len(piece) >= self._shortest:
                kinds.update(k for k, numbers in self._numbers.items() if piece in numbers)
            if e < 0 or not (piece in self._shared or piece in self._prefixes):
                return kinds  # no known string goes on past this dot
            e = low.find(b".", e + 1, b)

    def holds_number(self, kind: str, number: bytes) -> bool:
        """True when ``number`` (a string of digits and dots of :data:`_RUN_LENGTH` bytes or more) is one of
        the strings of ``kind`` (``distinctive``, ``common``)."""
        return number in self._numbers[kind]

    def occurrences(self, data: bytes) -> Iterator[tuple[str, int]]:
        """Each string of the rules in ``data`` (a whole word): its kind and where it starts, in one
        pass over the lowered bytes."""
        if self._automaton is None:
            return
        low = data.lower()
        end, n_words = len(low), len(self._word_kinds)
        for i, s, e in self._automaton.find_matches_as_indexes(low, overlapping=True):
            if s and low[s - 1] in _ALNUM:
                continue  # inside a longer word: not a match (the patterns' look-behind)
            if i < n_words:
                if e < end and low[e] in _ALNUM:
                    continue  # goes on as a longer word (the patterns' look-ahead)
                kinds: Iterable[str] = self._word_kinds[i]
            else:
                kinds = self._numbers_at(low, s)
            for k in kinds:
                yield k, s

    def kinds(self, data: bytes, *, want_common: bool = True) -> tuple[bool, bool]:
        """(a distinctive string is in ``data``, a common one is), reading ``data`` once (and each run
        of digits and dots where a known one may start once more)."""
        want_common = want_common and self._has["common"]
        found = {"distinctive": False, "common": not want_common}
        for k, _at in self.occurrences(data):
            found[k] = True
            if found["distinctive"] and found["common"]:
                break
        return found["distinctive"], found["common"] and want_common

    def stream_kinds(self, fh, *, want_common: bool = True, chunk: int = STREAM_CHUNK) -> tuple[bool, bool]:
        """:meth:`kinds` of the rest of the binary file ``fh``, read ``chunk`` bytes at a time (memory bounded
        by the chunk, not by the file). Each window of search ends before a byte where no string can go on
        (so the end of a match or of a run of digits and dots there is the file's), and starts as many bytes
        as the longest string before the previous one ended: a string across two windows is whole in the
        second. A match at a window's very first byte (its look-behind unknown) is left out: it ended before
        the previous window's end, and was searched there."""
        want_common = want_common and self._has["common"]
        found = {"distinctive": False, "common": not want_common}
        back = self._longest + 1
        buf, searched, dropped = b"", 0, 0  # buf[:searched] is searched; the ``dropped`` bytes before it too
        while not (found["distinctive"] and found["common"]):
            data = fh.read(chunk)
            buf += data
            end = len(buf) if not data else _last_stop(buf, searched)
            if end > searched:
                start = max(searched - back, 0)
                for k, s in self.occurrences(buf[start:end]):
                    if s or not (start or dropped):  # at the window's first byte: the file's, or searched before
                        found[k] = True
                drop = max(end - back, 0)
                buf, searched, dropped = buf[drop:], end - drop, dropped + drop
            if not data:
                break
        return found["distinctive"], found["common"] and want_common

    def distinctive_in(self, data: bytes) -> bool:
        """True when a distinctive string is in ``data`` (as ``Rules.pattern.search``)."""
        return self.kinds(data, want_common=False)[0] if self.searches_distinctive else False
