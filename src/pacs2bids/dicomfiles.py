"""Finding DICOM files by content, not by name (folders hold README and notes files too)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterator


def is_dicom(path: Path) -> bool:
    """True if the file starts with a DICOM Part 10 preamble and ``DICM`` prefix."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def iter_dicom_files(root: Path) -> Iterator[Path]:
    """Yield every DICOM Part 10 file under ``root``, sorted, skipping everything else."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if is_dicom(p):
                yield p


def iter_dicom_bytes(root: Path) -> Iterator[tuple[Path, bytes]]:
    """Like :func:`iter_dicom_files`, also opening gzip-compressed files (``*.gz``)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.endswith(".gz"):
                try:
                    data = gzip.decompress(p.read_bytes())
                except (OSError, EOFError):
                    continue
                if data[128:132] == b"DICM":
                    yield p, data
            elif is_dicom(p):
                yield p, p.read_bytes()
