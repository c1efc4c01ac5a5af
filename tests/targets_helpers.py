"""Shared by tests/test_targets_*.py: local versions to publish, and a reader of a target that
follows the documented protocol (CURRENT.json, then the version it names)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from pacs2bids.targets.manifest import MANIFEST_PATH, ensure_manifest

PROJECT = "epilepsy-2026"
LOG = logging.getLogger("pacs2bids.test.targets")


def make_version(root: Path, name: str, subjects: int = 3, size: int = 4000, files_per_subject: int = 1,
                 base: Path | None = None) -> Path:
    """A local published version folder ``root/name``: a copy of ``base`` (if given) plus
    ``subjects`` subjects of random images, a participants.tsv listing them all, and the marker."""
    version = root / name
    if base is not None:
        shutil.copytree(base, version)
        (version / MANIFEST_PATH).unlink(missing_ok=True)
    else:
        version.mkdir(parents=True)
        (version / ".pacs2bids").mkdir()
        (version / ".pacs2bids" / "dataset.json").write_text(json.dumps({"project": PROJECT, "tool": "pacs2bids"}))
        (version / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.10.0"}\n')
    start = len(list(version.glob("sub-*")))
    for i in range(start, start + subjects):
        anat = version / f"sub-{i:03d}" / "anat"
        anat.mkdir(parents=True)
        for j in range(files_per_subject):
            (anat / f"sub-{i:03d}_run-{j + 1}_T1w.nii.gz").write_bytes(os.urandom(size))
    subs = sorted(p.name for p in version.glob("sub-*"))
    (version / "participants.tsv").write_text("participant_id\n" + "".join(f"{s}\n" for s in subs))
    return version


def publish(target, version: Path):
    return target.publish(version, ensure_manifest(version), log=LOG)


def read_current(fs, prefix: str) -> tuple[dict, dict[str, bytes]] | None:
    """What a researcher's reader sees: CURRENT.json, then every file of the version it names
    (None when nothing is published yet)."""
    try:
        current = json.loads(fs.cat_file(f"{prefix}/CURRENT.json"))
    except FileNotFoundError:
        return None
    vdir = f"{prefix}/{current['path'].rstrip('/')}"
    manifest_bytes = fs.cat_file(f"{vdir}/{MANIFEST_PATH}")
    assert hashlib.sha256(manifest_bytes).hexdigest() == current["manifest_sha256"]
    manifest = json.loads(manifest_bytes)
    files = {rel: fs.cat_file(f"{vdir}/{rel}") for rel in manifest["files"]}
    return manifest, files


def assert_whole(manifest: dict, files: dict[str, bytes]) -> None:
    for rel, entry in manifest["files"].items():
        data = files[rel]
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], rel


def local_files(version: Path) -> dict[str, bytes]:
    return {p.relative_to(version).as_posix(): p.read_bytes() for p in version.rglob("*")
            if p.is_file() and p.relative_to(version).as_posix() != MANIFEST_PATH}
