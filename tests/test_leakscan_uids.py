"""The leak scan with a key store of many original UIDs (issue 12): strings of digits and dots are found
by their first bytes and looked up in a set, not by one alternation of every UID. Same hits as the
case-folding patterns (:attr:`Rules.pattern`, :attr:`Rules.common_pattern`) on planted texts."""

from __future__ import annotations

import random

from pacs2bids.deid import scan_for_leaks
from pacs2bids.deid.leakrules import build_rules


def _uids(rng: random.Random, n: int) -> list[str]:
    roots = ["1.2.840.113619.2", "1.3.12.2.1107.5.2", "1.2.276.0.7230010.3", "2.25"]
    return [f"{rng.choice(roots)}.{rng.randint(1, 99)}.{rng.randint(1, 10**6)}.{rng.randint(1, 10**12)}"
            for _ in range(n)]


def _texts(rng: random.Random, known: list[str], unknown: list[str]) -> list[bytes]:
    """Noise, digits and dots, with known and unknown UIDs planted whole, cut at a dot, extended by a
    component, inside a longer run, after a letter or digit, before a letter or digit, several in a row."""
    def form(uid: str) -> bytes:
        parts = uid.split(".")
        pick = rng.randrange(6)
        if pick == 1:  # a known UID's root, or a known UID then more components
            parts = parts[: rng.randint(1, len(parts))]
        elif pick == 2:
            parts = parts + [str(rng.randint(0, 999))]
        elif pick == 3:
            parts = [str(rng.randint(0, 99))] + parts
        elif pick == 4:  # last component longer or shorter
            parts[-1] = parts[-1] + str(rng.randint(0, 9)) if rng.random() < 0.5 else parts[-1][:-1]
        return ".".join(parts).encode()

    glue = [b"", b" ", b"x", b"X", b"9", b"0", b".", b"..", b"_", b"\\", b"\x00", b"=", b"a1", b"-"]
    out = []
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(0, 8)):
            uid = rng.choice(known if rng.random() < 0.6 else unknown)
            parts.append(rng.choice(glue) + form(uid) + rng.choice(glue))
            parts.append(bytes(rng.choice(b"0123456789.\x00abcxyz\xff") for _ in range(rng.randint(0, 30))))
        out.append(b"".join(parts))
    return out


def test_many_uids_same_hits_as_the_case_folding_patterns():
    rng = random.Random(14)
    known = _uids(rng, 1500)
    rules = build_rules(known + ["DEFAULT^MARIE", "IPP77881234", "19630715", "2339", "HEAD"], keep_strings=True)
    texts = _texts(rng, known, _uids(rng, 200))
    hits = 0
    for data in texts:
        expected = (rules.pattern.search(data) is not None, rules.common_pattern.search(data) is not None)
        assert rules.finder.kinds(data) == expected, data
        assert rules.finder.distinctive_in(data) == expected[0], data
        hits += expected[0]
    assert 50 < hits < len(texts)  # the texts hold both: some hits, some misses
    numeric = [w for w in rules.finder._searched if not w.strip(b"0123456789.")]
    assert max(map(len, numeric)) <= 12 and len(rules.finder._searched) < len(known)  # UIDs: their first bytes only


def test_a_uid_alone_in_the_key_store(tmp_path):
    """Only UIDs, no other string: still searched, in files and names."""
    uid = "1.2.840.113619.2.55.3.604688119.868.1249343483.504"
    rules = build_rules([uid])
    assert rules.finder.kinds(b"(0020,000d) " + uid.encode() + b"\x00") == (True, False)
    assert rules.finder.kinds(uid.encode() + b"1") == (False, False)
    assert rules.finder.kinds(b"7" + uid.encode()) == (False, False)
    assert rules.finder.kinds(b"7." + uid.encode() + b".4") == (True, False)
    (tmp_path / "a.txt").write_text(f"x {uid}")
    (tmp_path / f"b_{uid}").write_text("nothing")
    hits = {(h.path, h.field) for h in scan_for_leaks(tmp_path, rules)}
    assert hits == {("a.txt", "content"), (f"b_{uid}", "file name")}


def test_the_same_hits_with_the_automaton_of_a_big_key_store(monkeypatch):
    """Beyond 64 kB of strings the automaton is a contiguous NFA, not a DFA: the same hits."""
    from pacs2bids.deid import leakfind

    monkeypatch.setattr(leakfind, "_DFA_BYTES", 0)
    test_many_uids_same_hits_as_the_case_folding_patterns()
