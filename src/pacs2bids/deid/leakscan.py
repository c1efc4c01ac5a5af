"""Scan a dataset for identifying values before it is published (P10, P14): fails closed upstream.

Which values are searched, and where (the rule; README "Decisions" says the same)
-------------------------------------------------------------------------------------
The values come from the key store: those of the identity attributes of every file seen
(:data:`pacs2bids.deid.identifiers.IDENTIFYING_KEYWORDS`: patient name parts, IDs, other IDs,
birth date, address, telephone, accession number, institution name/address/department,
physicians, operators, station, device serial, procedure IDs; every PN element; original UIDs).
Protocol and procedure words, body parts and codes (ProtocolName, BodyPartExamined,
RequestedProcedureDescription, code sequences...) are not identities: they are never collected.

Each value is split into the strings searched for (:func:`pacs2bids.deid.patterns.variants`:
a person name gives its parts and its written forms "FIRST LAST", "LAST, FIRST"...). Each string
is then one of:

- *distinctive*: searched in every byte of every file, in any case and with or without accents,
  as a whole word (no letter or digit either side). That is a person's name written with another
  part of it ("Marie Default", "DEFAULT^MARIE", "Default_Marie"), and any other string with at
  least one word that is neither a common word nor a short number ("IPP77881234", "Dupontel",
  "Hopital Edouard Herriot", an address, a birth date "19630715", an original UID);
- *common*: a string whose every word is a common word (a lower-case entry of a system word
  list, English or French, accents ignored: "DEFAULT", "HEAD", "ROUTINE", "TECH", "Research
  MRI", and the first names that are words too: "Marie", "Jean", "Martin"), a number of fewer
  than 7 digits ("2339", "17240": years, sizes, counts and times look the same), or shorter
  than 4 characters once its common words are set aside — unless it holds a token of 8 characters
  or more, without spaces, mixing letters and digits ("GATE-PID-551177", "IPP-2024-0042": an ID
  written from common parts is distinctive as a whole). Such a string matches by chance in
  the product's own words ("pacs2bids default"), in kept descriptions ("HEAD ROUTINE") and coil
  names ("Head_32"): it is found only where an identity is held, as the whole value or a whole
  name component of a DICOM identity element (the attributes above and every PN element, at any
  depth, private blocks included) or of a JSON field or Parquet column named after one
  (dcm2niix sidecars: ``"InstitutionalDepartmentName": "DEFAULT"``). In free text, a common
  first name is caught next to its other part (a distinctive string).

A UID found only in an element that names a class (``*SOPClassUID``, ``*TransferSyntaxUID``) is no
hit: the pseudonymiser keeps those as they are, a private class (Siemens' CSA non-image storage
1.3.12.2.1107.5.9.1) included, and it names a kind of object, not a patient.

Word lists: every file of ``/usr/share/dict`` (Debian ``wamerican``, ``wfrench``; installed by
scripts/bootstrap.sh). Only lower-case entries count: "marie" (French verb) makes "Marie"
common, while "Hélène", listed nowhere in lower case, stays distinctive. With no word list the
scanner warns and searches every string everywhere (stricter, never looser). Values shorter
than 4 characters, placeholders ("DICOM", "phantom"...) and January 1st dates are skipped
(:mod:`pacs2bids.deid.patterns`).

Where (every file under ``root``):

- DICOM Part 10 files: the raw bytes of the whole file (so private elements, OB/UN values and
  whatever a header reader skips are covered); a hit is attributed to the element holding it
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
import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .patterns import MIN_LENGTH, compile_strings, variants

log = logging.getLogger(__name__)

_MAX_TEXT_BYTES = 256 * 1024 * 1024
_WORD_LIST_DIR = Path("/usr/share/dict")
#: A number with fewer digits than this is common: years, sizes, counts and times look alike.
DISTINCTIVE_DIGITS = 7
#: A token (no space) of at least this many characters that mixes letters and digits is distinctive
#: whatever its parts: hospital IDs and accession numbers are often written that way.
COMPOUND_LENGTH = 8
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class LeakHit:
    """One identifying value found: where (``path`` relative to the root, ``field``) and what
    kind of place it is (``dicom``, ``nifti-header``, ``parquet``, ``text``, ``name``, ``raw``)."""

    path: str
    field: str
    kind: str


def _fold(text: str) -> str:
    """Lower case, accents and extra spaces removed: how common strings are compared."""
    plain = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    return " ".join(plain.lower().split())


@lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """Lower-case entries of every word list in ``/usr/share/dict``, accents removed."""
    words: set[str] = set()
    try:
        lists = sorted(p for p in _WORD_LIST_DIR.iterdir() if p.is_file() and not p.name.startswith("README"))
    except OSError:
        lists = []
    for p in lists:
        try:
            text = p.read_text("utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            w = line.strip()
            if w and w == w.lower() and "'" not in w:
                words.add(_fold(w))
    if not words:
        log.warning(
            "no word list in %s (Debian packages wamerican and wfrench): the leak scanner searches every "
            "identifying string everywhere, common words included", _WORD_LIST_DIR,
        )
    return frozenset(words)


def is_common(text: str) -> bool:
    """True when every word of ``text`` is a common word or a number of fewer than
    :data:`DISTINCTIVE_DIGITS` digits, or when what is left once they are set aside is shorter
    than 4 characters (see the module docstring)."""
    folded = _fold(text)
    if any(len(t) >= COMPOUND_LENGTH and any(c.isdigit() for c in t) and any(c.isalpha() for c in t)
           for t in folded.split()):
        return False  # a code such as "GATE-PID-551177": common parts, but distinctive as a whole
    words = common_words()
    rest = []
    for w in _WORD.findall(folded):
        if w.isdigit():
            if len(w) >= DISTINCTIVE_DIGITS:
                return False
            continue
        if w not in words:
            rest.append(w)
    digits = sum(c.isdigit() for c in text)
    if not rest:
        return digits < DISTINCTIVE_DIGITS
    return len("".join(rest)) < MIN_LENGTH and digits < DISTINCTIVE_DIGITS


@dataclass
class Rules:
    """The identifying strings of a scan, sorted by the rule above."""

    distinctive: frozenset[str] = frozenset()
    common: frozenset[str] = frozenset()  # folded (:func:`_fold`)
    pattern: re.Pattern[bytes] | None = None  # the distinctive strings, every spelling
    common_pattern: re.Pattern[bytes] | None = None  # to skip files that cannot hold a common string
    _keywords: frozenset[str] = field(default_factory=frozenset)

    def holds_common(self, value: object) -> bool:
        """True when ``value`` (an identity field's value: text, PN or a list) is, or has as a
        whole name component, a common identifying string."""
        if not self.common or value is None:
            return False
        if isinstance(value, (list, tuple)):
            return any(self.holds_common(v) for v in value)
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        text = str(value)
        parts = {text} | set(re.split(r"[\\^=]", text))
        return any(_fold(p) in self.common for p in parts if p.strip())

    def is_identity_field(self, name: str) -> bool:
        return name in self._keywords


def _name_forms(value: str) -> set[str]:
    """The forms of a person name with two parts written next to each other (beyond those of
    :func:`variants`): joined by an underscore or a hyphen, as in file names."""
    out: set[str] = set()
    if "^" not in value:
        return out
    for group in value.split("="):
        parts = [p.strip() for p in group.split("^") if p.strip()]
        if len(parts) >= 2:
            last, first = parts[0], parts[1]
            out.update({f"{first}_{last}", f"{last}_{first}", f"{first}-{last}", f"{last}-{first}"})
    return out


def build_rules(identifiers: Iterable[str]) -> Rules:
    """Sort the strings of ``identifiers`` into distinctive and common ones (module docstring)."""
    from .identifiers import IDENTIFYING_KEYWORDS

    distinctive: set[str] = set()
    common: set[str] = set()  # as written: the pattern that picks the files to read needs every spelling
    for value in {str(v) for v in identifiers}:
        found = variants(value)
        pairs = {s for s in found if "^" in s or " " in s or "," in s} if "^" in value else set()
        for s in found | _name_forms(value):
            if not s or len(s) < MIN_LENGTH:
                continue
            if s in pairs or s in _name_forms(value) or not is_common(s):
                distinctive.add(s)
            else:
                common.add(s)
    return Rules(
        distinctive=frozenset(distinctive),
        common=frozenset(_fold(s) for s in common),
        pattern=compile_strings(distinctive),
        common_pattern=compile_strings(common),
        _keywords=frozenset(IDENTIFYING_KEYWORDS),
    )


#: Elements whose UID names a kind of object, not an instance: the pseudonymiser keeps them as they
#: are (a private SOP class such as Siemens' 1.3.12.2.1107.5.9.1 included), so a value there is no hit.
_CLASS_UID_KEYWORDS = ("SOPClassUID", "TransferSyntaxUID")


def _dicom_fields(data: bytes, rules: Rules, distinctive: bool) -> tuple[list[str], list[bytes]]:
    """The elements of a DICOM file holding a hit, and the class UIDs that matched (no hits)."""
    import io

    import pydicom
    from pydicom.datadict import keyword_for_tag

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        return [], []
    fields: list[str] = []
    classes: list[bytes] = []
    pattern = rules.pattern if distinctive else None

    def check(value: object) -> bool:
        if pattern is None:
            return False
        if isinstance(value, (bytes, bytearray)):
            return bool(pattern.search(bytes(value)))
        try:
            return bool(pattern.search(str(value).encode("utf-8", "replace")))
        except Exception:
            return False

    def visit(d, prefix: str) -> None:
        for tag in list(d.keys()):
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


def _nifti_fields(data: bytes, pattern: re.Pattern[bytes] | None) -> list[str]:
    if pattern is None:
        return []
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


def _parquet_fields(path: Path, rules: Rules) -> list[str]:
    """Columns (``schema``, ``statistics``) of a Parquet file holding a match, all decoded;
    raises OSError when the file cannot be decoded (a scan that cannot read must not pass)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pattern = rules.pattern
    fields: list[str] = []

    def hit(text: str) -> bool:
        return pattern is not None and bool(pattern.search(text.encode("utf-8", "surrogateescape")))

    try:
        pf = pq.ParquetFile(path)
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
        for batch in pf.iter_batches(batch_size=8192):
            for name, column in zip(batch.schema.names, batch.columns):
                if name in fields:
                    continue
                values = [v for v in column.to_pylist() if v is not None]
                if hit("\n".join(str(v) for v in values)) or (
                    rules.is_identity_field(name) and any(rules.holds_common(v) for v in values)
                ):
                    fields.append(name)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise OSError(f"cannot read Parquet file {path.name}: {str(exc).strip()}") from None
    return fields


def _scan_bytes(rel: str, name: str, data: bytes, rules: Rules) -> list[LeakHit]:
    pattern = rules.pattern
    lowered = name.lower()
    if lowered.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return [LeakHit(rel, "raw bytes", "raw")] if pattern is not None and pattern.search(data) else []
        lowered = lowered[:-3]
    if lowered.endswith(".nii"):
        return [LeakHit(rel, f, "nifti-header") for f in _nifti_fields(data, pattern)]
    if len(data) >= 132 and data[128:132] == b"DICM":
        distinctive = pattern is not None and pattern.search(data) is not None
        common = rules.common_pattern is not None and rules.common_pattern.search(data) is not None
        if not distinctive and not common:
            return []
        fields, classes = _dicom_fields(data, rules, distinctive)
        if not fields and distinctive:
            for uid in classes:  # matched only as a class UID? then nothing else may match
                data = data.replace(uid, b"")
            if pattern.search(data):
                fields = ["raw bytes"]
        return [LeakHit(rel, f, "dicom") for f in fields]
    if pattern is not None and pattern.search(data):
        return [LeakHit(rel, "content", "text")]
    if lowered.endswith(".json") and rules.common_pattern is not None and rules.common_pattern.search(data):
        return [LeakHit(rel, f, "text") for f in _json_fields(data, rules)]
    return []


def scan_for_leaks(root: Path, identifiers: Iterable[str] | Rules) -> list[LeakHit]:
    """Search every file and name under ``root`` for ``identifiers`` (or rules built from them
    by :func:`build_rules`), following the rule of the module docstring.

    Returns the hits (empty: nothing found). Values shorter than 4 characters are ignored.
    Raises :class:`OSError` when a file cannot be read (a scan that cannot read must not pass).
    """
    root = Path(root)
    rules = identifiers if isinstance(identifiers, Rules) else build_rules(identifiers)
    pattern = rules.pattern
    if pattern is None and not rules.common:
        return []
    hits: list[LeakHit] = []

    def named(text: str) -> bool:
        return pattern is not None and bool(pattern.search(text.encode("utf-8", "surrogateescape")))

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
            if p.is_symlink() or not p.is_file():
                continue
            if _is_parquet(p):
                hits.extend(LeakHit(rel, c if c in ("schema", "statistics") else f"column {c}", "parquet")
                            for c in _parquet_fields(p, rules))
                continue
            if p.stat().st_size > _MAX_TEXT_BYTES and not f.lower().endswith((".nii", ".nii.gz")):
                hits.extend(_scan_large(rel, p, pattern))
                continue
            hits.extend(_scan_bytes(rel, f, p.read_bytes(), rules))
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


def _scan_large(rel: str, p: Path, pattern: re.Pattern[bytes] | None) -> list[LeakHit]:
    if pattern is None:
        return []
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
