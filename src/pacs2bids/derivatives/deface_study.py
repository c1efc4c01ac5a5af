"""The defacing of one study's converted images into ``derivatives/pacs2bids-deface/`` (no engine).

Called by :func:`pacs2bids.study.extract_study` after conversion, so one study's defacing overlaps
the other studies' work. Each chosen image (spec ``derivatives.deface``: suffixes, 3D only) gives
``sub-X/[ses-Y/]anat/<name>_desc-defaced_<suffix>.nii.gz`` with a JSON sidecar (source file,
method, registration tool, start and end, voxels zeroed, the checks' measures) and a PNG
snapshot under ``figures/`` for review. The derivative's ``dataset_description.json`` has
``DatasetType: derivative``, ``GeneratedBy`` and ``SourceDatasets``. With ``replace_raw`` the
shared dataset gets the defaced image in place of the raw one; the original moves to the private
work area (``deface-originals/``), and an image that could not be defaced is left out.
Every image gives one entry ``{derivative, label, source, file, status, reason, seconds}``
(status ``defaced`` or ``failed``) for the run summary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib

from ..bids.dataset import write_derivative_description
from ..provdoc import record_stage
from ..run import RunContext
from .deface import METHOD, DefaceFailed, deface, load_3d, pydeface_version, snapshot
from .register import tool_name

log = logging.getLogger(__name__)
NAME = "pacs2bids-deface"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # studies write at once
    tmp.write_text(text)
    os.replace(tmp, path)


def write_description(root: Path, version: str) -> None:
    """The derivative's dataset_description.json (and its .bidsignore: the review snapshots)."""
    tool = tool_name()
    write_derivative_description(root, "pacs2bids defacing (pydeface's template and face mask)", generated_by=[
        {"Name": "pacs2bids", "Version": version,
         "Description": f"{METHOD} {pydeface_version()}'s method: its template registered onto each image with "
                        f"{tool} (affine, 12 dof), its face mask resampled into the image, face voxels zeroed"},
        {"Name": METHOD, "Version": pydeface_version(), "Description": "template and face mask"},
        {"Name": tool, "Description": "registration"},
    ])
    _write(root / ".bidsignore", "figures\n")  # the validator ignores a folder named without its slash


def chosen(staging: Path, outputs: list[str], settings) -> list[str]:
    """The converted NIfTI files (relative to staging) the spec asks to deface."""
    picked = []
    for rel in outputs:
        if not rel.endswith((".nii.gz", ".nii")) or "/anat/" not in f"/{rel}":
            continue
        stem = rel.removesuffix(".gz").removesuffix(".nii")
        if stem.rsplit("_", 1)[-1] not in settings.suffixes:
            continue
        if settings.only_3d and not _is_3d(staging / rel, staging / f"{stem}.json"):
            continue
        picked.append(rel)
    return picked


def _is_3d(image: Path, sidecar: Path) -> bool:
    """3D acquisition per the sidecar; without the field, a near-isotropic volume of 64+ slices."""
    try:
        kind = json.loads(sidecar.read_text()).get("MRAcquisitionType")
    except (OSError, ValueError):
        kind = None
    if kind:
        return kind == "3D"
    img = nib.load(image)
    zooms = img.header.get_zooms()[:3]
    return img.ndim >= 3 and min(img.shape[:3]) >= 64 and max(zooms) / min(zooms) < 2


def defaced_name(rel: str) -> str:
    """``sub-X/anat/sub-X_T1w.nii.gz`` -> ``sub-X/anat/sub-X_desc-defaced_T1w.nii.gz`` (desc is last)."""
    folder, _, name = rel.rpartition("/")
    base, _, suffix = name.partition(".")
    entities, _, bids_suffix = base.rpartition("_")
    return f"{folder}/{entities}_desc-defaced_{bids_suffix}.{suffix}"


def deface_study(ctx: RunContext, lbl: str, outputs: list[str], version: str) -> list[dict]:
    """Deface the chosen images among ``outputs`` (a study's converted files, relative to staging);
    returns one entry per image. Never raises for one image's failure."""
    settings = ctx.spec.derivatives.deface
    if settings is None or not settings.enabled:
        return []
    root = ctx.staging / "derivatives" / NAME
    entries = []
    for rel in chosen(ctx.staging, outputs, settings):
        entry = {"derivative": "deface", "label": lbl, "source": rel, "file": "", "status": "failed"}
        try:
            entry.update(_one(ctx, root, rel, settings.replace_raw))
        except DefaceFailed as exc:
            entry["reason"] = str(exc)
        except Exception as exc:  # one image's failure never stops the study
            entry["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if entry["status"] == "failed":
            log.error("%s: %s not defaced: %s", lbl, Path(rel).name, entry["reason"])
            if settings.replace_raw:
                entry["reason"] += "; left out of the shared dataset (replace_raw)"
                _set_aside(ctx, rel, with_sidecar=True)
        entries.append(entry)
    if entries:
        write_description(root, version)
    return entries


def _one(ctx: RunContext, root: Path, rel: str, replace_raw: bool) -> dict:
    source = ctx.staging / rel
    img = load_3d(source)
    done = deface(img)
    out_rel = defaced_name(rel)
    out = root / out_rel
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(done.image, out)
    stem = out_rel.rsplit("/", 1)[-1].split(".")[0]
    snap = snapshot(img, done, root / "figures" / f"{stem}.png")
    sidecar = {
        "Description": "Defaced copy of the raw image: face voxels set to 0 (pydeface's face mask).",
        "Sources": [f"bids:raw:{rel}"],
        "SkullStripped": False,
        "DefaceMethod": f"{METHOD} {pydeface_version()} template and face mask",
        "RegistrationTool": done.tool,
        "RegistrationToolVersion": done.tool_version,
        "DefaceStarted": done.started,
        "DefaceFinished": done.finished,
        "DefaceSeconds": done.seconds,
        "VoxelsZeroed": done.zeroed,
        "QualityChecks": done.measures,
        "Snapshot": snap.relative_to(root).as_posix(),
    }
    _write(out.with_name(f"{stem}.json"), json.dumps(sidecar, indent=2) + "\n")
    # W3C PROV: the raw image (as converted, before any replacement) -> the defaced image (issue 15)
    record_stage(ctx.staging, "deface", tool="pydeface", version=pydeface_version(), inputs=[rel],
                 outputs=[f"derivatives/{NAME}/{out_rel}"], started=done.started, ended=done.finished,
                 parameters={"method": METHOD, "registration": f"{done.tool} {done.tool_version}",
                             "voxels_zeroed": done.zeroed, "replace_raw": replace_raw},
                 flow_run_id=ctx.flow_run_id, run_id=ctx.run_id, key=stem)
    if replace_raw:
        _set_aside(ctx, rel)
        shutil.copyfile(out, source)
    log.info("%s defaced in %.0f s (%s, %d voxels zeroed)", Path(rel).name, done.seconds, done.tool, done.zeroed)
    return {"file": f"derivatives/{NAME}/{out_rel}", "status": "defaced", "reason": "", "seconds": done.seconds,
            "tool": done.tool, "voxels_zeroed": done.zeroed}


def _set_aside(ctx: RunContext, rel: str, *, with_sidecar: bool = False) -> None:
    """Move the raw image with its face (and its sidecar, when the image leaves the shared
    dataset) to the private work area (``deface-originals/<run>/``)."""
    stem = rel.removesuffix(".gz").removesuffix(".nii")
    for r in [rel, *([f"{stem}.json"] if with_sidecar else [])]:
        source = ctx.staging / r
        if source.exists():
            keep = ctx.work / "deface-originals" / ctx.run_id / r
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, keep)
