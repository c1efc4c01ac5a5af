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
set back, is older than the table's). Every other file, those carried from earlier versions
included, is read and hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..checksum import sha256_file
from ..lineage.tables import table_path

FORMAT = "pacs2bids-manifest/1"
MANIFEST_PATH = ".pacs2bids/manifest.json"
_TMP_PREFIX = ".pacs2bids/.manifest.json.tmp-"  # + a unique suffix: targets build it at once in threads
file_sha256 = sha256_file  # looked up here at each call: tests count the files hashed by patching it


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
                for batch in pq.ParquetFile(table).iter_batches(columns=["path", "size", "sha256"]):
                    for rel, size, sha in zip(*(batch.column(i).to_pylist() for i in range(3))):
                        if rel and sha and size is not None:
                            found[rel] = (size, sha, changed)
            except (OSError, pa.ArrowException):
                continue
    return found


def build_manifest(version: Path) -> dict:
    """The manifest of the version folder ``version`` (regular files only, sorted paths); the files
    its run's lineage tables hashed are not read again (:func:`lineage_hashes`)."""
    known = lineage_hashes(version)
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
            if size != st.st_size or st.st_ctime_ns >= table_changed:  # not hashed, or changed since
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
