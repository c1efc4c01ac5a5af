"""pacs2bids.deid.writer: the same bytes as pydicom's ``save_as(enforce_file_format=True)``, raw
elements copied. Real files: the first files of every folder of both corpora and the sample (every
transfer syntax of dcm_qa_ts: the implicit VR, big endian and deflated ones are pydicom's), as read
and once pseudonymised."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser
from pacs2bids.deid.batch import deid_dataset
from pacs2bids.deid.context import FileContext
from pacs2bids.deid.writer import save
from pacs2bids.dicomfiles import iter_dicom_bytes

PER_FOLDER = 3


def _files(*roots: Path) -> list[tuple[str, bytes]]:
    per_folder: dict[Path, int] = defaultdict(int)
    out = []
    for root in roots:
        for path, data in iter_dicom_bytes(root):
            if per_folder[path.parent] < PER_FOLDER or "dcm_qa_ts" in str(path):
                per_folder[path.parent] += 1
                out.append((str(path.relative_to(root.parent)), data))
    return out


@pytest.fixture(scope="module")
def files(corpus_dir, vendors_dir, sample_dir) -> list[tuple[str, bytes]]:
    found = _files(corpus_dir, vendors_dir, sample_dir)
    assert len(found) > 150
    return found


def _both(data: bytes, tmp_path: Path, change=None) -> tuple[bytes, bytes]:
    ours, theirs = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(data))
    if change is not None:
        change(ours)
        change(theirs)
    save(ours, tmp_path / "ours.dcm")
    theirs.save_as(tmp_path / "theirs.dcm", enforce_file_format=True)
    return (tmp_path / "ours.dcm").read_bytes(), (tmp_path / "theirs.dcm").read_bytes()


def test_same_bytes_as_pydicom_for_every_file_as_read(files, tmp_path):
    differ = [name for name, data in files if (lambda a, b: a != b)(*_both(data, tmp_path))]
    assert differ == []


def test_same_bytes_as_pydicom_once_pseudonymised(files, tmp_path):
    """Decoded, changed, removed and added elements, new sequences, a rebuilt File Meta Information."""
    p = Pseudonymiser("w", b"writer-test-secret-0123456789", PseudonymizationSettings(), tmp_path / "keys")

    def change(ds):
        ctx = FileContext(p.keyed, p.profile, "01", None, __import__("collections").Counter(), None)
        deid_dataset(ds, ctx, pixels_reviewed=True)

    differ, done = [], 0
    for name, data in files:
        try:
            a, b = _both(data, tmp_path, change)
        except Exception:  # noqa: BLE001 - a file the walk refuses is quarantined, never written
            continue
        done += 1
        if a != b:
            differ.append(name)
    assert done > 150 and differ == []


def test_undecoded_elements_stay_raw_and_their_bytes_are_copied(files, tmp_path):
    data = next(d for name, d in files if "xa30i" in name)  # Siemens: private elements, CSA headers
    ds = pydicom.dcmread(io.BytesIO(data))
    private = [t for t, e in ds._dict.items() if t >> 16 & 1 and e.is_raw]
    assert len(private) > 5
    save(ds, tmp_path / "out.dcm")
    assert all(ds._dict[t].is_raw for t in private)  # copied, not decoded
    back = pydicom.dcmread(tmp_path / "out.dcm")
    assert [back.get_item(t).value for t in private] == [ds.get_item(t).value for t in private]
