"""Scan a dataset for identifying values before it is published (P10, P14): fails closed upstream.

Every file under ``root`` is read:

- DICOM Part 10 files: the raw bytes of the whole file (so private elements, OB/UN values and
  whatever a header reader skips are covered); a hit is attributed to the element holding it
  when pydicom can parse the file, else reported as ``raw bytes``;
- NIfTI (``.nii``, ``.nii.gz``): the header fields ``descrip``, ``aux_file``, ``intent_name``,
  ``db_name`` and the header extensions (the voxels are not text);
- ``.gz`` files: decompressed, then as above;
- Parquet (the lineage tables): every value of every column, the schema and its metadata,
  decoded batch by batch; the raw bytes alone would miss values that the column encodings
  (dictionary, run-length) and compression (snappy, zstd) split or hide;
- everything else (JSON, TSV, text, ...): raw bytes;
- every file and folder name (relative to ``root``).

Matching follows :mod:`pacs2bids.deid.patterns`: one trie-shaped regex compiled once for all
identifiers, case-insensitive, with DICOM PN variants; values shorter than 4 characters are
skipped (documented there). A hit names the path and the field, never the value.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .patterns import compile_identifiers

_MAX_TEXT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class LeakHit:
    """One identifying value found: where (``path`` relative to the root, ``field``) and what
    kind of place it is (``dicom``, ``nifti-header``, ``parquet``, ``text``, ``name``, ``raw``)."""

    path: str
    field: str
    kind: str


def _dicom_fields(data: bytes, pattern: re.Pattern[bytes]) -> list[str]:
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        return []
    fields: list[str] = []

    def check(value: object) -> bool:
        if isinstance(value, (bytes, bytearray)):
            return bool(pattern.search(bytes(value)))
        try:
            return bool(pattern.search(str(value).encode("utf-8", "replace")))
        except Exception:
            return False

    def visit(d, prefix: str) -> None:
        for elem in d:
            name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or ()):
                    visit(item, f"{prefix}{name}[{i}].")
            elif check(elem.value):
                fields.append(prefix + name)

    visit(getattr(ds, "file_meta", []), "")
    visit(ds, "")
    return fields


def _nifti_fields(data: bytes, pattern: re.Pattern[bytes]) -> list[str]:
    sizes = (int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")) if len(data) >= 4 else (0, 0)
    if 540 in sizes and len(data) >= 540:
        spans = {"descrip": (240, 320), "aux_file": (320, 344), "intent_name": (508, 524)}
        ext_start = 544
    elif 348 in sizes and len(data) >= 348:
        spans = {"db_name": (14, 32), "descrip": (148, 228), "aux_file": (228, 252), "intent_name": (328, 344)}
        ext_start = 352
    else:  # not a NIfTI header: treat as raw bytes
        return ["raw bytes"] if pattern.search(data) else []
    fields = [name for name, (a, b) in spans.items() if pattern.search(data[a:b])]
    try:
        vox_offset = int(_vox_offset(data))
    except Exception:
        vox_offset = ext_start
    if vox_offset > ext_start and pattern.search(data[ext_start:min(vox_offset, len(data))]):
        fields.append("extensions")
    return fields


def _vox_offset(data: bytes) -> float:
    import struct

    if int.from_bytes(data[:4], "little") == 348:
        return struct.unpack("<f", data[108:112])[0]
    if int.from_bytes(data[:4], "big") == 348:
        return struct.unpack(">f", data[108:112])[0]
    if int.from_bytes(data[:4], "little") == 540:
        return struct.unpack("<q", data[168:176])[0]
    return struct.unpack(">q", data[168:176])[0]


def _parquet_fields(path: Path, pattern: re.Pattern[bytes]) -> list[str]:
    """Columns (and ``schema``) of a Parquet file holding a match; raises OSError when the file
    cannot be decoded (a scan that cannot read must not pass)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields: list[str] = []
    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.to_string(show_schema_metadata=True).encode("utf-8", "replace")
        meta += b"\n".join(k + b"=" + v for k, v in (pf.metadata.metadata or {}).items())
        if pattern.search(meta):
            fields.append("schema")
        for batch in pf.iter_batches(batch_size=8192):
            for name, column in zip(batch.schema.names, batch.columns):
                if name in fields:
                    continue
                text = "\n".join(str(v) for v in column.to_pylist() if v is not None)
                if pattern.search(text.encode("utf-8", "replace")):
                    fields.append(name)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise OSError(f"cannot read Parquet file {path.name}: {str(exc).strip()}") from None
    return fields


def _scan_bytes(rel: str, name: str, data: bytes, pattern: re.Pattern[bytes]) -> list[LeakHit]:
    lowered = name.lower()
    if lowered.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return [LeakHit(rel, "raw bytes", "raw")] if pattern.search(data) else []
        lowered = lowered[:-3]
    if lowered.endswith(".nii"):
        return [LeakHit(rel, f, "nifti-header") for f in _nifti_fields(data, pattern)]
    if len(data) >= 132 and data[128:132] == b"DICM":
        if not pattern.search(data):
            return []
        fields = _dicom_fields(data, pattern) or ["raw bytes"]
        return [LeakHit(rel, f, "dicom") for f in fields]
    if pattern.search(data):
        return [LeakHit(rel, "content", "text")]
    return []


def scan_for_leaks(root: Path, identifiers: Iterable[str]) -> list[LeakHit]:
    """Search every file and name under ``root`` for any of ``identifiers``.

    Returns the hits (empty: nothing found). Values shorter than 4 characters are ignored.
    Raises :class:`OSError` when a file cannot be read (a scan that cannot read must not pass).
    """
    root = Path(root)
    pattern = compile_identifiers(frozenset(str(v) for v in identifiers))
    if pattern is None:
        return []
    hits: list[LeakHit] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for d in dirnames:
            rel = str((base / d).relative_to(root))
            if pattern.search(d.encode("utf-8", "surrogateescape")):
                hits.append(LeakHit(rel, "folder name", "name"))
        for f in sorted(filenames):
            p = base / f
            rel = str(p.relative_to(root))
            if pattern.search(f.encode("utf-8", "surrogateescape")):
                hits.append(LeakHit(rel, "file name", "name"))
            if p.is_symlink() or not p.is_file():
                continue
            if _is_parquet(p):
                found = [LeakHit(rel, c if c == "schema" else f"column {c}", "parquet")
                         for c in _parquet_fields(p, pattern)]
                hits.extend(found or _scan_large(rel, p, pattern))  # and the raw bytes (footer, statistics)
                continue
            if p.stat().st_size > _MAX_TEXT_BYTES and not f.lower().endswith((".nii", ".nii.gz")):
                hits.extend(_scan_large(rel, p, pattern))
                continue
            hits.extend(_scan_bytes(rel, f, p.read_bytes(), pattern))
    return hits


def _is_parquet(p: Path) -> bool:
    """By content (magic ``PAR1`` at both ends), not by name."""
    try:
        size = p.stat().st_size
        if size < 12:
            return False
        with open(p, "rb") as fh:
            head = fh.read(4)
            fh.seek(size - 4)
            return head == b"PAR1" and fh.read(4) == b"PAR1"
    except OSError:
        return False


def _scan_large(rel: str, p: Path, pattern: re.Pattern[bytes]) -> list[LeakHit]:
    overlap = 1024
    prev = b""
    with open(p, "rb") as fh:
        while True:
            chunk = fh.read(16 * 1024 * 1024)
            if not chunk:
                return []
            if pattern.search(prev + chunk):
                return [LeakHit(rel, "raw bytes", "raw")]
            prev = chunk[-overlap:]
