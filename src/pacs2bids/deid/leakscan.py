"""Scan a dataset for identifying values before it is published (P10, P14): fails closed upstream.

Which values are searched, and how they are sorted into distinctive and common strings, is the
rule of :mod:`pacs2bids.deid.leakrules` (README "Decisions" says the same).

Where (every file under ``root``):

- DICOM Part 10 files: the raw bytes of the whole file but the pixel samples (:mod:`.dicomtext`: so
  private elements, OB/UN values and whatever a header reader skips are covered); a common string
  counts only in an element that can hold an identity (told from the element headers, pydicom read only
  then); a hit is attributed to the element holding it
  when pydicom can parse the file, else reported as ``raw bytes``;
- NIfTI (``.nii``, ``.nii.gz``): the header fields ``descrip``, ``aux_file``, ``intent_name``,
  ``db_name`` and the header extensions (the voxels are not text);
- ``.gz`` files: decompressed, then as above;
- Parquet (the lineage tables): every value of every column, the schema and its metadata and
  the column statistics, decoded. Never the file's raw bytes: compressed pages of hex digests
  hold runs of digits that match short numbers by chance, and the values they encode are
  all read decoded anyway;
- everything else (JSON, TSV, text, ...): raw bytes (JSON also by field, for common strings);
- every file and folder name (relative to ``root``).

A hit names the path and the field, never the value.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .dicomtext import PIXEL_TAGS, Element, element_at, elements, without_pixels
from .leakfind import STREAM_CHUNK
from .leakrules import Rules, build_rules
from .leaknifti import nifti_fields, nifti_head

_MAX_TEXT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class LeakHit:
    """One identifying value found: where (``path`` relative to the root, ``field``) and what
    kind of place it is (``dicom``, ``nifti-header``, ``parquet``, ``text``, ``name``, ``raw``)."""

    path: str
    field: str
    kind: str


#: Elements whose UID names a kind of object, not an instance: the pseudonymiser keeps them as they
#: are (a private SOP class such as Siemens' 1.3.12.2.1107.5.9.1 included), so a value there is no hit.
_CLASS_UID_KEYWORDS = ("SOPClassUID", "TransferSyntaxUID")


def _dicom_fields(data: bytes, rules: Rules, distinctive: bool, skip_pixels: bool = False) -> tuple[list[str], list[bytes]]:
    """The elements of a DICOM file holding a hit, and the class UIDs that matched (no hits);
    ``skip_pixels``: the top-level pixel samples were not searched (:mod:`.dicomtext`), nor are they here."""
    import pydicom
    from pydicom.datadict import keyword_for_tag

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        return [], []
    fields: list[str] = []
    classes: list[bytes] = []
    # the finder, not the case-folding pattern (same matches): compiling that pattern of every original UID
    # took 10 s and 29 MB at 1x, 127 s and 262 MB at 10x (the run's peak of memory: session 15)
    found = rules.finder.distinctive_in if distinctive else None

    def check(value: object) -> bool:
        if found is None:
            return False
        if isinstance(value, (bytes, bytearray)):
            return found(bytes(value))
        try:
            return found(str(value).encode("utf-8", "replace"))
        except Exception:
            return False

    def visit(d, prefix: str) -> None:
        for tag in list(d.keys()):
            if skip_pixels and not prefix and tag in PIXEL_TAGS:
                continue
            raw = d.get_item(tag)
            keyword = keyword_for_tag(tag) if not tag.is_private else ""
            if not distinctive and raw.VR not in (None, "UN", "SQ", "PN") and not rules.is_identity_field(keyword):
                continue  # only identity fields can hold a common string: left undecoded
            try:
                elem = d[tag]
                vr, value = elem.VR, elem.value
            except Exception:  # a value pydicom cannot decode: the raw bytes were searched
                continue
            name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
            if vr == "SQ":
                for i, item in enumerate(value or ()):
                    visit(item, f"{prefix}{name}[{i}].")
            elif rules.dates_shifted and vr in _DATE_VRS:
                continue  # a shifted date (_shifted_date)
            elif check(value):
                if vr == "UI" and name.endswith(_CLASS_UID_KEYWORDS):
                    classes.append(str(value).encode("ascii", "replace"))
                else:
                    fields.append(prefix + name)
            elif (vr == "PN" or rules.is_identity_field(elem.keyword or "")) and rules.holds_common(
                list(value) if isinstance(value, pydicom.multival.MultiValue) else value
            ):
                fields.append(prefix + name)

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        visit(meta, "")
    visit(ds, "")
    return fields, classes


_DATE_VRS = ("DA", "DT")


def _shifted_date(e: Element, rules: Rules) -> bool:
    """Whether ``e`` is a date element (DA, DT; an implicit VR from the dictionary) of files whose
    every date was shifted (:attr:`Rules.dates_shifted`). What it holds is then a shifted date, or
    empty: it equals a birth date or a long number by chance only (one patient's shifted study
    date on another's birth date: at 240 patients, one subject in a run), never by copy, and
    refusing it would refuse a large project for no leak."""
    if not rules.dates_shifted or e.pixels:
        return False
    if e.vr is not None:
        return e.vr.decode("ascii", "replace") in _DATE_VRS
    from pydicom.datadict import dictionary_VR

    try:
        return not (e.tag >> 16) & 1 and dictionary_VR(e.tag) in _DATE_VRS
    except KeyError:
        return False


def _placed(data: bytes, found: list[Element], rules: Rules) -> tuple[bool, bool]:
    """(a distinctive string is in ``data`` out of its pixel samples, a common one is in an element
    :func:`_dicom_fields` reads for one), from where each string is among the ``found`` elements."""
    from pydicom.datadict import keyword_for_tag

    starts = [e.start for e in found]
    distinctive = common = False
    for kind, pos in rules.finder.occurrences(data):
        e = element_at(found, starts, pos)
        if e is not None and _shifted_date(e, rules):
            continue
        if kind == "distinctive":
            distinctive = distinctive or e is None or not e.pixels
        elif not common:  # an element whose VR pydicom decides, a PN, or an identity field
            common = e is None or e.vr in (None, b"UN", b"PN") or (
                not (e.tag >> 16) & 1 and rules.is_identity_field(keyword_for_tag(e.tag)))
        if distinctive and common:
            break
    return distinctive, common


def _json_fields(data: bytes, rules: Rules) -> list[str]:
    """Identity fields of a JSON document (a dcm2niix sidecar names them by DICOM keyword)
    holding a common identifying string."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    found: list[str] = []

    def visit(node, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{where}.{k}" if where else str(k)
                scalar = isinstance(v, (str, int, float)) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
                if scalar and rules.is_identity_field(str(k)) and rules.holds_common(v):
                    found.append(here)
                    continue
                visit(v, here)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, f"{where}[{i}]")

    visit(doc, "")
    return found


def _parquet_fields(source, rules: Rules, name: str | None = None) -> list[str]:
    """Columns (``schema``, ``statistics``) of a Parquet file (a path, or a file object named
    ``name``) holding a match, all decoded; raises OSError when the file cannot be decoded (a
    scan that cannot read must not pass).

    Read a batch at a time, each column's values joined into one text by Arrow (:func:`_column_text`):
    memory is bounded by the batch, not by the table, which grows with the project (the lineage's
    instances: 54,300 rows at 20 copies of the corpus took 70 MB as Python values)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..memory import arrow_system_pool

    arrow_system_pool()  # its buffers go back to the system with the rest (pacs2bids.memory)
    fields: list[str] = []

    def hit(text: str | bytes) -> bool:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return rules.finder.distinctive_in(data)

    try:
        # pre_buffer off: a file object is read a column chunk at a time, not in one read of the file
        pf = pq.ParquetFile(source, pre_buffer=False)
        meta = pf.schema_arrow.to_string(show_schema_metadata=True)
        meta += "\n" + "\n".join(
            (k + b"=" + v).decode("utf-8", "replace") for k, v in (pf.metadata.metadata or {}).items()
        )
        if hit(meta):
            fields.append("schema")
        stats: list[str] = []
        for g in range(pf.metadata.num_row_groups):
            group = pf.metadata.row_group(g)
            for c in range(group.num_columns):
                st = group.column(c).statistics
                if st is not None and st.has_min_max:
                    stats += [str(st.min), str(st.max)]
        if hit("\n".join(stats)):
            fields.append("statistics")
        del stats
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, use_threads=False):
            for column_name, column in zip(batch.schema.names, batch.columns):
                if column_name in fields:
                    continue
                if hit(_column_text(column)) or (
                    rules.is_identity_field(column_name)
                    and any(rules.holds_common(v) for v in column.to_pylist() if v is not None)
                ):
                    fields.append(column_name)
    except (pa.ArrowException, ValueError, OSError) as exc:
        where = name or getattr(source, "name", source)
        raise OSError(f"cannot read Parquet file {Path(str(where)).name}: {str(exc).strip()}") from None
    return fields


#: Rows of a Parquet file decoded at a time by the leak scan.
_PARQUET_BATCH = 4096


def _column_text(column) -> str | bytes:
    """The values of an Arrow ``column`` (nulls left out) as one text, a line each, joined by
    Arrow (no Python object per value); the Python text of each value for the types Arrow cannot
    cast to text (nested ones)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = pc.drop_null(column)
    kind = values.type
    if pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        values, kind = values.cast(pa.binary()), pa.binary()
    elif not (pa.types.is_binary(kind) or pa.types.is_string(kind)):
        try:
            values, kind = values.cast(pa.string()), pa.string()
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            return "\n".join(str(v) for v in values.to_pylist())
    lists = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
    text = pc.binary_join(lists, b"\n" if pa.types.is_binary(kind) else "\n")[0].as_py()
    return text if text is not None else ""


def _scan_bytes(rel: str, name: str, data: bytes, rules: Rules) -> list[LeakHit]:
    finder = rules.finder
    lowered = name.lower()
    if lowered.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return [LeakHit(rel, "raw bytes", "raw")] if finder.distinctive_in(data) else []
        lowered = lowered[:-3]
    if lowered.endswith(".nii"):
        return [LeakHit(rel, f, "nifti-header") for f in nifti_fields(data, rules.finder)]
    if len(data) >= 132 and data[128:132] == b"DICM":
        distinctive, common = finder.kinds(data)  # one pass over the bytes, both kinds of string
        if not distinctive and not common:
            return []
        found = elements(data)
        if found is not None:  # where each string is: pixel samples and elements that cannot hold it set aside
            distinctive, common = _placed(data, found, rules)
            if not distinctive and not common:
                return []
        fields, classes = _dicom_fields(data, rules, distinctive, skip_pixels=found is not None)
        if not fields and distinctive:
            text = data if found is None else without_pixels(data, found)
            for uid in classes:  # matched only as a class UID? then nothing else may match
                text = text.replace(uid, b"")
            if finder.distinctive_in(text):
                fields = ["raw bytes"]
        return [LeakHit(rel, f, "dicom") for f in fields]
    distinctive, common = finder.kinds(data)  # one pass over the bytes, both kinds of string
    return _text_hits(rel, lowered.endswith(".json"), distinctive, common, lambda: data, rules)


def _text_hits(rel: str, is_json: bool, distinctive: bool, common: bool, whole, rules: Rules) -> list[LeakHit]:
    """The verdict on a file that is neither DICOM, NIfTI nor Parquet: a distinctive string anywhere is a
    hit; a common one only in the fields of a JSON document, read by ``whole()`` when it is needed."""
    if distinctive:
        return [LeakHit(rel, "content", "text")]
    if is_json and common:
        return [LeakHit(rel, f, "text") for f in _json_fields(whole(), rules)]
    return []


def scan_for_leaks(root: Path, identifiers: Iterable[str] | Rules, *, dates_shifted: bool = False) -> list[LeakHit]:
    """Search every file and name under ``root`` for ``identifiers`` (or rules built from them
    by :func:`build_rules`), following the rule of the module docstring. ``dates_shifted``: the
    pseudonymisation shifted every date, so the DA and DT elements of DICOM files hold no original
    value and are not searched (:func:`_shifted_date`).

    Each file is opened once and its bytes read once (a NIfTI's header alone), in one pass of
    one pattern for both kinds of string (:class:`pacs2bids.deid.leakrules.Finder`).
    Returns the hits (empty: nothing found). Values shorter than 4 characters are ignored.
    Raises :class:`OSError` when a file cannot be read (a scan that cannot read must not pass).
    """
    root = Path(root)
    rules = identifiers if isinstance(identifiers, Rules) else build_rules(identifiers)
    rules.dates_shifted = dates_shifted
    if rules.finder.empty:
        return []
    hits: list[LeakHit] = []

    def named(text: str) -> bool:
        return rules.finder.distinctive_in(text.encode("utf-8", "surrogateescape"))

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for d in dirnames:
            if named(d):
                hits.append(LeakHit(str((base / d).relative_to(root)), "folder name", "name"))
        for f in sorted(filenames):
            p = base / f
            rel = str(p.relative_to(root))
            if named(f):
                hits.append(LeakHit(rel, "file name", "name"))
            if not p.is_symlink() and p.is_file():
                hits.extend(_scan_file(rel, p, rules))
    return hits


def _scan_file(rel: str, p: Path, rules: Rules) -> list[LeakHit]:
    """The hits of one file, opened once."""
    name = p.name.lower()
    with open(p, "rb") as fh:
        if name.endswith((".nii", ".nii.gz")):
            data = nifti_head(fh, name.endswith(".gz"))
            if data is not None:
                return [LeakHit(rel, f, "nifti-header") for f in nifti_fields(data, rules.finder)]
            fh.seek(0)  # not a NIfTI after all, or not gzip: as any other file
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(132)  # what the file is, by content: Parquet's magic, DICOM's after its preamble
        if _is_parquet(fh, size, head):  # not by name; read a batch at a time
            return _parquet_hits(rel, fh, rules, name=p.name)
        fh.seek(0)
        if size > _MAX_TEXT_BYTES:  # too large to read whole, whatever it is: its raw bytes, a window at a time
            found = rules.finder.searches_distinctive and rules.finder.stream_kinds(fh, want_common=False)[0]
            return [LeakHit(rel, "raw bytes", "raw")] if found else []
        if size > STREAM_CHUNK and not name.endswith(".gz") and head[128:132] != b"DICM":
            return _scan_text(rel, name, fh, rules)
        data = fh.read()
    return _scan_bytes(rel, p.name, data, rules)


def _scan_text(rel: str, name: str, fh, rules: Rules) -> list[LeakHit]:
    """A text file larger than a window (the publication's manifest grows with the project: 6.6 MB at 20
    copies of the corpus), searched a window at a time; a JSON document holding a common string is then
    read whole, for its fields (as :func:`_scan_bytes`)."""
    is_json = name.endswith(".json")
    distinctive, common = rules.finder.stream_kinds(fh, want_common=is_json)

    def whole() -> bytes:
        fh.seek(0)
        return fh.read()

    return _text_hits(rel, is_json, distinctive, common, whole, rules)


def _parquet_hits(rel: str, source, rules: Rules, name: str | None = None) -> list[LeakHit]:
    return [LeakHit(rel, c if c in ("schema", "statistics") else f"column {c}", "parquet")
            for c in _parquet_fields(source, rules, name)]


def _is_parquet(fh, size: int, head: bytes) -> bool:
    """By content (magic ``PAR1`` at both ends; ``head``: the file's first bytes), not by name; ``fh`` is
    left at its start when it is one."""
    if size < 12 or not head.startswith(b"PAR1"):
        return False
    fh.seek(size - 4)
    tail = fh.read(4)
    fh.seek(0)
    return tail == b"PAR1"
