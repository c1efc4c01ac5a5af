"""heudiconv heuristic ``auto``: classify common MR series from their acquisition metadata.

No protocol or series name is read to decide what a series is: only ImageType (PS3.3
C.7.6.1.1.2), ScanningSequence / SequenceVariant (C.8.3.1.1.1-2), EchoTime / RepetitionTime /
InversionTime, MRAcquisitionType, diffusion b-values (standard (0018,9087) and the Siemens / GE
private copies), the number of slices and volumes, the Siemens mosaic flag, and, for field maps,
the frame types of enhanced MR (C.8.13.2.1.1) or the GE internal sequence name.

What it produces (BIDS 1.10):

========  ==================================================================================
anat      T1w (inversion-prepared or spoiled short-TE gradient echo, or short TR/TE spin echo),
          T2w (long TR/TE spin echo), FLAIR (long-TI inversion recovery with long TE)
func      bold (gradient-echo EPI, >= 3 volumes, no diffusion weighting), task-unknown
dwi       dwi (any b > 0 in a series of >= 2 volumes)
fmap      magnitude1/magnitude2 + phasediff (GRE field maps); fieldmap (+ magnitude) for GE
          and Philips B0 maps in Hz; epi (1-2 volume EPI references, dir-<AP|PA|RL|LR|IS|SI>)
========  ==================================================================================

Derived images, localizers (several orientations or ``LOCALIZER`` in ImageType), non-MR and
non-image objects (SR, presentation states, raw data) are left out, as is any series that
does not meet one rule: it is reported as unclassified with its reason, never guessed.
A series with no sequence parameters at all (PACSMAN's synthetic T1, for one) is therefore
left out: its contrast cannot be read from its metadata.

The module also defines ``grouping`` (used with ``heudiconv -g custom``): it reads headers once
with pydicom, groups by SeriesInstanceUID (SeriesNumber may be missing), drops non-image SOP
classes, and merges Siemens XA "MFSPLIT" time series split into one series per volume.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, defaultdict
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

lgr = logging.getLogger("heudiconv.heuristics.auto")

# PS3.4 B.5: the MR image storage SOP classes dcm2niix converts.
MR_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
}

# Header tags read by ``grouping`` (everything else is skipped for speed).
_TAGS = [
    "SOPClassUID", "Modality", "Manufacturer", "StudyInstanceUID", "SeriesInstanceUID",
    "SeriesNumber", "SeriesDescription", "ProtocolName", "SeriesTime", "AcquisitionTime",
    "ImageType", "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
    "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle", "EchoNumbers",
    "Rows", "Columns", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames",
    "NumberOfTemporalPositions", "InPlanePhaseEncodingDirection", "PatientAge", "PatientSex",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    "DiffusionBValue", "PulseSequenceName", "AcquisitionNumber", "StudyDate", "SeriesDate",
    (0x0019, 0x0010), (0x0019, 0x100C),  # Siemens B_value
    (0x0019, 0x109E),  # GE internal pulse sequence name
    (0x0029, 0x0010), (0x0029, 0x1010),  # Siemens CSA image header (phase-encoding polarity)
    (0x0043, 0x0010), (0x0043, 0x1039),  # GE slop_int_6..9 (b-value first)
    (0x2001, 0x0010), (0x2001, 0x1020),  # Philips scanning technique (FEEPI, SEEPI)
    (0x2005, 0x0010), (0x2005, 0x1011),  # Philips image type (M, P, B0)
]


def create_key(template: str, outtype: tuple[str, ...] = ("nii.gz",), annotation_classes=None):
    if not template:
        raise ValueError("Template must be a valid format string")
    return template, outtype, annotation_classes


# --------------------------------------------------------------------------- header reading

def _f(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _strs(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(str(v).strip().upper() for v in value)
    return tuple(s.strip().upper() for s in str(value).split("\\") if s.strip())


def _b_value(ds) -> float | None:
    """The b-value of one image: standard tag, else the Siemens or GE private copy."""
    b = _f(ds.get("DiffusionBValue"))
    if b is None and (0x0019, 0x100C) in ds and "SIEMENS" in str(ds.get((0x0019, 0x0010), "").value if (0x0019, 0x0010) in ds else "").upper():
        b = _f(ds[0x0019, 0x100C].value)
    if b is None and (0x0043, 0x1039) in ds:
        v = ds[0x0043, 0x1039].value
        first = v[0] if isinstance(v, (list, pydicom.multival.MultiValue)) else v
        b = _f(first)
        if b is not None and b >= 1e9:  # GE adds 10^9 to flag a b-value it did not scale
            b -= 1e9
    return b


def _siemens_pe_positive(ds) -> bool | None:
    """PhaseEncodingDirectionPositive from the Siemens CSA image header, if present."""
    if (0x0029, 0x1010) not in ds:
        return None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader

        csa = csareader.get_csa_header(ds, "image")
        if csa is None:
            return None
        val = csareader.get_scalar(csa, "PhaseEncodingDirectionPositive")
        return None if val is None else bool(int(val))
    except Exception:  # a damaged CSA header only loses the polarity
        return None


def _enhanced_frames(ds) -> tuple[int, int, tuple[str, ...], tuple[float, ...]]:
    """(frames, distinct positions, frame-type values, echo times) of an enhanced MR object."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    positions, ftypes, tes = set(), set(), set()
    for fr in ds.get("PerFrameFunctionalGroupsSequence", []) or []:
        for item in fr.get("PlanePositionSequence", []) or []:
            positions.add(tuple(round(float(x), 2) for x in item.ImagePositionPatient))
        for item in fr.get("MRImageFrameTypeSequence", []) or []:
            ftypes.update(_strs(item.get("FrameType")))
        for item in fr.get("MREchoSequence", []) or []:
            te = _f(item.get("EffectiveEchoTime"))
            if te is not None:
                tes.add(te)
    return n, max(len(positions), 1), tuple(sorted(ftypes)), tuple(sorted(tes))


def series_features(datasets: list, n_files: int) -> dict[str, Any]:
    """Classification features of one series from its (pixel-less) datasets."""
    ds = datasets[0]
    image_type = _strs(ds.get("ImageType"))
    orientations = {tuple(round(float(x), 3) for x in d.ImageOrientationPatient)
                    for d in datasets if d.get("ImageOrientationPatient")}
    positions = {tuple(round(float(x), 2) for x in d.ImagePositionPatient)
                 for d in datasets if d.get("ImagePositionPatient")}
    echoes = {int(d.EchoNumbers) for d in datasets if d.get("EchoNumbers") not in (None, "")}
    echo_times = {float(d.EchoTime) for d in datasets if _f(d.get("EchoTime")) is not None}
    bvals = [b for b in (_b_value(d) for d in datasets) if b is not None]
    mosaic = "MOSAIC" in image_type
    enhanced = ds.get("SOPClassUID") in ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")
    frame_types: tuple[str, ...] = ()
    if enhanced:
        frames, n_pos, frame_types, tes = _enhanced_frames(ds)
        n_slices = n_pos
        n_volumes = max(frames // n_pos, 1) * n_files
        echo_times |= set(tes)
    elif mosaic:
        n_slices = 0  # inside the mosaic; not needed for classification
        n_volumes = n_files
    else:
        n_slices = max(len(positions), 1)
        n_volumes = max(n_files // (n_slices * max(len(echoes), 1)), 1)
    spacing = [_f(x) for x in (ds.get("PixelSpacing") or [])]
    slice_step = None
    if len(positions) > 1 and orientations and len(orientations) == 1:
        iop = next(iter(orientations))
        normal = (iop[1] * iop[5] - iop[2] * iop[4], iop[2] * iop[3] - iop[0] * iop[5],
                  iop[0] * iop[4] - iop[1] * iop[3])
        dists = sorted({round(sum(p[i] * normal[i] for i in range(3)), 2) for p in positions})
        if len(dists) > 1:
            slice_step = round(min(b - a for a, b in zip(dists, dists[1:])), 3)
    pe_positive = _siemens_pe_positive(ds)
    pe_vector = None
    ipe = str(ds.get("InPlanePhaseEncodingDirection", "") or "").upper()
    if orientations and ipe in ("ROW", "COL"):
        iop = next(iter(orientations))
        pe_vector = tuple(iop[0:3] if ipe == "ROW" else iop[3:6])
    ge_seq = ""
    if (0x0019, 0x109E) in ds and "GE" in str(ds.get("Manufacturer", "")).upper():
        ge_seq = str(ds[0x0019, 0x109E].value).strip().upper()
    philips_tech = str(ds[0x2001, 0x1020].value).strip().upper() if (0x2001, 0x1020) in ds else ""
    philips_types = sorted({str(d[0x2005, 0x1011].value).strip().upper()
                            for d in datasets if (0x2005, 0x1011) in d})
    return {
        "sop_class": str(ds.get("SOPClassUID", "")),
        "modality": str(ds.get("Modality", "")).upper(),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "image_type": image_type,
        "frame_types": frame_types,
        "scanning_sequence": _strs(ds.get("ScanningSequence")),
        "sequence_variant": _strs(ds.get("SequenceVariant")),
        "mr_acquisition_type": str(ds.get("MRAcquisitionType", "") or "").upper(),
        "te": _f(ds.get("EchoTime")),
        "tr": _f(ds.get("RepetitionTime")),
        "ti": _f(ds.get("InversionTime")),
        "echo_numbers": tuple(sorted(echoes)),
        "echo_times": tuple(sorted(echo_times)),
        "n_files": n_files,
        "n_slices": n_slices,
        "n_volumes": n_volumes,
        "n_orientations": len(orientations),
        "mosaic": mosaic,
        "pixel_spacing": tuple(s for s in spacing if s is not None),
        "slice_step": slice_step,
        "max_b": max(bvals) if bvals else None,
        "pe_vector": pe_vector,
        "pe_positive": pe_positive,
        "ge_sequence": ge_seq,
        "philips_technique": philips_tech,
        "philips_types": tuple(philips_types),
        "temporal_positions": int(ds.get("NumberOfTemporalPositions") or 0),
        "acquisition_number": ds.get("AcquisitionNumber"),
        "rows": int(ds.get("Rows") or 0),
        "columns": int(ds.get("Columns") or 0),
        "orientation": next(iter(orientations)) if len(orientations) == 1 else None,
    }


# --------------------------------------------------------------------------- classification

def _is_epi(f: dict) -> bool:
    return "EP" in f["scanning_sequence"] or "EPI" in f["image_type"] or f["mosaic"] or \
        f["philips_technique"].endswith("EPI")


def _pe_label(f: dict) -> str | None:
    """Phase-encoding direction as from-to patient letters (DICOM LPS: +x L, +y P, +z S)."""
    vec = f.get("pe_vector")
    if vec is None or f.get("pe_positive") is None:
        return None
    axis = max(range(3), key=lambda i: abs(vec[i]))
    sign = (1 if vec[axis] > 0 else -1) * (1 if f["pe_positive"] else -1)
    return [("RL", "LR"), ("AP", "PA"), ("IS", "SI")][axis][0 if sign > 0 else 1]


def classify(f: dict) -> tuple[str | None, str]:
    """Classify one series from :func:`series_features`.

    Returns ``(kind, reason)``: ``kind`` is ``"datatype/suffix"`` (``anat/T1w``, ``func/bold``,
    ``dwi/dwi``, ``fmap/magnitude``, ``fmap/phasediff``, ``fmap/fieldmap``, ``fmap/epi``) or
    ``None`` when the series is left out, ``reason`` says why in either case.
    """
    it = f["image_type"]
    if f["modality"] != "MR" or f["sop_class"] not in MR_IMAGE_SOP_CLASSES:
        return None, f"not an MR image (Modality {f['modality'] or '-'})"
    if "DERIVED" in it or "SECONDARY" in it:
        return None, "derived image (ImageType DERIVED/SECONDARY)"
    for bad in ("LOCALIZER", "SCOUT", "MOCO", "ADC", "FA", "TRACEW", "TRACE", "MPR", "PROJECTION IMAGE"):
        if bad in it:
            return None, f"derived or localizer image (ImageType {bad})"
    if f["n_orientations"] > 1:
        return None, "localizer (slices in several orientations)"
    ss, sv = f["scanning_sequence"], f["sequence_variant"]
    te, tr, ti = f["te"], f["tr"], f["ti"]
    epi = _is_epi(f)
    nvol = f["n_volumes"]
    phase = "P" in it or "PHASE" in it or "P" in f["philips_types"]

    # field maps in Hz (GE B0map, Philips B0 with FIELD_MAP frames)
    if f["ge_sequence"].startswith("B0MAP") or "FIELD_MAP" in f["frame_types"] or "B0" in f["philips_types"]:
        return "fmap/fieldmap", "B0 field map in Hz (GE B0map sequence or FIELD_MAP frames)"
    if f["max_b"] is not None and f["max_b"] > 0:
        if nvol >= 2:
            return "dwi/dwi", f"diffusion weighted (max b={f['max_b']:g}, {nvol} volumes)"
        return None, "single diffusion-weighted volume (no b=0 reference)"
    if "DIFFUSION" in it:
        return "dwi/dwi", "ImageType DIFFUSION"
    if epi:
        if "SE" in ss and "GR" not in ss:
            if nvol <= 3:
                return "fmap/epi", f"spin-echo EPI reference ({nvol} volumes)"
            return None, f"spin-echo EPI time series without diffusion weighting ({nvol} volumes)"
        if nvol >= 3:
            return "func/bold", f"gradient-echo EPI time series ({nvol} volumes)"
        if f["pe_vector"] is not None:
            return "fmap/epi", f"gradient-echo EPI reference ({nvol} volumes)"
        return None, f"EPI with {nvol} volume(s) and no phase-encoding direction"
    # GRE field map: phase or magnitude of a 2D gradient echo with 1-2 echoes (pairing in infotodict)
    if "GR" in ss and "SE" not in ss and "IR" not in ss and ti in (None, 0.0) and nvol == 1 \
            and f["mr_acquisition_type"] == "2D" and te is not None and te < 15 and tr is not None and tr < 2000:
        if phase:
            return "fmap/phasediff", "2D GRE phase image (candidate phasediff)"
        return "fmap/magnitude", "2D GRE magnitude (candidate field-map magnitude)"
    if phase:
        return None, "phase image outside a field map"
    if nvol != 1:
        return None, f"{nvol} volumes of a non-EPI sequence"
    if te is None and tr is None and not ss:
        return None, "no EchoTime/RepetitionTime/ScanningSequence: contrast unknown"
    if te is None or tr is None:
        return None, "EchoTime or RepetitionTime missing"
    if "IR" in ss or (ti is not None and ti > 0):
        if ti is not None and ti >= 1500 and te >= 60 and tr > ti:
            return "anat/FLAIR", f"inversion recovery TI={ti:g} TE={te:g}"
        if ti is not None and 300 <= ti < 1500 and te < 15:
            return "anat/T1w", f"inversion-prepared T1 TI={ti:g} TE={te:g}"
        return None, f"inversion recovery with TI={ti} TE={te:g}: contrast not recognised"
    if "SE" in ss:
        if tr >= 2000 and te >= 60:
            return "anat/T2w", f"spin echo TR={tr:g} TE={te:g}"
        if tr <= 1000 and te <= 30:
            return "anat/T1w", f"spin echo TR={tr:g} TE={te:g}"
        return None, f"spin echo TR={tr:g} TE={te:g}: contrast not recognised"
    if "GR" in ss and f["mr_acquisition_type"] == "3D" and te < 15 and tr < 50 and "SP" in sv:
        return "anat/T1w", f"3D spoiled gradient echo TR={tr:g} TE={te:g}"
    return None, f"sequence {'/'.join(ss) or '-'} TR={tr:g} TE={te:g}: not recognised"


# --------------------------------------------------------------------------- heudiconv hooks

def _series_sort_key(item):
    f = item[1]
    return (f.get("series_number") if f.get("series_number") is not None else 10**9, f.get("series_time") or "", item[0])


def grouping(files, dcmfilter, seqinfo_cls):
    """Group files by study and series (heudiconv ``-g custom``).

    Returns ``{StudyInstanceUID: {SeqInfo: [files]}}``. Non-image SOP classes and unreadable
    files are dropped; per-volume Siemens XA series of one time series are merged.
    """
    by_series: dict[str, dict[str, Any]] = OrderedDict()
    for fn in files:
        try:
            ds = pydicom.dcmread(fn, stop_before_pixels=True, specific_tags=_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if str(ds.get("SOPClassUID", "")) not in MR_IMAGE_SOP_CLASSES or "SeriesInstanceUID" not in ds:
            continue
        if dcmfilter is not None and dcmfilter(ds):
            continue
        uid = str(ds.SeriesInstanceUID)
        s = by_series.setdefault(uid, {"files": [], "datasets": [], "study": str(ds.get("StudyInstanceUID", ""))})
        s["files"].append(fn)
        s["datasets"].append(ds)

    infos = {}
    for uid, s in by_series.items():
        f = series_features(s["datasets"], len(s["files"]))
        ds = s["datasets"][0]
        sn = ds.get("SeriesNumber")
        f["series_number"] = int(sn) if sn not in (None, "") else None
        f["series_time"] = str(ds.get("SeriesTime") or ds.get("AcquisitionTime") or "")
        f["series_uids"] = (uid,)
        infos[uid] = (f, s)
    infos = _merge_split_series(infos)

    result: dict[str, dict] = OrderedDict()
    total = 0
    for uid, (f, s) in sorted(infos.items(), key=lambda kv: _series_sort_key((kv[0], kv[1][0]))):
        ds = s["datasets"][0]
        total += len(s["files"])
        sn = f["series_number"]
        series_id = f"{sn if sn is not None else 0}-{uid.rsplit('.', 1)[-1][-8:]}"
        custom = tuple(sorted((k, _plain(v)) for k, v in f.items() if k != "series_time"))
        si = seqinfo_cls(
            total, os.path.basename(s["files"][0]), series_id, os.path.basename(os.path.dirname(s["files"][0])),
            len(s["files"]), "", f["rows"], f["columns"], f["n_slices"], f["n_volumes"],
            (f["tr"] or -1000.0) / 1000.0, f["te"] if f["te"] is not None else -1.0,
            str(ds.get("ProtocolName", "")), "MOCO" in f["image_type"], "DERIVED" in f["image_type"],
            None, "", "", str(ds.get("SeriesDescription", "")), "", f["image_type"], None,
            ds.get("PatientAge"), ds.get("PatientSex"), None, uid, None, custom,
        )
        result.setdefault(s["study"], OrderedDict())[si] = list(s["files"])
    return result


def _plain(v):
    """Plain Python values only, so that ``repr`` round-trips through ``ast.literal_eval``
    (heudiconv writes ``custom`` into dicominfo.tsv with ``str``)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(_plain(x) for x in v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _merge_split_series(infos: dict) -> dict:
    """Merge Siemens XA series holding one volume each of one time series ("MFSPLIT").

    They are recognised by ImageType MFSPLIT, NumberOfTemporalPositions N > 1, one volume per
    series, and N series with the same geometry, timing and consecutive SeriesNumbers.
    """
    groups = defaultdict(list)
    for uid, (f, s) in infos.items():
        if "MFSPLIT" in f["image_type"] and f["temporal_positions"] > 1 and f["n_volumes"] == 1 \
                and f["series_number"] is not None:
            key = (s["study"], f["image_type"], f["scanning_sequence"], f["te"], f["tr"], f["rows"],
                   f["columns"], f["n_slices"], f["orientation"], f["temporal_positions"])
            groups[key].append(uid)
    for key, uids in groups.items():
        n = key[-1]
        uids.sort(key=lambda u: infos[u][0]["series_number"])
        numbers = [infos[u][0]["series_number"] for u in uids]
        if len(uids) != n or numbers != list(range(numbers[0], numbers[0] + n)):
            continue
        first_f, first_s = infos[uids[0]]
        merged_s = {"files": [], "datasets": [], "study": first_s["study"]}
        for u in uids:
            merged_s["files"] += infos[u][1]["files"]
            merged_s["datasets"] += infos[u][1]["datasets"]
        f = dict(first_f)
        f["n_files"] = len(merged_s["files"])
        f["n_volumes"] = n
        f["series_uids"] = tuple(uids)
        for u in uids:
            del infos[u]
        infos[uids[0]] = (f, merged_s)
    return infos


def features_of(seqinfo) -> dict:
    """The feature dict ``grouping`` stored in ``seqinfo.custom``."""
    return dict(seqinfo.custom) if seqinfo.custom else {}


def plan(feature_list: list[dict]) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """Decide the BIDS name of every series of one session.

    Takes the features of each series in acquisition order. Returns ``(named, left_out)``:
    ``named`` holds ``(index, template, reason)`` with heudiconv templates, ``left_out``
    ``(index, reason)``.
    """
    kinds = [classify(f) for f in feature_list]
    left_out: list[tuple[int, str]] = []
    entries: list[tuple[int, str, str, dict]] = []  # index, datatype, suffix, entities
    # GRE field maps: a phasediff pairs with magnitude series of the same geometry and TR.
    phases = [i for i, (k, _) in enumerate(kinds) if k == "fmap/phasediff"]
    mags = [i for i, (k, _) in enumerate(kinds) if k == "fmap/magnitude"]

    def geom(f):
        return (f["rows"], f["columns"], f["n_slices"], f["orientation"], f["tr"])

    used_mags = set()
    for p in phases:
        partners = [m for m in mags if m not in used_mags and geom(feature_list[m]) == geom(feature_list[p])]
        tes = [te for m in partners for te in feature_list[m]["echo_times"]]
        if not partners or len(set(tes)) < 2:
            left_out.append((p, "phase image without two magnitude echoes of the same geometry"))
            continue
        entries.append((p, "fmap", "phasediff", {}))
        for m in partners[:2]:
            used_mags.add(m)
            fm = feature_list[m]
            if len(fm["echo_times"]) >= 2:
                entries.append((m, "fmap", "magnitude", {}))  # heudiconv names the echoes 1 and 2
            else:
                first = fm["echo_times"][0] == min(tes)
                entries.append((m, "fmap", "magnitude1" if first else "magnitude2", {}))
    for m in mags:
        if m not in used_mags:
            left_out.append((m, "gradient-echo magnitude without a matching phase image"))
    for i, (kind, reason) in enumerate(kinds):
        if kind is None:
            left_out.append((i, reason))
            continue
        if kind in ("fmap/phasediff", "fmap/magnitude"):
            continue
        datatype, suffix = kind.split("/")
        ent: dict[str, str] = {}
        if suffix == "bold":
            ent["task"] = "unknown"
        if suffix == "epi":
            ent["dir"] = _pe_label(feature_list[i]) or "unknown"
        entries.append((i, datatype, suffix, ent))
    entries.sort(key=lambda e: e[0])

    # run-<n> where the same name would occur twice; field-map sets count as one run each.
    def name_key(e):
        _, datatype, suffix, ent = e
        base = "magnitude" if suffix.startswith("magnitude") else suffix
        return (datatype, base if datatype != "fmap" or base not in ("phasediff", "magnitude") else "gre",
                tuple(sorted(ent.items())))

    counts = defaultdict(int)
    for e in entries:
        if not e[2].startswith("magnitude") and e[2] != "phasediff":
            counts[name_key(e)] += 1
    gre_sets = [e[0] for e in entries if e[2] == "phasediff"]
    seen: dict = defaultdict(int)
    named = []
    for idx, datatype, suffix, ent in entries:
        key = name_key((idx, datatype, suffix, ent))
        run = None
        if suffix.startswith("magnitude") or suffix == "phasediff":
            if len(gre_sets) > 1:  # the set's run is that of its phasediff (nearest for magnitudes)
                run = gre_sets.index(min(gre_sets, key=lambda p: abs(p - idx))) + 1
        elif counts[key] > 1:
            seen[key] += 1
            run = seen[key]
        label = "_".join(["{bids_subject_session_prefix}"]
                         + [f"{k}-{ent[k]}" for k in ("task", "acq", "dir") if k in ent]
                         + ([f"run-{run}"] if run else []) + [suffix])
        named.append((idx, f"{{bids_subject_session_dir}}/{datatype}/{label}", kinds[idx][1]))
    return named, left_out


def infotodict(seqinfo):
    """heudiconv entry point: ``{(template, outtypes, None): [series_id, ...]}``."""
    seqs = list(seqinfo)
    named, left_out = plan([features_of(s) for s in seqs])
    info: dict = {}
    for idx, template, _reason in named:
        info.setdefault(create_key(template), []).append(seqs[idx].series_id)
    for idx, reason in left_out:
        lgr.warning("auto heuristic left out series %s: %s", seqs[idx].series_id, reason)
    return info


POPULATE_INTENDED_FOR_OPTS = {"matching_parameters": ["ImagingVolume"], "criterion": "Closest"}
