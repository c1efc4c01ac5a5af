"""Text files larger than a window (the publication's manifest, which grows with the project) are searched a
window at a time (:meth:`pacs2bids.deid.leakfind.Finder.stream_kinds`): the same answer as a search of the
whole file, wherever the windows fall, with memory bounded by the window (issue 12, "memory stays flat")."""

from __future__ import annotations

import io
import json
import os
import random

import pytest

from _traced import traced_peak
from pacs2bids.deid import scan_for_leaks
from pacs2bids.deid.leakrules import build_rules

IDENTIFIERS = ["Bellefontaine^Joséphine", "IPP77881234", "DEFAULT^MARIE", "1.2.826.0.1.3680043.2.1125.99",
               "1.3.12.2.1107.5.2.43.66051.2023041209381234", "Hopital Edouard Herriot", "2339", "HEAD", "19630715"]


def _texts(rng: random.Random, n: int = 400) -> list[bytes]:
    """Short texts around the identifiers' spellings and near misses: inside longer words and numbers, after a
    dot, cut short, in other cases, next to bytes that are not ASCII."""
    pieces = [b"Bellefontaine", b"Jos\xc3\xa9phine", b"JOSEPHINE", b"IPP77881234", b"IPP778812345", b"DEFAULT",
              b"MARIE", b"marie default", b"1.2.826.0.1.3680043.2.1125.99", b"1.2.826.0.1.3680043.2.1125.991",
              b"1.3.12.2.1107.5.2.43.66051.2023041209381234", b"1.3.12.2.1107.5.2.43.66051", b"hopital edouard herriot",
              b"HOPITAL  EDOUARD", b"2339", b"23390", b"head", b"HEADS", b"19630715", b"1963-07-15", b"x", b"7."]
    glue = [b"", b" ", b".", b"^", b"_", b"\x00", b"\xc3\xa9", b"\n", b"a", b"9", b'"', b"\\", b", "]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append(rng.choice(glue) + rng.choice(pieces) + rng.choice(glue))
        out.append(b"".join(parts))
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 61])
def test_windows_find_what_the_whole_file_finds(chunk):
    rules = build_rules(IDENTIFIERS)
    finder = rules.finder
    both = [0, 0]
    for text in _texts(random.Random(chunk)):
        whole = finder.kinds(text)
        assert finder.stream_kinds(io.BytesIO(text), chunk=chunk) == whole, (chunk, text)
        assert finder.stream_kinds(io.BytesIO(text), want_common=False, chunk=chunk) == (whole[0], False), text
        both[0] += whole[0]
        both[1] += whole[1]
    assert 0 < both[0] < 400 and 0 < both[1] < 400  # hits and misses of each kind: the test compares something


def _manifest(path, rows: int, planted: str | None = None) -> None:
    """A JSON document shaped like the publication's manifest (paths and digests), written a row at a time."""
    with open(path, "w") as f:
        f.write('{"files": [\n')
        for i in range(rows):
            p = f"sub-{i // 300:03d}/ses-1/anat/{os.urandom(6).hex()}.nii.gz"
            if planted is not None and i == rows - 2:
                p = planted
            row = json.dumps({"path": p, "sha256": os.urandom(32).hex(), "size": i})
            f.write(row + (",\n" if i < rows - 1 else "\n"))
        f.write("]}\n")


def test_a_large_text_file_is_searched_with_memory_bounded_by_a_window(tmp_path):
    """A 25 MB manifest: the scan's Python memory stays under 8 MB (read whole, then lowered: twice the file, 50
    MB); an identifier near its end is still found."""
    root = tmp_path / "ds"
    root.mkdir()
    _manifest(root / "published.json", 200_000, planted="sourcedata/IPP77881234/x.dcm")
    size = (root / "published.json").stat().st_size
    assert size > 20e6
    rules = build_rules(IDENTIFIERS)
    scan_for_leaks(tmp_path / "ds", build_rules(["warm-up-only"]))
    hits, peak = traced_peak(scan_for_leaks, root, rules)
    assert [(h.path, h.field, h.kind) for h in hits] == [("published.json", "content", "text")]
    assert peak < 8e6, f"the scan of a {size / 1e6:.0f} MB file took {peak / 1e6:.0f} MB"


def test_a_large_json_document_still_has_its_identity_fields_searched(tmp_path):
    """A common string (a number under 7 digits, a common word) counts only in an identity field: in a JSON
    document larger than a window too, where it is found by field; elsewhere it is no hit."""
    root = tmp_path / "ds"
    root.mkdir()
    _manifest(root / "big.json", 30_000)
    data = json.loads((root / "big.json").read_text())
    data["files"][-1]["StudyID"] = "2339"
    data["note"] = "2339 HEAD"  # not an identity field
    (root / "big.json").write_text(json.dumps(data))
    assert (root / "big.json").stat().st_size > 2 * 1024 * 1024
    hits = scan_for_leaks(root, IDENTIFIERS)
    assert [(h.path, h.field, h.kind) for h in hits] == [("big.json", "files[29999].StudyID", "text")]
    del data["files"][-1]["StudyID"]
    (root / "big.json").write_text(json.dumps(data))
    assert scan_for_leaks(root, IDENTIFIERS) == []
