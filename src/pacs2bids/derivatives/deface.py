"""Defacing one image with pydeface's method: its template registered onto the image, its face
mask brought along, the face's voxels zeroed (no engine, no BIDS naming: see :mod:`.deface_study`).

Registration is FSL ``flirt`` when it is on PATH, else SimpleITK (:mod:`.register`). Failure is
loud: :class:`DefaceFailed` when the image is not 3D, the registration fails, or the checks of
:mod:`.checks` find the result untrustworthy (template unlike the image, mask off the head or over
the brain). A failed image is never written as defaced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from ..errors import Pacs2BidsError
from . import checks, register

METHOD = "pydeface"  # its template (mean_reg2mean.nii.gz) and face mask (facemask.nii.gz)


class DefaceFailed(Pacs2BidsError):
    """An image could not be defaced safely; it is reported and never published as defaced."""


@dataclass
class Defaced:
    """A defaced image and what the sidecar says about it."""

    image: nib.Nifti1Image
    keep: np.ndarray  # bool, the image's grid: False where the face was zeroed
    zeroed: int  # face voxels that held a value and now hold 0
    tool: str
    tool_version: str
    started: str
    finished: str
    seconds: float
    measures: dict = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pydeface_version() -> str:
    from importlib.metadata import version

    return version("pydeface")


def load_3d(path: Path) -> nib.Nifti1Image:
    """The image at ``path`` as 3D (a 4D image of one volume is squeezed); DefaceFailed otherwise."""
    img = nib.load(path)
    if img.ndim == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if img.ndim != 3:
        raise DefaceFailed(f"{path.name} has shape {img.shape}: only 3D images are defaced")
    return img


def deface(img: nib.Nifti1Image) -> Defaced:
    """Deface a 3D image; raises :class:`DefaceFailed` naming what went wrong."""
    started, t0 = _now(), time.monotonic()
    data = np.asanyarray(img.dataobj)
    try:
        reg = register.register(img)
    except Exception as exc:  # SimpleITK/flirt raise their own kinds
        raise DefaceFailed(f"registration of the template failed: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}") from exc
    ornt = nib.orientations.io_orientation(img.affine)  # the checks see the head upright (RAS)

    def ras(a):
        return nib.orientations.apply_orientation(a, ornt)

    zooms = np.asarray(img.header.get_zooms()[:3])[ornt[:, 0].astype(int).argsort()]
    found, measures = checks.problems(ras(data.astype(np.float32)), zooms, ras(reg.template), ras(reg.keep),
                                      reg.matrix)
    measures.update(reg.details)
    if found:
        raise DefaceFailed("; ".join(found))
    out = np.where(reg.keep, data, np.zeros((), data.dtype))
    header = img.header.copy()
    defaced = nib.Nifti1Image(out, img.affine, header)
    return Defaced(image=defaced, keep=reg.keep, zeroed=int(((~reg.keep) & (data != 0)).sum()), tool=reg.tool,
                   tool_version=reg.version, started=started, finished=_now(),
                   seconds=round(time.monotonic() - t0, 1), measures=measures)


def snapshot(img: nib.Nifti1Image, defaced: Defaced, path: Path) -> Path:
    """A PNG for review: the mid-sagittal slice before and after, and the zeroed region outlined."""
    canon = nib.as_closest_canonical(img)
    data = np.asanyarray(canon.dataobj, dtype=np.float32)
    keep = nib.as_closest_canonical(nib.Nifti1Image(defaced.keep.astype(np.uint8), img.affine)).get_fdata() > 0
    x = data.shape[0] // 2
    scale = float(np.percentile(data, 99.5)) or 1.0

    def grey(a):
        return (255 * np.clip(a[x].T[::-1] / scale, 0, 1)).astype(np.uint8)

    before, after = grey(data), grey(data * keep)
    rgb = np.stack([after] * 3, axis=-1)
    rgb[..., 0] = np.where(~keep[x].T[::-1], np.maximum(rgb[..., 0], 96), rgb[..., 0])  # the face, in red
    pair = np.concatenate([np.stack([before] * 3, axis=-1), rgb], axis=1)
    pic = Image.fromarray(pair)
    zooms = canon.header.get_zooms()
    pic = pic.resize((max(1, round(pic.width * zooms[1])), max(1, round(pic.height * zooms[2]))))
    path.parent.mkdir(parents=True, exist_ok=True)
    pic.save(path)
    return path
