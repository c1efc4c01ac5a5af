"""Facts about one image dcm2niix wrote, read from its JSON sidecar, NIfTI header and bval file:
what the classification rules (:mod:`.rules`, :mod:`.classify`) decide from."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

@dataclass(frozen=True)
class Dcm2niixOutput:
    """One image dcm2niix wrote: <stem>.json (+ .nii.gz or .nii, + .bval/.bvec for diffusion)."""
    stem: Path                 # path without extension
    sidecar: dict              # parsed JSON sidecar written by dcm2niix (-b y)
    shape: tuple[int, ...]     # NIfTI dims read with nibabel (header only); () if no image was written (-b o)
    series_uid: str            # SeriesInstanceUID of the DICOM series it came from (already pseudonymised)
    series_number: int | None  # from the DICOM / sidecar
    bvals: tuple[float, ...] | None = None  # from <stem>.bval when present

    def image_path(self) -> Path | None:
        """The NIfTI beside the sidecar (.nii.gz or .nii), or None (``-b o``)."""
        for ext in (".nii.gz", ".nii"):
            p = Path(f"{self.stem}{ext}")
            if p.is_file():
                return p
        return None

    def affine(self) -> np.ndarray | None:
        """The NIfTI affine (RAS+), read lazily from the header; None when no image was written."""
        p = self.image_path()
        return None if p is None else _affine_of(str(p), p.stat().st_mtime_ns)

    @property
    def volumes(self) -> int | None:
        """Number of volumes (4th dim), 1 for a 3D image; from bvals when no image was written."""
        if len(self.shape) >= 4:
            return int(self.shape[3])
        if self.shape:
            return 1
        if self.bvals is not None:
            return len(self.bvals)
        return None


@lru_cache(maxsize=256)
def _affine_of(path: str, _mtime: int) -> np.ndarray:
    return np.asarray(nib.load(path).affine)


def read_output(stem: Path, series_uid: str, series_number: int | None) -> Dcm2niixOutput:
    """Read ``<stem>.json``, the NIfTI header (shape only) and ``<stem>.bval`` when present.

    Raises FileNotFoundError naming the sidecar when dcm2niix wrote none (run it with ``-b y``).
    """
    stem = Path(stem)
    js = Path(f"{stem}.json")
    if not js.is_file():
        raise FileNotFoundError(f"no dcm2niix sidecar {js.name} beside {stem.name}: run dcm2niix with -b y")
    sidecar = json.loads(js.read_text(encoding="utf-8"))
    shape: tuple[int, ...] = ()
    for ext in (".nii.gz", ".nii"):
        p = Path(f"{stem}{ext}")
        if p.is_file():
            shape = tuple(int(n) for n in nib.load(p).shape)
            break
    bvals = None
    bv = Path(f"{stem}.bval")
    if bv.is_file():
        bvals = tuple(float(x) for x in bv.read_text().split())
    if series_number is None and isinstance(sidecar.get("SeriesNumber"), (int, float)):
        series_number = int(sidecar["SeriesNumber"])
    return Dcm2niixOutput(stem=stem, sidecar=sidecar, shape=shape, series_uid=series_uid,
                          series_number=series_number, bvals=bvals)

def _tokens(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value if str(v).strip())


def _ms(sidecar: dict, key: str) -> float | None:
    v = sidecar.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v) * 1000.0
    return None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


@dataclass(frozen=True)
class _Facts:
    modality: str
    it: tuple[str, ...]
    ss: tuple[str, ...]
    sv: tuple[str, ...]
    seqname: str
    te: float | None
    tr: float | None
    ti: float | None
    flip: float | None
    acq3d: bool
    echo_number: int | None
    pe: str | None        # "i", "j-", ...
    volumes: int | None
    epi: bool
    spin_echo: bool
    part: str | None      # "phase", "real", "imag" or None (magnitude)

    def signature(self) -> str:
        seq = "\\".join(self.ss) or "-"
        return (f"{seq} {'3D' if self.acq3d else '2D'} TR={_fmt(self.tr)} TE={_fmt(self.te)} "
                f"TI={_fmt(self.ti)} flip={_fmt(self.flip)} SequenceName={self.seqname or '-'} "
                f"ImageType={'/'.join(self.it) or '-'} volumes={self.volumes if self.volumes is not None else '-'}")


def _facts(o: Dcm2niixOutput) -> _Facts:
    s = o.sidecar
    it = _tokens(s.get("ImageType")) + tuple(t for t in _tokens(s.get("ImageTypeText"))
                                              if t not in _tokens(s.get("ImageType")))
    ss = tuple(t for t in str(s.get("ScanningSequence") or "").upper().split("\\") if t)
    sv = tuple(str(s.get("SequenceVariant", "")).upper().split("\\")) if s.get("SequenceVariant") else ()
    seqname = str(s.get("SequenceName") or s.get("PulseSequenceName") or "")
    details = str(s.get("PulseSequenceDetails") or "")
    seq_up = (seqname + " " + details).upper()
    epi = ("EP" in ss or "EPI" in it or "EPI" in seq_up or seqname.lstrip("*").upper().startswith("EP"))
    # Siemens sequence names say FID (gradient echo) or SE; VB12 writes ScanningSequence SE\\EP for FID EPI
    spin_echo = "EPSE" in seq_up or "SEEPI" in seq_up or ("SE" in ss and "GR" not in ss and "FID" not in seq_up)
    part = None
    if "PHASE" in it or it[2:3] == ("P",):
        part = "phase"
    elif "REAL" in it and "PERFUSION" not in it:
        part = "real"
    elif "IMAGINARY" in it:
        part = "imag"
    echo = s.get("EchoNumber")
    pe = s.get("PhaseEncodingDirection")
    pe = pe if pe in ("i", "i-", "j", "j-", "k", "k-") else None  # anything else: polarity unknown
    return _Facts(
        modality=str(s.get("Modality") or "MR").upper(), it=it, ss=ss, sv=sv, seqname=seqname,
        te=_ms(s, "EchoTime"), tr=_ms(s, "RepetitionTimeExcitation") or _ms(s, "RepetitionTime"),
        ti=_ms(s, "InversionTime"),
        flip=float(s["FlipAngle"]) if isinstance(s.get("FlipAngle"), (int, float)) else None,
        acq3d=str(s.get("MRAcquisitionType", "")).upper() == "3D",
        echo_number=int(echo) if isinstance(echo, (int, float)) else None,
        pe=str(pe) if pe else None, volumes=o.volumes, epi=epi, spin_echo=spin_echo, part=part,
    )


def phase_encoding_label(pe: str | None, affine: np.ndarray | None) -> str | None:
    """BIDS ``dir`` label (AP, PA, LR, RL, SI, IS) from dcm2niix's PhaseEncodingDirection and the affine.

    ``pe`` is a voxel axis with a sign ("j-"); the affine maps voxel axes to RAS+ world axes. The
    label names where phase encoding runs from and to: a vector pointing to posterior (-y) is "AP".
    None when the polarity or the affine is unknown.
    """
    if not pe or affine is None or pe[0] not in "ijk":
        return None
    axis = "ijk".index(pe[0])
    vec = np.asarray(affine, dtype=float)[:3, axis] * (-1.0 if pe.endswith("-") else 1.0)
    world = int(np.argmax(np.abs(vec)))
    towards_positive = vec[world] > 0
    return [("LR", "RL"), ("PA", "AP"), ("IS", "SI")][world][0 if towards_positive else 1]


# --------------------------------------------------------------------------- per-image rules

def _axes_from_orientation(sidecar: dict) -> np.ndarray | None:
    """Voxel axes in RAS+ from ImageOrientationPatientDICOM, for sidecars written without an image (-b o).

    dcm2niix keeps the DICOM row direction as NIfTI i and flips the rows, so NIfTI j runs against the
    DICOM column direction (checked against the affine of every output of both shared corpora).
    """
    iop = sidecar.get("ImageOrientationPatientDICOM")
    if not isinstance(iop, list) or len(iop) != 6:
        return None
    row = np.asarray(iop[:3], dtype=float) * (-1, -1, 1)  # LPS -> RAS
    col = np.asarray(iop[3:], dtype=float) * (-1, -1, 1)
    axes = np.eye(4)
    axes[:3, 0], axes[:3, 1], axes[:3, 2] = row, -col, np.cross(row, col)
    return axes

