"""STAND-IN, REPLACED BY H-classify: a minimal classify_session with the interface fixed by the lead
(/work/briefs/interface.md), only so that convert.py's tests run in this branch. The lead takes
H-classify's file on merge; no conversion logic lives here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

_ORDER = ("task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "chunk")


@dataclass(frozen=True)
class Dcm2niixOutput:
    """One image dcm2niix wrote: <stem>.json (+ .nii.gz or .nii, + .bval/.bvec for diffusion)."""

    stem: Path
    sidecar: dict
    shape: tuple[int, ...]
    series_uid: str
    series_number: int | None
    bvals: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Decision:
    output: Dcm2niixOutput
    datatype: str | None
    suffix: str | None
    entities: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    def relpath(self, subject: str, session: str | None) -> str | None:
        if self.datatype is None or self.suffix is None:
            return None
        parts = [f"sub-{subject}"] + ([f"ses-{session}"] if session else [])
        parts += [f"{k}-{self.entities[k]}" for k in _ORDER if k in self.entities]
        folder = f"sub-{subject}/" + (f"ses-{session}/" if session else "") + self.datatype
        return f"{folder}/{'_'.join(parts)}_{self.suffix}"


def _image_file(stem: Path) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = stem.with_name(stem.name + ext)
        if p.exists():
            return p
    return None


def read_output(stem: Path, series_uid: str, series_number: int | None) -> Dcm2niixOutput:
    stem = Path(stem)
    sidecar = json.loads(stem.with_name(stem.name + ".json").read_text())
    img = _image_file(stem)
    shape = tuple(int(x) for x in nib.load(img).header.get_data_shape()) if img else ()
    bval = stem.with_name(stem.name + ".bval")
    bvals = tuple(float(x) for x in bval.read_text().split()) if bval.exists() else None
    return Dcm2niixOutput(stem, sidecar, shape, series_uid, series_number, bvals)


def _pe_dir(o: Dcm2niixOutput) -> str | None:
    ped = o.sidecar.get("PhaseEncodingDirection")
    img = _image_file(o.stem)
    if not ped or img is None:
        return None
    axis = "ijk".index(ped[0])
    toward = nib.aff2axcodes(nib.load(img).affine)[axis]
    opposite = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}[toward]
    start, end = (toward, opposite) if ped.endswith("-") else (opposite, toward)
    return start + end


def _one(o: Dcm2niixOutput, phase_protocols: set[str]) -> tuple[str | None, str | None, dict, str]:
    s = o.sidecar
    it = [str(x).upper() for x in s.get("ImageType", [])]
    if s.get("Modality", "MR") != "MR":
        return None, None, {}, f"modality {s.get('Modality')} has no BIDS datatype here"
    if "DERIVED" in it:
        return None, None, {}, "derived image (ImageType DERIVED)"
    if o.shape and min(o.shape[:3]) <= 1:
        return None, None, {}, "2D image (localizer or screenshot)"
    seq = str(s.get("ScanningSequence", "")).upper()
    if str(s.get("Units", "")).lower() == "hz" or any("FIELDMAP" in x for x in it):
        return "fmap", "fieldmap", {}, "B0 field map in Hz"
    if o.bvals and max(o.bvals) > 50:
        return "dwi", "dwi", {}, "diffusion weighting in bvals"
    if "P" in it or "PHASE" in it:
        if "EP" not in seq and s.get("ProtocolName") in phase_protocols:
            return "fmap", "phasediff", {}, "phase of a GRE field map"
        return None, None, {}, "phase image outside a field map"
    if "EP" in seq or "EPI" in str(s.get("SequenceName", "")).upper():
        vols = o.shape[3] if len(o.shape) == 4 else (1 if o.shape else 5)  # -b o: no image, volumes unknown
        d = _pe_dir(o)
        if vols >= 5 or (vols > 1 and not d):
            return "func", "bold", {"task": "unknown"}, "EPI time series"
        if d:
            return "fmap", "epi", {"dir": d}, "single EPI volume with a phase-encoding direction"
        return None, None, {}, "single EPI volume without phase-encoding direction"
    if s.get("ProtocolName") in phase_protocols:
        return "fmap", f"magnitude{s.get('EchoNumber', 1)}", {}, "magnitude of a GRE field map"
    te, tr = s.get("EchoTime"), s.get("RepetitionTime")
    if te is None or tr is None:
        return None, None, {}, "contrast unknown: no EchoTime/RepetitionTime (add a rule in a project heuristic)"
    if "IR" in seq or tr < 0.8 or (s.get("InversionTime") and s.get("MRAcquisitionType") == "3D" and te < 0.01):
        return "anat", "T1w", {}, "short TR or inversion recovery"
    if tr > 2 and te > 0.07:
        return "anat", "T2w", {}, "long TR and TE"
    return None, None, {}, "contrast unknown (add a rule in a project heuristic)"


def classify_session(outputs: list[Dcm2niixOutput]) -> list[Decision]:
    phase_protocols = {
        o.sidecar.get("ProtocolName") for o in outputs
        if {"P", "PHASE"} & {str(x).upper() for x in o.sidecar.get("ImageType", [])}
        and "EP" not in str(o.sidecar.get("ScanningSequence", "")).upper()
    }
    phase_protocols.discard(None)
    raw = [(o, *_one(o, phase_protocols)) for o in outputs]
    # GE/Philips: the magnitude beside a Hz field map of the same series
    fmap_series = {o.series_uid for o, dt, sx, _, _ in raw if sx == "fieldmap"}
    decisions = []
    for o, dt, sx, ent, why in raw:
        if o.series_uid in fmap_series and sx != "fieldmap":
            dt, sx, ent, why = "fmap", "magnitude", {}, "magnitude beside a field map"
        decisions.append([o, dt, sx, dict(ent), why])
    names: dict[tuple, list[list]] = {}
    for d in decisions:
        if d[1]:
            names.setdefault((d[1], d[2], tuple(sorted(d[3].items()))), []).append(d)
    for same in names.values():
        if len(same) > 1:
            for n, d in enumerate(same, start=1):
                d[3]["run"] = str(n)
    return [Decision(o, dt, sx, ent, why) for o, dt, sx, ent, why in decisions]
