"""Simple image quality indices of one published NIfTI image, and its PNG snapshot (issue 15).

Read with nibabel from the dataset researchers receive, never from DICOM. A 4D image is judged on
its first volume. The head (foreground) is the largest connected region above Otsu's threshold,
its holes filled; the background is what lies more than ``MARGIN`` voxels away from it. Axes longer
than ``MAX_SIDE`` are sampled evenly first (voxel counts are those of the sampled grid).

- ``snr``: mean of the foreground over the standard deviation of the background (the single-image
  method of the NEMA/ACR tests, without the Rayleigh correction). ``None`` when the background is
  constant (zero-filled by the scanner or the reconstruction): no noise to measure there.
- ``ghosting``: ghost-to-signal ratio along the phase-encoding axis (MRIQC's GSR): the foreground
  shifted by half the field of view along that axis, outside the foreground, is the ghost region;
  ``(mean(ghost) - mean(rest of background)) / mean(foreground)``. The axis comes from the sidecar's
  ``PhaseEncodingDirection`` (i, j, k), else ``InPlanePhaseEncodingDirectionDICOM`` (ROW: i, COL: j),
  else j, and is reported with the value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

MARGIN = 3  # voxels between the head and what counts as background
MAX_SIDE = 128  # indices are measured on at most this many voxels along an axis (sampled evenly)
MIN_SIDE = 8  # a snapshot view needs at least this many voxels along each of its axes
_AXES = {"i": 0, "j": 1, "k": 2}


@dataclass
class ImageIndices:
    snr: float | None
    ghosting: float | None
    phase_axis: str | None
    foreground_voxels: int
    background_voxels: int
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def first_volume(img: nib.Nifti1Image) -> np.ndarray:
    """The image's first 3D volume as float32 (a 2D image gets a third axis of one). Only that volume is
    read into memory (nibabel's array proxy slices the file), not a whole 4D series."""
    extra = len(img.shape) - 3
    data = np.asanyarray(img.dataobj[(slice(None),) * 3 + (0,) * extra] if extra > 0 else img.dataobj)
    if data.ndim == 2:
        data = data[..., np.newaxis]
    return np.nan_to_num(data.astype(np.float32, copy=False))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean0 = m0 / w0
        mean1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mean0 - mean1) ** 2
    between = np.nan_to_num(between)
    return float(centres[int(np.argmax(between))])


def head_mask(vol: np.ndarray) -> np.ndarray:
    """The largest connected region above Otsu's threshold, holes filled."""
    if not np.any(vol != vol.flat[0]):
        return np.zeros(vol.shape, bool)
    above = vol > otsu_threshold(vol.ravel())
    labels, n = ndimage.label(above)
    if n == 0:
        return above
    sizes = np.bincount(labels.ravel())[1:]
    mask = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(mask)


def phase_axis(sidecar: dict) -> str:
    ped = str(sidecar.get("PhaseEncodingDirection") or "")[:1]
    if ped in _AXES:
        return ped
    inplane = sidecar.get("InPlanePhaseEncodingDirectionDICOM")
    return {"ROW": "i", "COL": "j"}.get(str(inplane), "j")


def sampled(vol: np.ndarray) -> np.ndarray:
    """``vol`` with each axis longer than ``MAX_SIDE`` taken every few voxels (a view, not a copy)."""
    return vol[tuple(slice(None, None, -(-n // MAX_SIDE)) for n in vol.shape)]


def indices(vol: np.ndarray, sidecar: dict) -> ImageIndices:
    """SNR and ghosting of one volume (module docstring). An axis longer than ``MAX_SIDE`` voxels is
    sampled every few voxels first: means and deviations hold, and a 3D T1w costs a tenth."""
    vol = sampled(vol)
    fg = head_mask(vol)
    if not fg.any():
        return ImageIndices(None, None, None, 0, 0, "no foreground: the image is constant")
    near = ndimage.binary_dilation(fg, iterations=MARGIN) if min(vol.shape) > 2 * MARGIN else \
        ndimage.binary_dilation(fg, structure=np.ones((3, 3, 1), bool), iterations=MARGIN)
    bg = ~near
    out = ImageIndices(None, None, None, int(fg.sum()), int(bg.sum()))
    if out.background_voxels < 100:
        out.note = "too little background around the head to measure noise"
        return out
    signal = float(vol[fg].mean())
    noise = float(vol[bg].std())
    if noise > 0:
        out.snr = round(signal / noise, 3)
    else:
        out.note = "background is constant (zero-filled): SNR not measured"
    axis = phase_axis(sidecar)
    out.phase_axis = axis
    n = vol.shape[_AXES[axis]]
    ghost = np.roll(fg, n // 2, axis=_AXES[axis]) & bg
    rest = bg & ~ghost
    if ghost.any() and rest.any() and signal > 0:
        out.ghosting = round((float(vol[ghost].mean()) - float(vol[rest].mean())) / signal, 5)
    return out


def _to_uint8(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (np.clip(plane, lo, hi) - lo) / (hi - lo or 1.0) * 255.0
    return np.rot90(scaled.astype(np.uint8))


def snapshot(vol: np.ndarray, zooms: tuple[float, ...], out: Path, height: int = 200) -> Path:
    """Write the three middle slices (sagittal, coronal, axial) side by side as a grey PNG, each
    resized to ``height`` pixels tall with the voxel size's aspect ratio. Returns ``out``."""
    lo, hi = (float(v) for v in np.percentile(sampled(vol), [1, 99.5]))  # grey levels: a sample is enough
    cx, cy, cz = (s // 2 for s in vol.shape)
    zx, zy, zz = (float(z) or 1.0 for z in (list(zooms) + [1.0, 1.0, 1.0])[:3])
    views = [(vol[cx, :, :], zy, zz), (vol[:, cy, :], zx, zz), (vol[:, :, cz], zx, zy)]
    # a thin stack (a few slices) has no useful sagittal or coronal view: its axial one is kept
    views = [v for v in views if min(v[0].shape) >= MIN_SIDE] or [max(views, key=lambda v: v[0].size)]
    tiles = []
    for plane, w_mm, h_mm in views:
        pic = Image.fromarray(_to_uint8(plane, lo, hi))  # rot90: first axis across, second up
        width_mm, height_mm = plane.shape[0] * w_mm, plane.shape[1] * h_mm
        width = max(1, round(height * width_mm / height_mm)) if height_mm else height
        tiles.append(pic.resize((min(width, 4 * height), height), Image.Resampling.BILINEAR))  # aspect kept up to 4:1
    sheet = Image.new("L", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), height), 0)
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")  # optimize=True would cost more than the rest of the QC
    return out


def load(path: Path) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """First volume, voxel size (mm, first three axes) and matrix (first three axes) of a NIfTI file."""
    img = nib.load(str(path))
    zooms = tuple(round(float(z), 6) for z in img.header.get_zooms()[:3])
    return first_volume(img), zooms, tuple(int(s) for s in img.shape[:3])
