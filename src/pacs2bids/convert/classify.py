"""Name every image dcm2niix wrote for one session, from its JSON sidecar alone (BIDS 1.10).

dcm2niix reads every vendor's way of storing timing, sequence, diffusion and phase-encoding facts
(classic and enhanced multi-frame, mosaic, private tags) and writes them into one normalised
sidecar. This module classifies from that sidecar, so one set of rules serves Siemens (VB mosaic,
VE, XA), GE, Philips (classic and enhanced), Canon/Toshiba, United Imaging and others. It never
reads SeriesDescription or ProtocolName. It does not run dcm2niix and moves no file (convert does).

Rules, first match wins (times in ms; ``it`` = ImageType tokens, ``ss`` = ScanningSequence)
=================================================  ==========================================
Modality not MR or PT                              left out: no BIDS datatype, stays in sourcedata/
``it`` LOCALIZER / SCOUT / SURVEY                  left out: localizer
``it`` DERIVED / SECONDARY, or ADC, FA, TRACEW,    left out: derived (ADC, FA, trace, MPR/MIP
TRACE, EADC, MPR, MIP, PROJECTION IMAGE, MOCO,     reformats, motion-corrected series, scanner
CBF, CBV, MTT, TTP, RELCBF, ...                    perfusion maps, screenshots)
Modality PT                                        pet/pet
no EchoTime, RepetitionTime, ss nor SequenceName   unclassified: contrast unknown
``it`` FIELDMAPHZ                                  fmap/fieldmap (+ fmap/magnitude of the same series)
EPI perfusion time series (> 10 volumes, or       left out: DSC has no BIDS raw suffix
Siemens ep2d_perf) without ASL labelling
ASL: ``it`` ASL, ArterialSpinLabelingType, an      perf/asl; aslcontext "deltam" per volume when
ASL sequence name, dcm2niix's perf guess, or       ``it`` says PERFUSION without M/MAGNITUDE
``it`` PERFUSION (not DSC)
``it`` M0, or one volume of an ASL sequence/grid   perf/m0scan
bval file, ``it`` DIFFUSION, DiffusionScheme,      dwi/dwi; one volume before a matching dwi: sbref;
NumberOfDiffusionDirectionGE, DwiSE/ep_b names     <= 3 volumes of b <= 50 with a reversed twin: fmap/epi
EPI, spin echo, no diffusion, <= 3 volumes         fmap/epi, dir-XX (needs a polarity)
EPI, gradient echo, no diffusion                   func/bold task-unknown; one volume before a
                                                   matching bold: sbref; <= 3 volumes with a
                                                   reversed-polarity twin in the session: fmap/epi;
                                                   phase images: part-phase (magnitude part-mag)
GRE set (same sequence, TR, flip, grid): 2 echoes  fmap magnitude1/2 + phasediff (one phase) or
ΔTE <= 10 ms, TE <= 20 ms, with a phase image      phase1/2 (one phase per echo)
GRE set with >= 2 echoes otherwise                 anat/MEGRE echo-N (part-mag / part-phase)
GRE, one echo, TE >= 15                            anat/T2starw (part-mag / part-phase if a phase)
inversion recovery TI >= 1400, TE >= 60            anat/FLAIR
inversion-prepared TI 300-1400, TE < 30            anat/T1w (MPRAGE, BRAVO, T1-FLAIR)
spin echo TR >= 1500: TE >= 60 / TE <= 35          anat/T2w / anat/PDw
spin echo TR <= 1000, TE <= 30                     anat/T1w
3D GRE TOF (ScanOptions TOF, ANGIO, flow-encoded,  anat/angio
or MT + 3D GRE TR 15-50, TE 2-8, flip 15-35)
3D spoiled GRE TR < 15, TE < 10, flip >= 8         anat/T1w
anything else                                      unclassified, reason names the fields seen
=================================================  ==========================================

Decisions where BIDS or the issue left a choice
- A scanner-computed ASL difference (Philips PERFUSION without M/MAGNITUDE, one volume or one per
  phase) is ``asl`` with every volume ``deltam`` in ``aslcontext.tsv`` (BIDS allows deltam-only
  series); scanner CBF/relative-CBF maps are derived images and are left out.
- Label/control source series are ``asl`` too, but the order of their volumes is not in the
  sidecar (Philips keeps it per frame in private (2005,1429), and dcm2niix orders classic and
  enhanced exports differently), so no ``aslcontext.tsv`` is proposed: ``Decision.missing``
  names it. BIDS-ASL fields dcm2niix does not write (Philips: ArterialSpinLabelingType,
  PostLabelingDelay, BackgroundSuppression, M0Type, TotalAcquiredPairs, LabelingDuration, ...)
  are also listed in ``missing``; the images do not hold them.
- dcm2niix's ``BidsGuess`` is never used alone, except as the ASL signal above: for Philips
  source ASL it is the only sidecar field carrying the private label-type tag.
- ``dir`` is written for ``epi`` (BIDS requires it) and taken from PhaseEncodingDirection (voxel
  axis and sign) mapped through the NIfTI affine to AP/PA/LR/RL/SI/IS. Philips writes only
  PhaseEncodingAxis (no polarity): such an ``epi`` is unclassified. bold/dwi get no ``dir``.
- Single-echo T2starw with a phase image uses ``part``; multi-echo GRE is MEGRE with ``echo`` and
  ``part`` (BIDS allows no ``echo`` on T2starw). No SWI suffix is invented: scanner SWI and mIP
  images are derived and left out.
- ``run`` is added only when a name repeats in the session, in acquisition order (SeriesNumber,
  then stem). A field-map set shares one run index per member.
- Sidecars written without an image (``dcm2niix -b o``, for a plan) have no volume count and no
  bval: the rules that need them (sbref, short EPI references, deltaM volume count) do not fire,
  diffusion is read from ImageType/DiffusionScheme/sequence names, a spin-echo EPI without those is
  left out asking for ``-b y``, and ``dir`` comes from ImageOrientationPatientDICOM instead of the
  affine. The final names come from the conversion with images.
- What the images hold for ASL beyond the sidecar: Philips DICOM keeps the label/control type
  per frame (2005,1429), the phase (2001,1008) and TriggerTime per phase (the labelling delay of
  multi-phase PASL); it does not hold labelling duration, background suppression or M0 type
  (dcm_qa_philips_asl README, "Missing Information"): those must come from the project.
- PET: ``pet``; BIDS-PET fields that dcm2niix does not write (tracer, injection, reconstruction,
  frame timing) are listed in ``Decision.missing``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "ENTITY_ORDER", "Dcm2niixOutput", "Decision", "read_output", "classify_session",
    "ASL_REQUIRED", "PET_REQUIRED", "SUFFIX_REQUIRED", "phase_encoding_label",
]

#: BIDS entity order after sub/ses (BIDS 1.10 appendix "Entity table", the ones MR/PET raw uses).
ENTITY_ORDER = ("task", "acq", "ce", "trc", "rec", "dir", "run", "echo", "flip", "inv", "mt", "part",
                "chunk")

#: BIDS-ASL REQUIRED sidecar fields (perf, BIDS 1.10); LabelingDuration for (P)CASL, BolusCutOff* for PASL.
ASL_REQUIRED = ("ArterialSpinLabelingType", "PostLabelingDelay", "BackgroundSuppression", "M0Type",
                "TotalAcquiredPairs", "MagneticFieldStrength", "MRAcquisitionType", "EchoTime",
                "RepetitionTimePreparation", "FlipAngle")
#: BIDS-PET REQUIRED sidecar fields (BIDS 1.10).
PET_REQUIRED = ("Manufacturer", "ManufacturersModelName", "Units", "TracerName", "TracerRadionuclide",
                "InjectedRadioactivity", "InjectedRadioactivityUnits", "InjectedMass", "InjectedMassUnits",
                "SpecificRadioactivity", "SpecificRadioactivityUnits", "ModeOfAdministration", "TimeZero",
                "ScanStart", "InjectionStart", "FrameTimesStart", "FrameDuration", "AcquisitionMode",
                "ImageDecayCorrected", "ImageDecayCorrectionTime", "ReconMethodName",
                "ReconMethodParameterLabels", "ReconMethodParameterUnits", "ReconMethodParameterValues",
                "ReconFilterType", "ReconFilterSize", "AttenuationCorrection")

#: Other REQUIRED sidecar fields per suffix (BIDS 1.10) that a dcm2niix sidecar may lack. (TaskName, which
#: dcm2niix never writes, is not listed: it is the task entity, and convert writes it from there.)
SUFFIX_REQUIRED = {
    "bold": ("RepetitionTime",),
    "epi": ("PhaseEncodingDirection", "TotalReadoutTime"),
    "phasediff": ("EchoTime1", "EchoTime2"),
    "phase1": ("EchoTime",), "phase2": ("EchoTime",),
    "fieldmap": ("Units",),
}

_DERIVED_TOKENS = ("ADC", "EADC", "FA", "TRACEW", "TRACE", "MPR", "MIP", "MNIP", "MINIP", "PROJECTION IMAGE",
                   "MOCO", "CBF", "CBV", "MTT", "TTP", "RELCBF", "RELCBV", "COLFA", "EXP", "T1 MAP",
                   "T2 MAP", "R2STAR", "SUB", "SUBTRACTION", "CPR", "REFORMATTED")
_LOCALIZER_TOKENS = ("LOCALIZER", "SCOUT", "SURVEY")
_HUGE = 10 ** 12


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


@dataclass(frozen=True)
class Decision:
    output: Dcm2niixOutput
    datatype: str | None       # "anat" | "func" | "dwi" | "fmap" | "perf" | "pet" | None when left out
    suffix: str | None         # "T1w", "bold", "sbref", "phasediff", "magnitude1", "asl", "m0scan", "pet", ...
    entities: dict[str, str]   # BIDS entities except sub/ses, in ENTITY_ORDER
    reason: str                # why this name, or why left out
    #: files the converter writes beside the image: BIDS suffix+extension -> content,
    #: e.g. {"aslcontext.tsv": "volume_type\\ndeltam\\n"} -> <name>_aslcontext.tsv
    extra_files: dict[str, str] = field(default_factory=dict)
    #: what BIDS requires for this name that neither the sidecar, the entities nor ``extra_files`` hold
    #: (sidecar fields, or "aslcontext.tsv"): unless something fills them (EchoTime1/2 can be read from the
    #: field-map magnitudes), the validator refuses the file: a project must supply them, or the series is
    #: better kept as DICOM in sourcedata/ with this list as its reason
    missing: tuple[str, ...] = ()

    @property
    def aslcontext(self) -> tuple[str, ...] | None:
        """The volume types of ``aslcontext.tsv`` (one per volume), or None when none is proposed."""
        text = self.extra_files.get("aslcontext.tsv")
        return tuple(text.split()[1:]) if text else None

    def relpath(self, subject: str, session: str | None) -> str | None:
        """'sub-01/ses-01/anat/sub-01_ses-01_run-1_T1w' (no extension), entities in BIDS order; None if left out."""
        if self.datatype is None or self.suffix is None:
            return None
        sub = subject[4:] if subject.startswith("sub-") else subject
        ses = session[4:] if session and session.startswith("ses-") else session
        parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else [])
        parts += [f"{k}-{self.entities[k]}" for k in ENTITY_ORDER if self.entities.get(k) not in (None, "")]
        folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + self.datatype
        return f"{folder}/{'_'.join(parts)}_{self.suffix}"


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


# --------------------------------------------------------------------------- facts from a sidecar

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

@dataclass
class _Draft:
    """A mutable working decision inside classify_session."""
    o: Dcm2niixOutput
    f: _Facts
    datatype: str | None = None
    suffix: str | None = None
    entities: dict = field(default_factory=dict)
    reason: str = ""
    extra: dict = field(default_factory=dict)
    missing: tuple = ()
    kind: str = ""        # internal category: "gre", "boldc", "dwic", "fmaphz", ...

    def name(self, datatype, suffix, reason, **entities):
        self.datatype, self.suffix, self.reason = datatype, suffix, reason
        self.entities = {k: str(v) for k, v in entities.items() if v is not None}

    def leave(self, reason):
        self.datatype = self.suffix = None
        self.entities, self.reason = {}, reason


def _derived_reason(f: _Facts) -> str | None:
    for tok in _LOCALIZER_TOKENS:
        if tok in f.it:
            return f"localizer (ImageType {tok}): not part of a BIDS dataset"
    hits = [t for t in _DERIVED_TOKENS if t in f.it]
    if "SECONDARY" in f.it[:2] and not hits:
        return (f"secondary capture (ImageType {'/'.join(f.it)}): a screenshot or report image, "
                f"not raw BIDS data")
    if f.it[:1] == ("DERIVED",) or hits:
        what = "/".join(hits) if hits else "/".join(f.it[:2])
        return (f"derived image (ImageType {'/'.join(f.it)}; {what}): scanner-computed maps, traces and "
                f"reformats are not raw BIDS data")
    return None


def _is_asl(o: Dcm2niixOutput, f: _Facts) -> bool:
    s = o.sidecar
    guess = s.get("BidsGuess")
    seq = (str(s.get("PulseSequenceDetails") or "") + " " + f.seqname).lower()
    labelled = ("ASL" in f.it or bool(s.get("ArterialSpinLabelingType"))
                or any(k in seq for k in ("pcasl", "pasl", "_asl", "asl_", "3d_asl"))
                or (isinstance(guess, list) and guess[:1] == ["perf"] and o.bvals is None))
    # PERFUSION alone: Philips ASL (difference or source), unless it is a long EPI time series (DSC) or a
    # fast spoiled gradient echo (DCE): ASL reads out with EPI, GRASE, spiral or turbo spin echo
    dce = not f.epi and f.tr is not None and f.tr < 15
    return labelled or ("PERFUSION" in f.it and not _is_dsc(o, f) and not dce)


def _is_dsc(o: Dcm2niixOutput, f: _Facts) -> bool:
    """Dynamic susceptibility contrast: a long EPI perfusion series with no arterial spin labelling."""
    seq = (str(o.sidecar.get("PulseSequenceDetails") or "") + " " + f.seqname).lower()
    return f.epi and ("ep2d_perf" in seq or ("PERFUSION" in f.it and (f.volumes or 1) > 10))


def _anat_contrast(f: _Facts) -> tuple[str | None, str]:
    """Single-image contrast for non-EPI MR magnitude images: (suffix, reason)."""
    te, tr, ti = f.te, f.tr, f.ti
    sig = f.signature()
    if te is None or tr is None:
        missing = "/".join(k for k, v in (("EchoTime", te), ("RepetitionTime", tr)) if v is None)
        return None, f"no {missing} in the sidecar ({sig}): contrast unknown; name it in a project heuristic"
    ir = "IR" in f.ss or (ti is not None and ti > 0) or "MP" in f.sv
    if ir:
        if ti is not None and ti >= 1400 and te >= 60:
            return "FLAIR", f"inversion recovery TI={ti:g} TE={te:g} (long TI, long TE)"
        if (ti is None or 300 <= ti < 1400) and te < 30:
            return "T1w", f"inversion-prepared TI={_fmt(ti)} TE={te:g} (MPRAGE-like)"
        return None, f"{sig}: inversion recovery not recognised (STIR or other); name it in a project heuristic"
    if "SE" in f.ss and "GR" not in f.ss:
        if tr >= 1500 and te >= 60:
            return "T2w", f"spin echo TR={tr:g} TE={te:g}"
        if tr >= 1500 and te <= 35:
            return "PDw", f"spin echo TR={tr:g} TE={te:g}"
        if tr <= 1000 and te <= 30:
            return "T1w", f"spin echo TR={tr:g} TE={te:g}"
        return None, f"{sig}: spin-echo contrast not recognised; name it in a project heuristic"
    if "GR" in f.ss or not f.ss:
        if te >= 15:
            return "T2starw", f"gradient echo TE={te:g} (T2*-weighted)"
        if f.acq3d and tr < 15 and te < 10 and f.flip is not None and f.flip >= 8 and "SP" in f.sv:
            return "T1w", f"3D spoiled gradient echo TR={tr:g} TE={te:g} flip={f.flip:g}"
    return None, f"{sig}: not a recognised contrast; name it in a project heuristic"


def _diffusion_sequence(f: _Facts) -> bool:
    """Diffusion sequence names: Philips DwiSE, Siemens ep_b<value> (bvals need the image with dcm2niix -b o)."""
    name = f.seqname.lstrip("*").upper()
    return "DWI" in name or (name.startswith("EP_B") and name[4:5].isdigit())


def _is_tof(o: Dcm2niixOutput, f: _Facts) -> bool:
    s = o.sidecar
    opts = str(s.get("ScanOptions") or "").upper()
    if "TOF" in opts or "ANGIO" in f.it or str(s.get("AcquisitionContrast", "")).upper() == "FLOW_ENCODED":
        return True
    mt = bool(s.get("MTState")) or "MT" in f.sv
    return (mt and f.acq3d and f.tr is not None and f.te is not None and f.flip is not None
            and 15 <= f.tr <= 50 and 2 <= f.te <= 8 and 15 <= f.flip <= 35)


def _first_pass(d: _Draft) -> None:
    o, f = d.o, d.f
    if f.modality not in ("MR", "PT"):
        d.leave(f"no BIDS datatype for modality {f.modality}: kept as pseudonymised DICOM in sourcedata/")
        return
    why = _derived_reason(f)
    if why:
        d.leave(why)
        return
    if f.modality == "PT":
        d.name("pet", "pet", "PET image (Modality PT)")
        d.missing = tuple(k for k in PET_REQUIRED if k not in o.sidecar)
        return
    s = o.sidecar
    if f.te is None and f.tr is None and not f.ss and not f.seqname:
        d.leave(f"no EchoTime, RepetitionTime, ScanningSequence or SequenceName in the sidecar "
                f"(ImageType {'/'.join(f.it) or '-'}): contrast unknown; name it in a project heuristic")
        return
    if "FIELDMAPHZ" in f.it:
        d.kind = "fmaphz"
        d.name("fmap", "fieldmap", "B0 field map in Hz (ImageType FIELDMAPHZ)")
        return
    if _is_dsc(o, f) and not ("ASL" in f.it or s.get("ArterialSpinLabelingType")):
        d.leave(f"dynamic susceptibility contrast perfusion ({f.signature()}): BIDS has no raw suffix for DSC; "
                f"name it in a project heuristic")
        return
    if _is_asl(o, f):
        if "M0" in f.it:
            d.kind = "m0"
            d.name("perf", "m0scan", "ASL M0 calibration (ImageType M0)")
            return
        d.kind = "asl"
        nvol = f.volumes
        if "PERFUSION" in f.it and not ({"M", "MAGNITUDE"} & set(f.it)):
            d.name("perf", "asl", f"scanner-computed ASL difference (ImageType PERFUSION), {nvol or '?'} "
                                  f"volume(s) of deltaM")
            if nvol:
                d.extra = {"aslcontext.tsv": "volume_type\n" + "deltam\n" * nvol}
            else:
                d.missing = ("aslcontext.tsv",)  # its volume count needs the image (dcm2niix -b y)
        else:
            d.name("perf", "asl", f"ASL label/control series ({nvol or '?'} volumes)")
            d.missing = ("aslcontext.tsv",)
        d.missing = d.missing + tuple(k for k in ASL_REQUIRED if k not in s)
        if str(s.get("MRAcquisitionType", "")).upper() == "2D" and "SliceTiming" not in s:
            d.missing += ("SliceTiming",)  # BIDS requires it of 2D ASL (the validator's error otherwise)
        return
    if (o.bvals is not None or "DIFFUSION" in f.it or s.get("DiffusionScheme") or _diffusion_sequence(f)
            or s.get("NumberOfDiffusionDirectionGE")):
        d.kind = "dwi"
        bmax = max(o.bvals) if o.bvals else None
        d.name("dwi", "dwi", f"diffusion weighted ({f.volumes or '?'} volume(s), max b={_fmt(bmax)})")
        return
    if f.epi:
        if f.part is not None:
            if f.spin_echo:
                d.leave(f"{f.part} image of a spin-echo EPI ({f.signature()}): name it in a project heuristic")
                return
            d.kind = "bold"
            d.name("func", "bold", f"{f.part} image of a gradient-echo EPI time series ({f.volumes or '?'} volume(s))",
                   task="unknown", part=f.part)
            return
        if f.spin_echo and f.volumes is None:
            d.leave(f"spin-echo EPI without diffusion facts and without its image ({f.signature()}): "
                    f"convert it with dcm2niix -b y to tell a field-map reference from a diffusion series")
            return
        if f.spin_echo and f.volumes <= 3:
            d.kind = "epi"
            d.name("fmap", "epi", f"spin-echo EPI without diffusion weighting, {f.volumes} volume(s): "
                                  f"field-map reference")
            return
        d.kind = "bold"
        echo = "spin-echo" if f.spin_echo else "gradient-echo"
        d.name("func", "bold", f"{echo} EPI time series without diffusion weighting ({f.volumes or '?'} volume(s), "
                               f"TE={_fmt(f.te)})",
               task="unknown")
        return
    # non-EPI MR: angiography first, then gradient-echo sets are decided per session
    if _is_tof(o, f) and f.part is None:
        d.name("anat", "angio", f"3D time-of-flight angiography ({f.signature()})")
        return
    if f.volumes is not None and f.volumes > 1 and f.part is None:
        d.leave(f"{f.signature()}: several volumes of a non-EPI sequence; name it in a project heuristic")
        return
    if "GR" in f.ss and "IR" not in f.ss and not f.ti and "MP" not in f.sv:
        d.kind = "gre"
        return
    if f.part is not None:
        d.leave(f"{f.part} image of {f.signature()}: not part of a field map or multi-echo set; "
                f"name it in a project heuristic")
        return
    suffix, reason = _anat_contrast(f)
    if suffix:
        d.name("anat", suffix, reason)
    else:
        d.leave(reason)


# --------------------------------------------------------------------------- whole-session rules

def _order(d: _Draft) -> tuple:
    return (d.o.series_number if d.o.series_number is not None else _HUGE, str(d.o.stem))


def _grid(d: _Draft) -> tuple:
    return tuple(d.o.shape[:3])


def _gre_sets(drafts: list[_Draft]) -> None:
    """Field maps and multi-echo GRE: group by sequence, TR, flip and grid (echoes may sit in several series)."""
    groups: dict[tuple, list[_Draft]] = defaultdict(list)
    for d in drafts:
        if d.kind == "gre":
            f = d.f
            groups[(f.seqname, _fmt(f.tr), _fmt(f.flip), _grid(d), f.acq3d,
                    f.pe or d.o.sidecar.get("PhaseEncodingAxis"))].append(d)
    for members in groups.values():
        tes = sorted({round(d.f.te, 3) for d in members if d.f.te is not None})
        phases = [d for d in members if d.f.part is not None]
        mags = [d for d in members if d.f.part is None]
        if any(d.f.te is None for d in members):
            for d in members:
                d.leave(f"gradient echo without EchoTime ({d.f.signature()}): name it in a project heuristic")
            continue
        echo_of = {te: i + 1 for i, te in enumerate(tes)}
        if len(tes) == 2 and tes[1] - tes[0] <= 10 and tes[1] <= 20:
            if not phases:
                for d in members:
                    d.leave(f"two-echo gradient echo magnitudes (TE={tes[0]:g}/{tes[1]:g}) without a phase image "
                            f"in this session: an incomplete field map; name it in a project heuristic")
                continue
            one_phase = len({round(p.f.te, 3) for p in phases}) == 1
            for d in mags:
                n = echo_of[round(d.f.te, 3)]
                d.name("fmap", f"magnitude{n}", f"field-map magnitude, echo {n} of TE={tes[0]:g}/{tes[1]:g}")
            for d in phases:
                if d.f.part != "phase":
                    d.leave(f"{d.f.part} image of a field map: BIDS field maps hold magnitude and phase only")
                elif one_phase:
                    d.name("fmap", "phasediff", f"field-map phase difference (TE={tes[0]:g}/{tes[1]:g})")
                else:
                    n = echo_of[round(d.f.te, 3)]
                    d.name("fmap", f"phase{n}", f"field-map phase, echo {n} (TE={d.f.te:g})")
            continue
        if len(tes) >= 2:
            for d in members:
                n = echo_of[round(d.f.te, 3)]
                part = (d.f.part or "mag") if phases else None
                d.name("anat", "MEGRE", f"multi-echo gradient echo, echo {n} of {len(tes)} (TE={d.f.te:g})",
                       echo=n, part=part)
            continue
        # one echo time
        if phases and not mags:
            for d in phases:
                d.leave(f"{d.f.part} image alone ({d.f.signature()}): its magnitude is not in this session; "
                        f"name it in a project heuristic")
            continue
        suffix, reason = _anat_contrast(mags[0].f if mags else members[0].f)
        for d in members:
            if suffix is None:
                d.leave(reason)
            elif phases:
                d.name("anat", suffix, reason, part=d.f.part or "mag")
            else:
                d.name("anat", suffix, reason)


def _fieldmap_magnitudes(drafts: list[_Draft]) -> None:
    hz_series = {d.o.series_uid for d in drafts if d.kind == "fmaphz"}
    for d in drafts:
        if d.o.series_uid in hz_series and d.kind != "fmaphz" and d.f.part is None and d.f.modality == "MR" \
                and _derived_reason(d.f) is None:
            d.kind = "fmaphz-mag"
            d.name("fmap", "magnitude", "magnitude image of a B0 field map in Hz (same series)")


def _sbrefs(drafts: list[_Draft]) -> None:
    """The last single-volume EPI acquired before a matching time series (same grid, phase encoding, echo,
    and TE for BOLD) is its reference (sbref). Earlier single volumes stay what they are (XA exports a
    run as one series per volume)."""
    for kind, datatype in (("bold", "func"), ("dwi", "dwi")):
        series = [d for d in drafts if d.kind == kind]
        multi = [d for d in series if (d.f.volumes or 0) > 1 and d.f.part is None]
        chosen: dict[int, _Draft] = {}
        for d in series:
            if d.f.volumes != 1 or d.f.part is not None:
                continue
            later = [m for m in multi if _grid(m) == _grid(d) and m.f.pe == d.f.pe
                     and (kind == "dwi" or _close(m.f.te, d.f.te)) and m.f.echo_number == d.f.echo_number
                     and _order(m) > _order(d)]
            if later:
                target = min(later, key=_order)
                if id(target) not in chosen or _order(chosen[id(target)]) < _order(d):
                    chosen[id(target)] = d
        for target in multi:
            d = chosen.get(id(target))
            if d is None:
                continue
            d.kind = kind + "-sbref"
            ents = {k: v for k, v in target.entities.items() if k != "run"}
            d.name(datatype, "sbref", f"single-volume reference acquired just before the {target.suffix} "
                                      f"series {target.o.series_number} (same grid and phase encoding)", **ents)


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 0.5


def _reverse_pe_epis(drafts: list[_Draft]) -> None:
    """A short gradient-echo EPI with a reversed-polarity twin (same grid) is a field-map reference."""
    epis = [d for d in drafts if d.kind in ("bold", "dwi", "epi")]
    for d in drafts:
        if d.f.volumes is None or d.f.volumes > 3 or not d.f.pe or d.f.part is not None:
            continue
        if d.kind == "dwi":  # b=0 references (b <= 50) only, never diffusion-weighted volumes
            if not d.o.bvals or max(d.o.bvals) > 50:
                continue
        elif d.kind != "bold":
            continue
        flipped = d.f.pe[:-1] if d.f.pe.endswith("-") else d.f.pe + "-"
        if any(t is not d and t.f.pe == flipped and _grid(t) == _grid(d) for t in epis):
            what = "b=0 EPI" if d.kind == "dwi" else "gradient-echo EPI"
            d.kind = "epi"
            d.name("fmap", "epi", f"{d.f.volumes}-volume {what} with a reversed phase-encoding twin in "
                                  f"this session: field-map reference")


def _bold_parts(drafts: list[_Draft]) -> None:
    """When a BOLD series also holds phase (or real/imaginary) images, its magnitude becomes part-mag."""
    with_parts = {d.o.series_uid for d in drafts if d.kind == "bold" and d.f.part is not None}
    for d in drafts:
        if d.kind in ("bold", "bold-sbref") and d.f.part is None and d.o.series_uid in with_parts:
            d.entities = {**d.entities, "part": "mag"}


def _multi_echo_bold(drafts: list[_Draft]) -> None:
    by_series: dict[str, list[_Draft]] = defaultdict(list)
    for d in drafts:
        if d.kind in ("bold", "bold-sbref") and d.f.echo_number is not None:
            by_series[(d.o.series_uid, d.kind)].append(d)
    for members in by_series.values():
        if len({d.f.echo_number for d in members}) > 1:
            for d in members:
                d.entities = {**d.entities, "echo": str(d.f.echo_number)}
                d.reason += f"; echo {d.f.echo_number} of a multi-echo series"


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


def _directions(drafts: list[_Draft]) -> None:
    for d in drafts:
        if d.suffix != "epi":
            continue
        affine = d.o.affine()
        label = phase_encoding_label(d.f.pe, affine if affine is not None else _axes_from_orientation(d.o.sidecar))
        if label is None:
            why = ("only PhaseEncodingAxis (no polarity) in the sidecar" if not d.f.pe
                   else "neither a NIfTI affine nor ImageOrientationPatientDICOM to map it to the head")
            d.leave(f"EPI field-map reference whose direction cannot be read ({why}); BIDS requires dir- "
                    f"for epi: name it in a project heuristic")
            d.kind = ""
        else:
            d.entities = {**d.entities, "dir": label}
            d.reason += f"; phase encoding {d.f.pe} -> dir-{label}"


def _m0scans(drafts: list[_Draft]) -> None:
    asl_seq = {(d.f.seqname, _grid(d)) for d in drafts if d.kind == "asl"}
    for d in drafts:
        if d.datatype is None and d.kind in ("", "gre") and d.f.modality == "MR" and _derived_reason(d.f) is None \
                and (d.f.seqname, _grid(d)) in asl_seq and (d.f.volumes or 1) == 1 and d.f.part is None:
            d.kind = "m0"
            d.name("perf", "m0scan", "single volume of the ASL sequence and grid without labelling: M0 calibration")


def _runs(drafts: list[_Draft]) -> None:
    named: dict[tuple, list[_Draft]] = defaultdict(list)
    for d in drafts:
        if d.datatype:
            named[(d.datatype, d.suffix, tuple(sorted(d.entities.items())))].append(d)
    for members in named.values():
        if len(members) > 1:
            for n, d in enumerate(sorted(members, key=_order), start=1):
                d.entities = {**d.entities, "run": str(n)}


def classify_session(outputs: list[Dcm2niixOutput]) -> list[Decision]:
    """Every output of one session -> one Decision each, same order. Whole-session decisions (run numbers when the
    same name occurs twice, field-map pairing magnitude/phase, sbref next to its bold/dwi, m0scan next to asl,
    IntendedFor targets are NOT here: convert computes IntendedFor) are made here."""
    drafts = [_Draft(o=o, f=_facts(o)) for o in outputs]
    for d in drafts:
        _first_pass(d)
    _fieldmap_magnitudes(drafts)
    _gre_sets(drafts)
    _sbrefs(drafts)
    _reverse_pe_epis(drafts)
    _multi_echo_bold(drafts)
    _bold_parts(drafts)
    _directions(drafts)
    _m0scans(drafts)
    for d in drafts:
        if d.datatype is None and not d.reason:
            d.leave(f"{d.f.signature()}: not a recognised contrast; name it in a project heuristic")
    _runs(drafts)
    out = []
    for d in drafts:
        ents = {k: d.entities[k] for k in ENTITY_ORDER if k in d.entities}
        if d.suffix in SUFFIX_REQUIRED:
            d.missing = tuple(d.missing) + tuple(k for k in SUFFIX_REQUIRED[d.suffix]
                                                 if k not in d.o.sidecar and k not in d.missing)
        out.append(Decision(output=d.o, datatype=d.datatype, suffix=d.suffix, entities=ents, reason=d.reason,
                            extra_files=dict(d.extra), missing=tuple(d.missing)))
    return out
