"""The sessions' ``*_scans.tsv``: the one place that reads and writes them (BIDS 1.10, "Scans file").

A scans file lists the session's images by their path relative to the session folder, with
``acq_time``; heudiconv adds columns of its own, which are kept as they are.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from pacs2bids.bids.names import build_name, session_dir, session_entities

_HEADER = ["filename", "acq_time"]


def scans_path(bids_root: Path, subject: str, session: str | None) -> Path:
    """``<root>/sub-X/ses-Y/sub-X_ses-Y_scans.tsv``."""
    return Path(bids_root) / session_dir(subject, session) / build_name(
        session_entities(subject, session), "scans", ".tsv")


def acq_time(sidecar: dict, date: str) -> str:
    """scans.tsv acq_time (BIDS datetime, YYYY-MM-DDThh:mm:ss[.ffffff]) from the DICOM's (shifted)
    date and the sidecar's AcquisitionTime; n/a when either is missing or malformed."""
    t = str(sidecar.get("AcquisitionTime") or "")
    d = re.sub(r"\D", "", date or "")
    mt = re.fullmatch(r"(\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?", t)
    if len(d) != 8 or not mt or not (1 <= int(d[4:6]) <= 12 and 1 <= int(d[6:8]) <= 31):
        return "n/a"
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}T{mt.group(1)}:{mt.group(2)}:{mt.group(3)}{mt.group(4) or ''}"


def _read(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    if not path.exists():
        return list(_HEADER), {}
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh, delimiter="\t") if r]
    if not rows:
        return list(_HEADER), {}
    return rows[0], {r[0]: r for r in rows[1:] if r[0]}


def update_scans(path: Path, rows: dict[str, str] | None = None, *, renames: dict[str, str] | None = None,
                 keep_order: bool = False) -> Path | None:
    """Rewrite the scans file at ``path``: ``renames`` ({old file name: new file name}) applied,
    ``rows`` ({path relative to the session folder: acq_time}) added or replaced, and the rows of
    files that no longer exist dropped; other columns are kept. Rows are sorted by file name unless
    ``keep_order``. An empty table removes the file. Returns the path, or None when removed."""
    path = Path(path)
    header, table = _read(path)
    for old, new in (renames or {}).items():
        for name in [n for n in table if n.rsplit("/", 1)[-1] == old]:
            row = table.pop(name)
            table[name[: len(name) - len(old)] + new] = [name[: len(name) - len(old)] + new, *row[1:]]
    at = header.index("acq_time") if "acq_time" in header else None
    for name, when in (rows or {}).items():
        row = table.get(name) or [name] + ["n/a"] * (len(header) - 1)
        if at is not None:
            row[at] = when
        table[name] = row
    kept = {n: r for n, r in table.items() if (path.parent / n).exists()}
    if not kept:
        path.unlink(missing_ok=True)
        return None
    if keep_order and kept.keys() == table.keys() and not rows and not renames:
        return path  # nothing to change
    order = list(kept) if keep_order else sorted(kept)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\t".join(header) + "\n" + "".join("\t".join(kept[n]) + "\n" for n in order))
    os.replace(tmp, path)
    return path


def write_scans(bids_root: Path, subject: str, session: str | None, rows: dict[str, str]) -> Path | None:
    """Write (or update) the session's ``*_scans.tsv``: {path relative to the session folder: acq_time}.
    Rows of files that no longer exist are dropped."""
    return update_scans(scans_path(bids_root, subject, session), rows)
