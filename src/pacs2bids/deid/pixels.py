"""Text burned into pixels (P9; PS3.15 E.3.1 Clean Pixel Data Option).

Which images are at risk (:func:`risk_reason`), in order:

- a Secondary Capture SOP class (1.2.840.10008.5.1.4.1.1.7*) or Modality US, SC, OT, XC, ES:
  screenshots, exam summaries, ultrasound screens; BurnedInAnnotation = NO is *not* trusted
  on these (real exports flag burned-in dates NO);
- ImageType containing ``SCREEN SAVE``; BurnedInAnnotation = YES; a Sequence of Ultrasound
  Regions;
- ImageType containing ``SECONDARY`` unless BurnedInAnnotation = NO.

How they are cleaned (:func:`clean_if_at_risk`): pixels are decompressed; for ultrasound with
regions, everything outside the regions' rectangles is blacked out; each frame is rendered to
8-bit grey, enlarged x2, and read by ``tesseract`` (page segmentation 11, sparse text) in TSV;
every box holding a letter or digit is filled with the frame's minimum, with a margin. A second
OCR pass on the masked frame must find nothing confident (confidence >= 60, 3+ characters):
otherwise, or when the pixels cannot be decoded, or there are more than
:data:`MAX_OCR_FRAMES` frames, the file is quarantined with the reason. Cleaned pixels are
stored uncompressed (Explicit VR Little Endian), with Lossy Image Compression kept at 01 when
the source was lossy (E7). The caller sets BurnedInAnnotation = NO and drops Icon Image
Sequence. OCR text is never recorded, only counts of boxes.

Overlay planes (PS3.15 E.3.4 Clean Graphics Option, :func:`clean_overlays`): without the option
the Basic profile removes them (60xx,3000 X). With it they are kept, and a bitmap can draw a name
as well as pixels can: each plane is unpacked, read by OCR the same way, its text boxes are
cleared and it is packed again. A plane that cannot be read with confidence (no tesseract, too
many frames, text left after masking, a malformed plane) is removed whole, as the Basic profile
would. Graphic annotations are text elements, cleaned with the other text.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian

from ..childenv import child_env
from ..sopclasses import SECONDARY_CAPTURE_PREFIX
from .context import as_written, raw_value, str_of

MAX_OCR_FRAMES = 32
MASK_CONFIDENCE = 0.0  # any box with a letter or digit is masked
REMAIN_CONFIDENCE = 60.0
RISKY_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES"})  # pixels read by OCR


class PixelError(Exception):
    """Pixels at risk could not be cleaned with confidence (the file is quarantined)."""


@dataclass
class PixelOutcome:
    at_risk: bool = False
    reason: str = ""
    cleaned: bool = False
    quarantine: str = ""
    frames: int = 0
    boxes: int = 0
    regions_masked: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "at_risk": self.reason,
            "cleaned": self.cleaned,
            "frames": self.frames,
            "text_boxes_masked": self.boxes,
            "outside_ultrasound_regions_masked": self.regions_masked,
        }


def risk_reason(ds: Dataset) -> str | None:
    """Why this image may carry burned-in text (None: not at risk)."""
    if "PixelData" not in ds:
        return None
    # read from the bytes where pydicom would give the same (context.raw_value): left undecoded
    sop = str_of(ds, 0x00080016)
    modality = str_of(ds, 0x00080060).upper()
    image_type = _image_type(ds) or []
    # one value (VM 2-n, but single values are written): a str, not a list of letters
    image_type = [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]
    burned = str_of(ds, 0x00280301).upper()
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):
        return "Secondary Capture SOP class"
    if modality in RISKY_MODALITIES:
        return f"modality {modality}"
    if any("SCREEN SAVE" in v for v in image_type):
        return "ImageType SCREEN SAVE"
    if burned == "YES":
        return "BurnedInAnnotation YES"
    if "SequenceOfUltrasoundRegions" in ds:
        return "Sequence of Ultrasound Regions"
    if "SECONDARY" in image_type and burned != "NO":
        return "ImageType SECONDARY without BurnedInAnnotation NO"
    return None


def _image_type(ds: Dataset):
    """``ds.get("ImageType")``: its values (a str when it holds one, iterated as such by the caller)."""
    elem = ds._dict.get(0x00080008)
    value = raw_value(elem) if elem is not None else None
    if value is None:
        return ds.get("ImageType")
    as_written(ds, elem, value)  # as pydicom writes it once decoded
    return value


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


def _to_grey8(frame: np.ndarray) -> np.ndarray:
    f = frame.astype(np.float64)
    if f.ndim == 3:
        f = f[..., :3].mean(axis=2)
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        return np.zeros(f.shape, dtype=np.uint8)
    return ((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def ocr_boxes(grey: np.ndarray, scale: int = 2) -> list[tuple[int, int, int, int, float, int]]:
    """Boxes (left, top, width, height, confidence, n_alnum) of text tesseract finds, in
    the frame's own pixel coordinates. Raises :class:`PixelError` if tesseract fails."""
    from PIL import Image

    img = Image.fromarray(grey)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.LANCZOS)
    with tempfile.TemporaryDirectory(prefix="pacs2bids-ocr-") as tmp:
        png = Path(tmp) / "frame.pgm"  # uncompressed: PNG's deflate cost 10x the rest of this (same boxes)
        img.save(png)
        proc = subprocess.run(
            ["tesseract", str(png), "stdout", "--psm", "11", "tsv"],
            capture_output=True,
            text=True,
            timeout=120,
            # one thread: tesseract's OpenMP threads spin on busy cores, 2-3x the wall time and 2x the CPU
            # beside the run's other work, for the same boxes (issue 12)
            env=child_env(OMP_THREAD_LIMIT="1"),
        )
    if proc.returncode != 0:
        raise PixelError(f"tesseract failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}")
    boxes = []
    for rec in csv.DictReader(io.StringIO(proc.stdout), delimiter="\t", quoting=csv.QUOTE_NONE):
        text = (rec.get("text") or "").strip()
        alnum = sum(ch.isalnum() for ch in text)
        if not alnum:
            continue
        try:
            conf = float(rec["conf"])
            left, top, w, h = (int(rec[k]) // scale for k in ("left", "top", "width", "height"))
        except (KeyError, ValueError, TypeError):
            continue
        boxes.append((left, top, max(1, w), max(1, h), conf, alnum))
    return boxes


def _mask_text(frame: np.ndarray, fill) -> tuple[int, bool]:
    """Fill every box of text OCR reads in ``frame`` (in place) with ``fill``, with a margin.
    Returns the boxes filled, and whether a second reading still finds confident text."""
    boxes = 0
    for left, top, w, h, conf, _n in ocr_boxes(_to_grey8(frame)):
        if conf < MASK_CONFIDENCE and conf != -1:
            continue
        pad = max(2, h // 4)
        frame[max(0, top - pad) : top + h + pad, max(0, left - pad) : left + w + pad] = fill
        boxes += 1
    remaining = [b for b in ocr_boxes(_to_grey8(frame)) if b[4] >= REMAIN_CONFIDENCE and b[5] >= 3]
    return boxes, bool(remaining)


def _frames(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, bool]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    multi = n > 1
    if not multi:
        arr = arr[np.newaxis, ...]
    if spp == 1 and arr.ndim == 4:  # pragma: no cover - defensive
        arr = arr[..., 0]
    return arr, multi


def _mask_outside_regions(arr: np.ndarray, ds: Dataset) -> bool:
    regions = ds.get("SequenceOfUltrasoundRegions") or []
    rects = []
    for r in regions:
        try:
            rects.append((int(r.RegionLocationMinX0), int(r.RegionLocationMinY0), int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)))
        except AttributeError:
            return False
    if not rects:
        return False
    keep = np.zeros(arr.shape[1:3], dtype=bool)
    for x0, y0, x1, y1 in rects:
        keep[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = True
    arr[:, ~keep] = arr.min()
    return True


def clean_if_at_risk(ds: Dataset, *, enabled: bool) -> PixelOutcome:
    """Find and mask burned-in text in ``ds`` (in place). See the module docstring."""
    reason = risk_reason(ds)
    if reason is None:
        return PixelOutcome()
    out = PixelOutcome(at_risk=True, reason=reason)
    if not enabled:
        out.quarantine = f"pixels at risk ({reason}) and the Clean Pixel Data option is off"
        return out
    if not tesseract_available():
        out.quarantine = f"pixels at risk ({reason}) and tesseract is not installed"
        return out
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n > MAX_OCR_FRAMES:
        out.quarantine = f"pixels at risk ({reason}): {n} frames, more than {MAX_OCR_FRAMES} to review by OCR"
        return out
    was_lossy = str(ds.get("LossyImageCompression", "")) == "01" or ds.file_meta.TransferSyntaxUID.is_compressed and not _lossless(ds)
    try:
        arr = np.array(ds.pixel_array, copy=True)
    except Exception as exc:
        out.quarantine = f"pixels at risk ({reason}) cannot be decoded ({type(exc).__name__})"
        return out
    frames, multi = _frames(arr, ds)
    out.frames = frames.shape[0]
    out.regions_masked = _mask_outside_regions(frames, ds)
    for i in range(frames.shape[0]):
        boxes, text_left = _mask_text(frames[i], frames[i].min())
        out.boxes += boxes
        if text_left:
            out.quarantine = f"pixels at risk ({reason}): text still read after masking frame {i + 1}"
            return out
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        pi = "RGB"  # pydicom decodes YBR to RGB
    data = frames if multi else frames[0]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # generate_instance_uid=False: the walk gives the keyed pseudonym of the original instance; a random one
    # would change at every run and break references to the instance
    ds.set_pixel_data(data, photometric_interpretation=pi, bits_stored=int(ds.get("BitsStored", data.itemsize * 8)),
                      generate_instance_uid=False)
    if was_lossy:
        ds.LossyImageCompression = "01"
    out.cleaned = True
    return out


def _lossless(ds: Dataset) -> bool:
    ts = ds.file_meta.TransferSyntaxUID
    return ts in {
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.1.99",
    }


@dataclass
class OverlayOutcome:
    """What :func:`clean_overlays` did: planes read, text boxes cleared, planes removed and why."""

    planes: int = 0
    boxes: int = 0
    removed: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"overlay_planes": self.planes, "overlay_boxes_cleared": self.boxes, "overlay_planes_removed": self.removed}


def _overlay_groups(ds: Dataset) -> list[int]:
    return [g for g in range(0x6000, 0x6020, 2) if (g << 16 | 0x3000) in ds]


def clean_overlays(ds: Dataset) -> OverlayOutcome:
    """OCR every overlay plane of ``ds`` and clear its text, in place (see the module docstring)."""
    out = OverlayOutcome()
    for group in _overlay_groups(ds):
        out.planes += 1
        boxes, why = _clean_overlay(ds, group)
        out.boxes += boxes
        if why:
            for tag in [t for t in ds.keys() if t.group == group]:
                del ds[tag]
            out.removed.append(f"overlay {group:04X}: {why}")
    return out


def _clean_overlay(ds: Dataset, group: int) -> tuple[int, str | None]:
    """Clear the text of one overlay plane in place: (boxes cleared, why the plane must go instead)."""
    try:
        planes = np.array(ds.overlay_array(group), dtype=np.uint8, copy=True)
    except Exception as exc:  # a malformed plane: nothing trustworthy to read
        return 0, f"unreadable ({type(exc).__name__})"
    if planes.ndim == 2:
        planes = planes[np.newaxis]
    if not tesseract_available():
        return 0, "tesseract is not installed"
    if planes.shape[0] > MAX_OCR_FRAMES:
        return 0, f"{planes.shape[0]} frames, more than {MAX_OCR_FRAMES} to read by OCR"
    boxes = 0
    for plane in planes:
        if plane.any():
            n, text_left = _mask_text(plane, 0)
            boxes += n
            if text_left and plane.any():
                return boxes, "text still read after masking"
    ds[group << 16 | 0x3000].value = pack_bits(planes)
    return boxes, None
