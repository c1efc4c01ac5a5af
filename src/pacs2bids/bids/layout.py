"""The files of one session in the dataset: placing converted images, IntendedFor, and replacing or
removing what an earlier conversion left (BIDS 1.10)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from pacs2bids.bids.names import parse_name, session_dir
from pacs2bids.bids.scans import scans_path, update_scans

#: What dcm2niix writes for one image, in the order they are moved.
IMAGE_EXTS = (".nii.gz", ".nii", ".json", ".bval", ".bvec")
_DATATYPES = ("anat", "func", "dwi", "fmap", "perf", "pet", "beh", "mrs", "micr", "nirs", "eeg", "meg", "ieeg", "motion")


def _update_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    if change(meta):
        path.write_text(json.dumps(meta, indent=2) + "\n")


def place_image(src_stem: Path, rel: str, bids_root: Path, *, task: str | None = None,
                given: Mapping[str, Any] | None = None, aslcontext: tuple[str, ...] | None = None) -> list[str]:
    """Move one image's files (``src_stem`` + each of :data:`IMAGE_EXTS`) to ``rel`` + the same
    extension; TaskName (from the ``task`` entity) and ``aslcontext.tsv`` as BIDS asks, and the fields
    the project gives (``given``) where the sidecar lacks them. Returns the files written, relative
    to ``bids_root``."""
    files = []
    for ext in IMAGE_EXTS:
        src = src_stem.with_name(src_stem.name + ext)
        if src.exists():
            dest = bids_root / (rel + ext)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dest))
            files.append(rel + ext)
    side = bids_root / (rel + ".json")
    if side.exists() and (task or given):
        def add(meta: dict) -> bool:
            added = {k: v for k, v in (given or {}).items() if k not in meta}  # never over what the images say
            if task and not meta.get("TaskName"):  # BIDS requires TaskName beside every task-<label> image
                added["TaskName"] = task
            meta.update(added)
            return bool(added)

        _update_json(side, add)
    name = parse_name(rel)
    if aslcontext and name.suffix == "asl":
        context = Path(rel).with_name(name.with_(suffix="aslcontext", extension=".tsv").stem + ".tsv").as_posix()
        (bids_root / context).write_text("volume_type\n" + "".join(f"{v}\n" for v in aslcontext))
        files.append(context)
    return files


def add_intended_for(bids_root: Path, subject: str, session: str | None) -> list[str]:
    """Give every field map of the session (not its magnitude images) an ``IntendedFor`` listing
    the session's func, dwi and perf images, as BIDS URIs. Returns the sidecars changed."""
    sess = bids_root / session_dir(subject, session)
    targets = sorted(p.relative_to(bids_root).as_posix() for d in ("func", "dwi", "perf")
                     for p in (sess / d).glob("*.nii*") if (sess / d).is_dir())
    changed = []
    for js in sorted((sess / "fmap").glob("*.json")) if (sess / "fmap").is_dir() else []:
        if parse_name(js.name).suffix.rstrip("0123456789") == "magnitude":
            continue

        def point(meta: dict) -> bool:
            if targets:
                meta["IntendedFor"] = [f"bids::{t}" for t in targets]
            else:
                meta.pop("IntendedFor", None)
            return True

        _update_json(js, point)
        changed.append(js.relative_to(bids_root).as_posix())
    return changed


def clear_session(bids_root: Path, subject: str, session: str | None) -> list[str]:
    """Remove what an earlier conversion of this session left in ``bids_root`` (its datatype
    folders and scans.tsv; never sourcedata/ nor another session): a session is converted whole,
    so an image named differently this time leaves no stale copy. Returns the files removed."""
    sess = bids_root / session_dir(subject, session)
    removed = []
    for d in _DATATYPES:
        if (sess / d).is_dir():
            removed += [f.relative_to(bids_root).as_posix() for f in (sess / d).rglob("*") if f.is_file()]
            shutil.rmtree(sess / d)
    scans = scans_path(bids_root, subject, session)
    if scans.exists():
        scans.unlink()
        removed.append(scans.relative_to(bids_root).as_posix())
    return removed


def move_session(src_root: Path, dest_root: Path, subject: str, session: str | None) -> None:
    """Move the files of one session (``sub-X/[ses-Y/]``) from ``src_root`` into ``dest_root``,
    replacing what an earlier conversion of it left there."""
    src = src_root / session_dir(subject, session)
    clear_session(dest_root, subject, session)
    if not src.is_dir():
        return
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        dest = dest_root / f.relative_to(src_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dest))


def rename_outputs(session_root: Path, renames: dict[Path, str]) -> list[Path]:
    """Rename files ({file: new name in the same folder}) and their rows in the session's scans
    file (``session_root``: the ``sub-X[/ses-Y]`` folder). Returns the new paths."""
    done = []
    for old, new in renames.items():
        target = old.with_name(new)
        old.rename(target)
        done.append(target)
    for scans in session_root.glob("*_scans.tsv"):
        update_scans(scans, renames={p.name: n for p, n in renames.items()}, keep_order=True)
    return sorted(done)


def remove_outputs(session_root: Path, outputs: list[Path]) -> None:
    """Delete files of one session and their rows in its scans file; a session (or subject) left
    with nothing goes too, so that no empty subject stays in the dataset."""
    for p in outputs:
        p.unlink(missing_ok=True)
    for scans in session_root.glob("*_scans.tsv"):
        update_scans(scans, keep_order=True)
    for folder in (session_root, session_root.parent):
        files = [f for f in folder.rglob("*") if f.is_file()]
        if folder.name.startswith(("sub-", "ses-")) and all(
            f.name.endswith("_scans.tsv") and len(f.read_text().splitlines()) <= 1 for f in files
        ):
            shutil.rmtree(folder)
