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

from collections import defaultdict
from dataclasses import dataclass, field

from pacs2bids.bids.names import ENTITY_ORDER as _BIDS_ORDER, bids_path
from pacs2bids.convert.facts import (
    Dcm2niixOutput, _axes_from_orientation, _facts, _fmt, phase_encoding_label, read_output,
)
from pacs2bids.convert.rules import (
    _HUGE, ASL_REQUIRED, PET_REQUIRED, SUFFIX_REQUIRED, _anat_contrast, _derived_reason, _Draft, _first_pass,
)

__all__ = [
    "ENTITY_ORDER", "Dcm2niixOutput", "Decision", "read_output", "classify_session",
    "ASL_REQUIRED", "PET_REQUIRED", "SUFFIX_REQUIRED", "phase_encoding_label",
]

#: The entities MR/PET raw data uses, in BIDS order (after sub/ses; :mod:`pacs2bids.bids.names`).
ENTITY_ORDER = tuple(k for k in _BIDS_ORDER
                     if k in ("task", "acq", "ce", "trc", "rec", "dir", "run", "echo", "flip", "inv", "mt", "part",
                              "chunk"))


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
        return bids_path(subject, session, self.datatype, {k: self.entities.get(k) for k in ENTITY_ORDER},
                         self.suffix)


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
