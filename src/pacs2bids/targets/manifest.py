"""A published version's manifest: every file's relative path, size and SHA-256.

Built once from the local published version (each file read once, in blocks), saved inside it as
``.pacs2bids/manifest.json`` (not listed in itself) and published with it, so that a researcher
can check a copy::

    jq -r '.files | to_entries[] | "\\(.value.sha256)  \\(.key)"' .pacs2bids/manifest.json | sha256sum -c

A manifest already saved for the same version is read back, not recomputed (a re-run with
nothing new reads no dataset byte); one copied from an earlier version (the next run's staging
starts from the published dataset) names another version and is rebuilt.

The files the version's own run hashed for its lineage tables (``.pacs2bids/lineage/run-<run
id>.parquet`` and ``instances-<run id>.parquet``: every pseudonymised instance and converted file)
are not read again: their SHA-256 is taken from the table when the file has the size the table
says and has not changed since the table was written (its inode change time, which no tool can
set back, is older than the table's).

Nor are the files carried from the version before: when the next run's staging is seeded with
its dataset, :func:`record_carried` writes ``.pacs2bids/carried.parquet``: each copied file that
the earlier version's manifest hashed and that has not changed since that manifest was saved, with
the copy's size and inode change time. A file still at that size and change time takes its
SHA-256 from there. Every other file is read and hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..checksum import sha256_file
from ..lineage.tables import table_path

FORMAT = "pacs2bids-manifest/1"
MANIFEST_PATH = ".pacs2bids/manifest.json"
CARRIED_PATH = ".pacs2bids/carried.parquet"
_CARRIED = pa.schema([("path", pa.string()), ("size", pa.int64()), ("sha256", pa.string()), ("ctime_ns", pa.int64())])
_TMP_PREFIX = ".pacs2bids/.manifest.json.tmp-"  # + a unique suffix: targets build it at once in threads
file_sha256 = sha256_file  # looked up here at each call: tests count the files hashed by patching it


def _rows(table: Path, columns: list[str]) -> Iterator[tuple]:
    """The values of ``columns`` in the Parquet file ``table``, a row at a time (read a batch at a time)."""
    for batch in pq.ParquetFile(table).iter_batches(columns=columns):
        yield from zip(*(batch.column(name).to_pylist() for name in columns))


def lineage_hashes(version: Path) -> dict[str, tuple[int, str, int]]:
    """The checksums the version's own run recorded in its lineage tables: relative path -> (size,
    SHA-256, the table's inode change time in ns). Tables of earlier runs (copied with the dataset)
    are left out: a file may have changed in a later run. A table that cannot be read gives nothing."""
    run_ids = {version.name, re.sub(r"\.\d+$", "", version.name)}  # a run id published twice gets ".2"
    found: dict[str, tuple[int, str, int]] = {}
    for run_id in sorted(run_ids):
        for kind in ("run", "instances"):
            table = table_path(version, kind, run_id)
            try:
                changed = os.stat(table).st_ctime_ns
                for rel, size, sha in _rows(table, ["path", "size", "sha256"]):
                    if rel and sha and size is not None:
                        found[rel] = (size, sha, changed)
            except (OSError, pa.ArrowException):
                continue
    return found


def record_carried(source: Path, staging: Path) -> int:
    """Once the dataset of the published version ``source`` is copied into ``staging`` (the next run
    starts from it): record in ``staging``'s :data:`CARRIED_PATH` each copied file whose SHA-256
    ``source``'s saved manifest gives, when neither the file in ``source`` (inode change time older
    than the manifest's) nor its copy (same size) differs: path, size, SHA-256 and the copy's
    inode change time, for :func:`build_manifest`. A record copied with the dataset (it describes
    an earlier copy) is removed first. Returns the number of files recorded."""
    out = staging / CARRIED_PATH
    out.unlink(missing_ok=True)
    try:
        saved_at = os.stat(source / MANIFEST_PATH).st_ctime_ns
        saved = read_manifest((source / MANIFEST_PATH).read_bytes())
    except (OSError, ValueError):
        return 0  # no target had this version: nothing hashed to carry
    if saved.get("version") != source.name:
        return 0
    rows: dict[str, list] = {name: [] for name in _CARRIED.names}
    for rel, entry in saved["files"].items():
        try:
            src, copy = os.lstat(source / rel), os.lstat(staging / rel)
        except OSError:
            continue
        if (stat.S_ISREG(src.st_mode) and stat.S_ISREG(copy.st_mode) and src.st_ctime_ns < saved_at
                and src.st_size == copy.st_size == entry.get("size") and isinstance(entry.get("sha256"), str)):
            for name, value in zip(_CARRIED.names, (rel, copy.st_size, entry["sha256"], copy.st_ctime_ns)):
                rows[name].append(value)
    del saved
    if rows["path"]:
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
        pq.write_table(pa.table(rows, schema=_CARRIED), tmp)
        os.replace(tmp, out)
    return len(rows["path"])


def carried_hashes(version: Path) -> dict[str, tuple[int, str, int]]:
    """What :func:`record_carried` recorded in ``version``: relative path -> (size, SHA-256, the copy's
    inode change time in ns), keeping only the files recorded before the record was written (a file
    changed in the same kernel tick as its record could not be told apart). Empty without a record."""
    table = version / CARRIED_PATH
    found: dict[str, tuple[int, str, int]] = {}
    try:
        written = os.stat(table).st_ctime_ns
        for rel, size, sha, changed in _rows(table, _CARRIED.names):
            if changed < written:
                found[rel] = (size, sha, changed)
    except (OSError, pa.ArrowException):
        return {}
    return found


def build_manifest(version: Path) -> dict:
    """The manifest of the version folder ``version`` (regular files only, sorted paths); the files
    its run's lineage tables hashed (:func:`lineage_hashes`), and those carried unchanged from the
    version before (:func:`carried_hashes`), are not read again."""
    known, carried = lineage_hashes(version), carried_hashes(version)
    files: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(version):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(version).as_posix()
            if rel == MANIFEST_PATH or rel.startswith(_TMP_PREFIX):  # before any look: another target's goes
                continue
            st = path.lstat()  # one call: symlinks and other non-regular files are left out
            if not stat.S_ISREG(st.st_mode):
                continue
            size, sha, table_changed = known.pop(rel, (None, None, 0))
            if size != st.st_size or st.st_ctime_ns >= table_changed:  # not hashed this run, or changed since
                size, sha, copied = carried.pop(rel, (None, None, None))
                if size != st.st_size or st.st_ctime_ns != copied:  # not carried, or changed since its copy
                    sha = file_sha256(path)
            files[rel] = {"size": st.st_size, "sha256": sha}
    files = dict(sorted(files.items()))
    return {"format": FORMAT, "version": version.name, "files": files,
            "total_bytes": sum(f["size"] for f in files.values())}


def encode(manifest: dict) -> bytes:
    """The manifest's bytes as published (stable: sorted keys), whose SHA-256 CURRENT names."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def manifest_sha256(manifest: dict) -> str:
    return hashlib.sha256(encode(manifest)).hexdigest()


def read_manifest(data: bytes) -> dict:
    """A manifest from its bytes; raises ValueError when it is not one."""
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError("not a pacs2bids manifest")
    return manifest


def ensure_manifest(version: Path) -> dict:
    """The manifest of ``version``: read from ``.pacs2bids/manifest.json`` when it was saved for
    this version, else built and saved there (written to a temporary name, then renamed)."""
    path = version / MANIFEST_PATH
    if path.is_file():
        try:
            saved = read_manifest(path.read_bytes())
        except (OSError, ValueError):
            saved = None
        if saved is not None and saved.get("version") == version.name:
            return saved
    manifest = build_manifest(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = version / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.write_bytes(encode(manifest))
    os.replace(tmp, path)
    return manifest


def check_copy(root: Path, manifest: dict) -> list[str]:
    """What differs between the folder ``root`` and ``manifest``: files missing, of another size or
    checksum, or not listed (relative paths; empty when the copy is whole and exact)."""
    problems = []
    for rel, entry in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            problems.append(f"missing: {rel}")
        elif p.stat().st_size != entry["size"] or file_sha256(p) != entry["sha256"]:
            problems.append(f"differs: {rel}")
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_PATH and rel not in manifest["files"]:
            problems.append(f"not in the manifest: {rel}")
    return sorted(problems)
