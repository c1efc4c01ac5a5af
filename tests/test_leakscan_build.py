"""The leak scan's rules built from a big key store (issue 12): original UIDs go straight into the rules,
with the same result as the general path, and the build's memory stays bounded."""

from __future__ import annotations

import random
import subprocess
import sys
import tracemalloc

import pytest

from _traced import traced_peak
from pacs2bids.deid import leakrules
from pacs2bids.deid.leakfind import lowered
from pacs2bids.deid.leakrules import _plain_number, build_rules, common_strings
from pacs2bids.deid.patterns import _cased_forms, variants


def _uids(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    roots = ["1.3.12.2.1107.5.2.43", "1.2.840.113619.2.55.3", "2.25"]
    return [f"{rng.choice(roots)}.{rng.randint(1, 99999)}.{rng.randint(10**17, 10**21)}.{rng.randint(1, 10**6)}"
            for _ in range(n)]


def _general(value: str) -> tuple[set[str], set[str]]:
    """What the general path makes of a value with no name parts: (distinctive, common)."""
    found = {s for s in variants(value) if len(s) >= leakrules.MIN_LENGTH}
    common = common_strings(found)
    return found - common, common


EDGE = ["1234567", "123456", "1.2.3", "1.2.3.4.5.6.7", " 1.2.840.10008.5.1.4.1.1.4 ", "1.2.840.1\x00", "12345678901234",
        "..1234567..", "1.2", "0000000", "1.2.3.4.5.6", "1.2.3.4.5.6.77", "1234.567", "19630715", "2339", "1.2.3a4567",
        "１２３４５６７８", "1.2.3-4.5678"]


@pytest.mark.parametrize("value", EDGE + _uids(20))
def test_a_string_of_digits_and_dots_is_sorted_as_the_general_path_sorts_it(value):
    distinctive, common = _general(value)
    rules = build_rules([value], keep_strings=True)
    assert set(rules.distinctive) == distinctive
    assert set(rules.common) == {leakrules._fold(s) for s in common}
    if _plain_number(value) is not None:
        assert distinctive == {_plain_number(value)} and not common
    spelled = {f.encode("utf-8").lower() for s in distinctive for f in _cased_forms(s)}
    spelled |= {f.encode("latin-1").lower() for s in distinctive for f in _cased_forms(s) if max(map(ord, f)) < 256}
    assert lowered(distinctive) == spelled


def test_uids_skip_the_general_path(monkeypatch):
    """30,000 UIDs: none goes through variants/common_strings (the build took 25 s for them before, 3 s now)."""
    calls = []
    monkeypatch.setattr(leakrules, "common_strings", lambda s, _f=leakrules.common_strings: calls.extend(s) or _f(s))
    uids = _uids(3000)
    rules = build_rules(uids + ["DUPONTEL^JEAN"])
    assert all(rules.finder.holds_number("distinctive", u.encode()) for u in uids)
    assert calls and not any(c in set(uids) for c in calls)


_WORDS_HELD = """
import tracemalloc
tracemalloc.start()
from pacs2bids.deid.leakrules import build_rules
before = tracemalloc.get_traced_memory()[0]
rules = build_rules(["DEFAULT^MARIE", "Hopital Edouard Herriot", "Dupontel^Helene", "Research MRI"])
assert rules.common and rules.distinctive
now, peak = tracemalloc.get_traced_memory()
print(now - before, peak - before)
"""


def test_the_word_lists_are_not_held_in_memory():
    """Sorting strings into common and distinctive reads the system word lists (380,000 words) but keeps only
    the words asked for: held as a set, they took 55 MB of the run's RSS to its end, the leak scan's
    largest share at x1. In a fresh process (nothing cached): kept and peak under 5 MB (old code: 55 MB)."""
    out = subprocess.run([sys.executable, "-c", _WORDS_HELD], capture_output=True, text=True, check=True)
    kept, peak = map(int, out.stdout.split())
    assert kept < 5e6 and peak < 5e6, f"building the rules kept {kept / 1e6:.1f} MB (peak {peak / 1e6:.1f} MB)"


def test_building_rules_from_a_big_key_store_keeps_memory_bounded():
    """tracemalloc peak of building rules from 30,000 UIDs and 1,200 patients' values (10x the shared corpus's
    key store), the word lists read during the build: measured 29 MB (base 37 MB, and 55 MB of word lists
    loaded before)."""
    ids = set(_uids(30000))
    for i in range(1200):
        ids |= {f"PATIENT{i:05d}X^JEAN", f"IPP{10**7 + i}", f"ACC{10**6 + i * 7}"}
    rules, peak = traced_peak(build_rules, ids)
    assert rules.finder.distinctive_in(b"see " + sorted(ids)[5].encode() + b" here")
    assert peak < 50e6, f"building the rules took {peak / 1e6:.0f} MB"


def test_rules_hold_the_uids_of_a_big_key_store_as_digests():
    """What the rules keep for the rest of the run, from 56,000 UIDs (the key store at 20 copies of the shared
    corpus) and 240 patients' values: under 6 MB. Held as strings twice (``str`` in the rules, ``bytes`` in
    the finder) they kept 30 MB. Every UID is still found, and a UID it does not hold is not."""
    uids = _uids(56000)
    ids = set(uids)
    for i in range(240):
        ids |= {f"PATIENT{i:05d}X^JEAN", f"IPP{10**7 + i}", f"ACC{10**6 + i * 7}"}
    build_rules(["DUPONTEL^JEAN"])  # the word lists' first reading, outside the measure
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rules = build_rules(ids)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del ids
    assert kept < 6e6, f"the rules keep {kept / 1e6:.1f} MB"
    assert all(rules.finder.distinctive_in(b"(0020,000e) " + u.encode() + b"\x00") for u in uids[::97])
    assert not rules.finder.distinctive_in(b"(0020,000e) " + uids[5].encode() + b"1\x00")
    assert not rules.finder.distinctive_in(b"(0020,000e) 1.2.840.113619.2.55.3.99999999.1\x00")
    assert not any(u in rules.distinctive for u in uids[:100])  # held by the finder alone
    with pytest.raises(RuntimeError, match="keep_strings"):
        rules.pattern


def test_naming_the_element_of_a_hit_keeps_memory_bounded(sample_dir, tmp_path):
    """A DICOM file with a hit (a leaked UID, or a class UID the key store holds) is read by pydicom to name
    the element; that compiled the case-folding pattern of every original UID: at 10x the corpus (30,000
    UIDs) 262 MB and 127 s, the run's peak of memory (session 15). Now under 50 MB, in seconds."""
    import pydicom

    from pacs2bids.deid import scan_for_leaks

    uids = _uids(30000)
    rules = build_rules(uids + ["DUPONTEL^JEAN"])
    ds = pydicom.dcmread(sorted((sample_dir / "PACSMAN_data" / "dicomseries").glob("*.dcm"))[0])
    ds.ImageComments = f"see {uids[123]}"
    ds.save_as(tmp_path / "a.dcm")
    hits, peak = traced_peak(scan_for_leaks, tmp_path, rules)
    assert [h.field for h in hits] == ["ImageComments"]
    assert peak < 50e6, f"naming the element took {peak / 1e6:.0f} MB"
