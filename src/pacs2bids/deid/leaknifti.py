"""The NIfTI part of the leak scan (:mod:`pacs2bids.deid.leakscan`): a NIfTI-1 or NIfTI-2 file's header
and extensions are read (its voxels are not text), and its text fields searched."""

from __future__ import annotations

import gzip

from .leakfind import Finder


def nifti_fields(data: bytes, finder: Finder) -> list[str]:
    """The header fields (and extensions) of a NIfTI holding a distinctive string of ``finder``."""
    found = finder.distinctive_in
    if finder.empty:
        return []
    sizes = (int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")) if len(data) >= 4 else (0, 0)
    if 540 in sizes and len(data) >= 540:
        spans = {"descrip": (240, 320), "aux_file": (320, 344), "intent_name": (508, 524)}
        ext_start = 544
    elif 348 in sizes and len(data) >= 348:
        spans = {"db_name": (14, 32), "descrip": (148, 228), "aux_file": (228, 252), "intent_name": (328, 344)}
        ext_start = 352
    else:  # not a NIfTI header: treat as raw bytes
        return ["raw bytes"] if found(data) else []
    fields = [name for name, (a, b) in spans.items() if found(data[a:b])]
    try:
        voxels_at = int(vox_offset(data))
    except Exception:
        voxels_at = ext_start
    if voxels_at > ext_start and found(data[ext_start:min(voxels_at, len(data))]):
        fields.append("extensions")
    return fields


def vox_offset(data: bytes) -> float:
    """Where the voxels start, from a NIfTI-1 or NIfTI-2 header in either byte order."""
    import struct

    if int.from_bytes(data[:4], "little") == 348:
        return struct.unpack("<f", data[108:112])[0]
    if int.from_bytes(data[:4], "big") == 348:
        return struct.unpack(">f", data[108:112])[0]
    if int.from_bytes(data[:4], "little") == 540:
        return struct.unpack("<q", data[168:176])[0]
    return struct.unpack(">q", data[168:176])[0]


def nifti_head(fh, gz: bool) -> bytes | None:
    """A NIfTI's header and extensions (what the scan reads of it: the voxels are not text), from
    the file ``fh`` open at its start; None when it is not a NIfTI header (or not gzip data)."""
    try:
        src = gzip.GzipFile(fileobj=fh, mode="rb") if gz else fh
        head = src.read(544)
        sizes = (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")) if len(head) >= 4 else (0, 0)
        if not ((540 in sizes and len(head) >= 540) or (348 in sizes and len(head) >= 348)):
            return None
        try:
            end = int(vox_offset(head))
        except (ValueError, OverflowError):
            return head
        parts = [head]
        left = end - len(head)
        while left > 0 and (chunk := src.read(min(left, 1 << 20))):
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)
    except (OSError, EOFError):  # not gzip data, or cut short: read as raw bytes, as before
        return None
