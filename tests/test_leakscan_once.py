"""The leak scan's cost (issue 12): each file opened once, each byte read at most once (a NIfTI's
header alone), one pass of one case-sensitive pattern over the lowered bytes for both kinds of
string, with the same matches as the case-folding patterns it replaces."""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import pydicom
import pytest

from pacs2bids.deid import scan_for_leaks
from pacs2bids.deid.leakrules import build_rules

IDENTIFIERS = ["Bellefontaine^Joséphine", "IPP77881234", "DEFAULT^MARIE", "1.2.826.0.1.3680043.2.1125.99", "2339",
               "Hopital Edouard Herriot", "HEAD"]


def _rchar() -> int:
    """Bytes this process has read through read(2) and the like, page cache included (Linux)."""
    fd = os.open("/proc/self/io", os.O_RDONLY)  # not through open(): the test counts those
    try:
        text = os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    for line in text.splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _dataset(root: Path, sample_dir: Path) -> Path:
    """Real DICOM files of the sample, a NIfTI (gzip) with 4 MB of voxels, a sidecar, a Parquet file."""
    import nibabel as nib
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "sourcedata").mkdir(parents=True)
    for i, f in enumerate(sorted((sample_dir / "PACSMAN_data" / "dicomseries").glob("*.dcm"))[:20]):
        shutil.copy(f, root / "sourcedata" / f"{i:03d}.dcm")
    anat = root / "sub-001" / "anat"
    anat.mkdir(parents=True)
    voxels = np.random.default_rng(0).integers(0, 2**15, size=(128, 128, 128), dtype=np.int16)
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), anat / "sub-001_T1w.nii.gz")
    (anat / "sub-001_T1w.json").write_text('{"SeriesDescription": "head routine", "ProtocolName": "t1"}')
    pq.write_table(pa.table({"path": ["sub-001/anat/sub-001_T1w.nii.gz"], "size": [1]}), root / "lineage.parquet")
    return root


def test_each_file_is_opened_once_and_read_at_most_once(sample_dir, tmp_path, monkeypatch):
    root = _dataset(tmp_path / "ds", sample_dir)
    files = [p for p in root.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    nifti = root / "sub-001" / "anat" / "sub-001_T1w.nii.gz"
    assert nifti.stat().st_size > 3_000_000  # random voxels do not compress
    rules = build_rules(IDENTIFIERS)
    assert scan_for_leaks(root, rules) == []  # a first scan imports what it needs

    opened: list[str] = []
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr("builtins.open", counting_open)
    before = _rchar()
    assert scan_for_leaks(root, rules) == []
    read = _rchar() - before
    monkeypatch.undo()
    assert sorted(opened) == sorted(str(p) for p in files), "each file opened once, and nothing else"
    # every byte at most once, and of the NIfTI its header alone (gzip reads ahead a little)
    assert read <= total - nifti.stat().st_size + 256 * 1024, (read, total)


def test_header_of_a_gzip_nifti_is_still_searched(sample_dir, tmp_path):
    """Reading a NIfTI's header alone keeps what was searched: its text fields and extensions."""
    import nibabel as nib
    import numpy as np

    root = tmp_path / "ds"
    root.mkdir()
    img = nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.int16), np.eye(4))
    img.header["descrip"] = b"exam IPP77881234"
    nib.save(img, root / "a.nii.gz")
    img = nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.int16), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"Bellefontaine Josephine"))
    nib.save(img, root / "b.nii")
    (root / "c.nii.gz").write_bytes(b"not gzip, about IPP77881234")  # not gzip: its raw bytes
    hits = {(h.path, h.field, h.kind) for h in scan_for_leaks(root, IDENTIFIERS)}
    assert hits == {("a.nii.gz", "descrip", "nifti-header"), ("b.nii", "extensions", "nifti-header"),
                    ("c.nii.gz", "raw bytes", "raw")}


def _texts(rng: random.Random) -> list[bytes]:
    """Binary noise and text with every searched spelling planted: at the start, at the end, inside
    longer words (no match), in other cases, in UTF-8 and Latin-1, next to each other."""
    words = [b"BELLEFONTAINE", b"bellefontaine", "Joséphine".encode(), b"JOS\xc9PHINE", b"Josephine",
             b"IPP77881234", b"ipp77881234", b"1.2.826.0.1.3680043.2.1125.99", b"2339", b"Default Marie",
             b"DEFAULT^MARIE", b"marie_default", b"hopital edouard HERRIOT", b"head", b"HEAD", b"Marie", b"default"]
    glue = [b"", b" ", b"x", b"9", b".", b"_", b"^", b"\x00", b"\xe9", b"-", b"A"]
    out = []
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(0, 6)):
            parts.append(rng.choice(glue) + rng.choice(words) + rng.choice(glue))
            parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
        out.append(b"".join(parts))
    return out


def test_one_pass_finds_what_the_case_folding_patterns_find():
    rules = build_rules(IDENTIFIERS, keep_strings=True)
    assert rules.common and rules.distinctive
    for data in _texts(random.Random(12)):
        expected = (rules.pattern.search(data) is not None, rules.common_pattern.search(data) is not None)
        assert rules.finder.kinds(data) == expected, data
        assert rules.finder.distinctive_in(data) == expected[0], data


@pytest.mark.parametrize("identifiers", [["2339", "HEAD"], ["IPP77881234"], []])
def test_one_kind_of_string_alone(identifiers):
    rules = build_rules(identifiers, keep_strings=True)
    for data in _texts(random.Random(3)):
        expected = (rules.pattern is not None and rules.pattern.search(data) is not None,
                    rules.common_pattern is not None and rules.common_pattern.search(data) is not None)
        assert rules.finder.kinds(data) == expected, data


def test_rules_made_by_hand_still_search():
    """Rules built without :func:`build_rules` get a finder of their strings, never an empty one."""
    from pacs2bids.deid.leakrules import Rules

    built = build_rules(["IPP77881234", "HEAD"], keep_strings=True)
    rules = Rules(distinctive=built.distinctive, common=built.common, pattern=built.pattern,
                  common_pattern=built.common_pattern)
    assert rules.finder.kinds(b"x IPP77881234 head y") == (True, True)


def test_a_clean_scan_compiles_one_pattern(sample_dir, tmp_path, monkeypatch):
    """Rules are built with no pattern (one automaton, every string, both kinds: session 15); where it
    matches, the kind is looked up, and the case-folding patterns are compiled only where a scan needs them (a DICOM file with a hit:
    to name the element). Issue 12: compiling the patterns of a key store of every original UID, five
    times, cost more than the scan."""
    import re

    from pacs2bids.deid import leakfind, leakrules

    compiled: list[bytes] = []
    real = re.compile

    def counting(pattern, flags=0):
        if isinstance(pattern, bytes) and pattern.endswith((b"(?![a-z0-9])", b"case-folding")):  # the scan's own
            compiled.append(pattern)
        return real(pattern, flags)

    uids = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(300)]  # a key store holds every original UID
    root = _dataset(tmp_path / "ds", sample_dir)
    monkeypatch.setattr(leakrules.re, "compile", counting)
    monkeypatch.setattr(leakfind.re, "compile", counting)
    monkeypatch.setattr(leakrules, "compile_strings", lambda strings: counting(b"case-folding"))
    rules = build_rules(IDENTIFIERS + uids)
    assert scan_for_leaks(root, rules) == []
    assert compiled == []  # the automaton of both kinds (it matched common words), no pattern
    planted = root / "sub-001" / "anat" / "sub-001_T1w.json"
    planted.write_text('{"PatientID": "IPP77881234"}')
    assert [h.path for h in scan_for_leaks(root, rules)] == [str(planted.relative_to(root))]
    assert compiled == []  # a hit in a sidecar is told without a pattern
    dicom = sorted(root.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(dicom)
    ds.ImageComments = f"see {uids[7]}"
    ds.save_as(dicom)
    assert {h.field for h in scan_for_leaks(root, rules) if h.path.endswith(".dcm")} == {"ImageComments"}
    assert compiled == []  # nor in a DICOM file: the element is named with the automaton (session 15)
