"""Per-image classification rules: one draft name (or the reason it is left out) for each image
from its facts alone; the whole-session rules in :mod:`.classify` then refine them."""

from __future__ import annotations

from dataclasses import dataclass, field

from pacs2bids.convert.facts import Dcm2niixOutput, _Facts, _fmt

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


def _asl(d: _Draft) -> None:
    """An ASL series: M0, scanner-computed deltaM, or label/control (its order unknown)."""
    f, s = d.f, d.o.sidecar
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


def _epi(d: _Draft) -> None:
    """An EPI without diffusion facts: BOLD (magnitude or phase part), or a short spin-echo field-map reference."""
    f = d.f
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


def _first_pass(d: _Draft) -> None:
    """The per-image rules of the table in :mod:`.classify`, in its order (first match wins)."""
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
        _asl(d)
        return
    if (o.bvals is not None or "DIFFUSION" in f.it or s.get("DiffusionScheme") or _diffusion_sequence(f)
            or s.get("NumberOfDiffusionDirectionGE")):
        d.kind = "dwi"
        bmax = max(o.bvals) if o.bvals else None
        d.name("dwi", "dwi", f"diffusion weighted ({f.volumes or '?'} volume(s), max b={_fmt(bmax)})")
        return
    if f.epi:
        _epi(d)
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


