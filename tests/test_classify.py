"""classify.py: names from dcm2niix sidecars.

Real data first: every series of ../shared/data/dicom-vendors, ../shared/data/dicom and the bundled
sample is converted once per test session by dcm2niix (the pinned PyPI wheel), one folder per series as
convert does, and each session's outputs are classified together. Each series is a parameter, so a failure
names it. Then the pure rules, on small hand-built sidecars (edge cases the corpora do not hold).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from pacs2bids.classify import (
    ASL_REQUIRED, ENTITY_ORDER, Dcm2niixOutput, Decision, classify_session, phase_encoding_label, read_output,
)

DCM2NIIX = shutil.which("dcm2niix")


# --------------------------------------------------------------------------- converting a corpus once

@dataclasses.dataclass(frozen=True)
class Converted:
    session: str              # StudyInstanceUID (+ "enh" for the Philips enhanced export): one BIDS session
    folder: str               # folder of the series' first file, relative to the corpus root
    series_number: int | None
    decision: Decision


def _read_header(p: Path):
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p) as f:
                return pydicom.dcmread(f, stop_before_pixels=True)
        return pydicom.dcmread(p, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError):
        return None


def convert_and_classify(root: Path, work: Path) -> list[Converted]:
    """Group files by session (StudyInstanceUID; the Philips enhanced export apart) and SeriesInstanceUID,
    run dcm2niix once per series folder, classify each session's outputs together."""
    assert DCM2NIIX, "dcm2niix is not on PATH: install the pinned wheel (pip install dcm2niix)"
    series: dict[tuple[str, str], list[Path]] = defaultdict(list)
    where: dict[tuple[str, str], tuple[str, int | None]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or "Ref" in rel.parts:
            continue
        ds = _read_header(p)
        if ds is None or "SeriesInstanceUID" not in ds:
            continue
        export = "enh" if "enh" in rel.parts else ""
        key = (f"{ds.StudyInstanceUID}{export}", str(ds.SeriesInstanceUID))
        series[key].append(p)
        sn = ds.get("SeriesNumber")
        where.setdefault(key, (str(rel.parent), int(sn) if sn not in (None, "") else None))
    sessions: dict[str, list[tuple[tuple[str, str], Dcm2niixOutput]]] = defaultdict(list)
    for n, (key, files) in enumerate(sorted(series.items())):
        src, out = work / "in" / f"{n:03d}", work / "out" / f"{n:03d}"
        src.mkdir(parents=True)
        out.mkdir(parents=True)
        for p in files:
            if p.name.endswith(".gz"):
                with gzip.open(p) as f, open(src / p.name[:-3], "wb") as g:
                    shutil.copyfileobj(f, g)
            else:
                (src / p.name).symlink_to(p)
        run = subprocess.run([DCM2NIIX, "-b", "y", "-z", "n", "-f", "s%s", "-o", str(out), str(src)],
                             capture_output=True, text=True)
        assert run.returncode in (0, 2), f"dcm2niix failed on {where[key][0]}: {run.stderr[-500:]}"  # 2: no images
        for js in sorted(out.glob("*.json")):
            sessions[key[0]].append((key, read_output(js.with_suffix(""), key[1], where[key][1])))
    result = []
    for session, items in sessions.items():
        for (key, _), d in zip(items, classify_session([o for _, o in items])):
            result.append(Converted(session, where[key][0], where[key][1], d))
    return result


@pytest.fixture(scope="session")
def vendors(vendors_dir, tmp_path_factory) -> list[Converted]:
    return convert_and_classify(vendors_dir, tmp_path_factory.mktemp("cls-vendors"))


@pytest.fixture(scope="session")
def corpus(corpus_dir, tmp_path_factory) -> list[Converted]:
    return convert_and_classify(corpus_dir, tmp_path_factory.mktemp("cls-corpus"))


@pytest.fixture(scope="session")
def sample(sample_dir, tmp_path_factory) -> list[Converted]:
    return convert_and_classify(sample_dir, tmp_path_factory.mktemp("cls-sample"))


def _of(converted: list[Converted], folder: str, series_number: int | None) -> list[Decision]:
    found = [c.decision for c in converted if c.folder.startswith(folder) and c.series_number == series_number]
    assert found, f"dcm2niix wrote nothing for {folder} series {series_number}"
    return found


def _check(decisions: list[Decision], expected) -> None:
    if isinstance(expected, str):  # left out, with this in its reason
        for d in decisions:
            assert d.relpath("01", None) is None, f"{d.output.stem.name} named {d.relpath('01', None)}: {d.reason}"
            assert expected in d.reason, d.reason
        return
    got = sorted(d.suffix or f"<left out: {d.reason}>" for d in decisions)
    assert got == sorted(expected), [(d.output.stem.name, d.suffix, d.reason) for d in decisions]


# The README table of ../shared/data/dicom-vendors: id, folder, SeriesNumber, the suffix(es) a person gives it.
VENDOR_SERIES = [
    ("T1", "dcm_qa_toshiba/In/Galan/10006_DTI_ALL_20d", 10006, ["dwi"]),
    ("P1", "dcm_qa_philips_enh/In/cl", 1301, ["T1w"]),
    ("P2", "dcm_qa_philips_enh/In/cl", 2001, ["magnitude1", "magnitude2", "phase1", "phase2"]),
    ("P3", "dcm_qa_philips_enh/In/enh", 2001, ["magnitude1", "magnitude2", "phase1", "phase2"]),
    ("P4", "dcm_qa_philips_enh/In/cl", 1901, ["asl"]),
    ("P5", "dcm_qa_philips_enh/In/enh", 1901, ["asl"]),
    ("P6", "dcm_qa_philips_enh/In/cl", 1903, ["asl"]),
    ("P7", "dcm_qa_philips_enh/In/enh", 1903, ["asl"]),
    ("P8", "dcm_qa_philips_enh/In/cl", 2301, ["dwi"]),
    ("A1", "dcm_qa_philips_asl/In/Classic/201_pCASL", 201, ["asl"]),
    ("A3", "dcm_qa_philips_asl/In/Classic/301_ASL_MultiPhase", 301, ["asl"]),
    ("A4", "dcm_qa_philips_asl/In/Classic/401_3D_pCASL_6mm", 401, ["asl"]),
    ("A5", "dcm_qa_philips_asl/In/Classic/402_SOURCE_-_3D_pCASL_6mm", 402, ["asl"]),
    ("M1", "dcm_qa_mosaic/In/ep2d_Int_4", 4, ["bold"]),
    ("M2", "dcm_qa_mosaic/In/cmrr_Int_HF_9", 9, ["bold"]),
    ("S1", "dcm_qa_stc/In/Siemens/XA10/6_REST1_w_SMS_PF7-8", 6, ["bold"]),
    ("S2", "dcm_qa_stc/In/Siemens/B12/2_FMRI_AX_ASC", 2, ["bold"]),
    ("S3", "dcm_qa_stc/In/Siemens/B13/4_fMRIcontin", 4, ["bold"]),
    ("S5", "dcm_qa_stc/In/Siemens/E11/7_Rest_fMRI_AP", 7, ["bold"]),
    ("S6", "dcm_qa_stc/In/Siemens/E11_2D/8_diff_mbep2d_1.5mm_AP_MB4_64DIR_B0", 8, ["dwi"]),
    ("S7", "dcm_qa_stc/In/GE/RTIAold/15_Zugfahrt", 15, ["bold"]),
    ("S8", "dcm_qa_stc/In/GE/RTIA/2_epiRT_ascending", 2, ["bold"]),
    ("X1", "dcm_qa_xa60/In/XA60", 2, ["bold"]),
    ("X2", "dcm_qa_xa60/In/XA60", 12, ["bold"]),
    ("X3", "dcm_qa_xa60/In/XA60", 16, ["dwi"]),
    ("X4", "dcm_qa_xa60/In/XA60", 20, ["dwi"]),
    ("X5", "dcm_qa_xa60/In/XA61", 6, ["bold"]),
    ("X6", "dcm_qa_xa60/In/XA61", 18, ["dwi"]),
    ("X7", "dcm_qa_xa60/In/XA61", 14, "derived image"),
]

# ../shared/data/dicom has no per-series table: these are the names a person reading the headers gives
# (its README and each source's README say what each series is).
CORPUS_SERIES = [
    ("pacsman", "PACSMAN_data", None, "contrast cannot be read"),  # synthetic: no TE, TR or sequence at all
    ("ct-localizer", "dcm_qa_ct", 100, "no BIDS datatype for modality CT"),
    ("ct-summary", "dcm_qa_ct", 401, "no BIDS datatype for modality CT"),
    ("ge-b0map", "dcm_qa_fmap/In/GE", 6, ["fieldmap", "magnitude"]),
    ("siemens-fmap-mag", "dcm_qa_fmap/In/Siemens", 2, ["magnitude1", "magnitude2"]),
    ("siemens-fmap-phase", "dcm_qa_fmap/In/Siemens", 3, ["phasediff"]),
    ("philips-b0", "dcm_qa_fmap/In/Philips", 801, ["fieldmap", "magnitude"]),
    ("ge-dwi", "dcm_qa_ge", 1, ["dwi"]),
    ("ge-epi", "dcm_qa_nih/In/20180918GE", 4, ["bold"]),
    ("nih-AP", "dcm_qa_nih/In/20180918Si", 3, ["epi"]),
    ("nih-PA", "dcm_qa_nih/In/20180918Si", 4, ["epi"]),
    ("nih-RL", "dcm_qa_nih/In/20180918Si", 5, ["epi"]),
    ("nih-LR", "dcm_qa_nih/In/20180918Si", 6, ["epi"]),
    ("philips-epi", "dcm_qa_philips", 201, ["bold"]),
    ("philips-dwi", "dcm_qa_philips_dwi", 701, ["dwi"]),
    ("ts", "dcm_qa_ts", 1, ["bold"] * 9),  # one mosaic volume stored in 9 transfer syntaxes, one series UID
    ("xa30-scout-sag", "dcm_qa_xa30i", 2001, "derived image"),
    ("xa30-scout-cor", "dcm_qa_xa30i", 3001, "derived image"),
    ("xa30-scout-tra", "dcm_qa_xa30i", 4001, "derived image"),
    ("xa30-t1", "dcm_qa_xa30i", 5001, ["T1w"]),
    *[(f"xa30-bold-{n}", "dcm_qa_xa30i", n, ["bold"]) for n in range(7001, 7021)],
    ("xa30-fmap-e1", "dcm_qa_xa30i", 9001, ["magnitude1"]),
    ("xa30-fmap-e2", "dcm_qa_xa30i", 9002, ["magnitude2"]),
    ("xa30-fmap-phase", "dcm_qa_xa30i", 10001, ["phasediff"]),
    ("xa30-dwi", "dcm_qa_xa30i", 11001, ["dwi"]),
    ("deid-us", "deid-data", 1, "no BIDS datatype for modality US"),
    ("deid-ct", "deid-data", 2, "no BIDS datatype for modality CT"),
]

SAMPLE_SERIES = [
    ("pacsman", "PACSMAN_data", None, "contrast cannot be read"),
    ("ge-b0map", "dcm_qa_fmap/In/GE", 6, ["fieldmap", "magnitude"]),
    ("ge-dwi", "dcm_qa_ge", 1, ["dwi"]),
    ("nih-AP", "dcm_qa_nih", 3, ["epi"]),
    ("nih-PA", "dcm_qa_nih", 4, ["epi"]),
    ("nih-RL", "dcm_qa_nih", 5, ["epi"]),
    ("nih-LR", "dcm_qa_nih", 6, ["epi"]),
    ("philips-epi", "dcm_qa_philips", 201, ["bold"]),
]


@pytest.mark.corpus
@pytest.mark.parametrize("sid,folder,number,expected", VENDOR_SERIES, ids=[c[0] for c in VENDOR_SERIES])
def test_vendor_series(vendors, sid, folder, number, expected):
    _check(_of(vendors, folder, number), expected)


@pytest.mark.corpus
@pytest.mark.parametrize("sid,folder,number,expected", CORPUS_SERIES, ids=[c[0] for c in CORPUS_SERIES])
def test_corpus_series(corpus, sid, folder, number, expected):
    _check(_of(corpus, folder, number), expected)


@pytest.mark.parametrize("sid,folder,number,expected", SAMPLE_SERIES, ids=[c[0] for c in SAMPLE_SERIES])
def test_sample_series(sample, sid, folder, number, expected):
    _check(_of(sample, folder, number), expected)


@pytest.mark.parametrize("name", ["sample", pytest.param("vendors", marks=pytest.mark.corpus),
                                  pytest.param("corpus", marks=pytest.mark.corpus)])
def test_every_output_is_in_a_table_and_nothing_is_named_twice(request, name):
    converted: list[Converted] = request.getfixturevalue(name)
    table = {"sample": SAMPLE_SERIES, "vendors": VENDOR_SERIES, "corpus": CORPUS_SERIES}[name]
    for c in converted:
        assert any(c.folder.startswith(f) and c.series_number == n for _, f, n, _ in table), \
            f"{c.folder} series {c.series_number} ({c.decision.output.stem.name}) is in no expected table"
        d = c.decision
        assert d.reason
        assert list(d.entities) == [k for k in ENTITY_ORDER if k in d.entities]
    names = Counter((c.session, c.decision.relpath("01", "01")) for c in converted if c.decision.datatype)
    assert [n for n, k in names.items() if k > 1] == []


@pytest.mark.corpus
def test_epi_directions_from_the_affine(corpus):
    """dir- comes from PhaseEncodingDirection through the affine (the series names say the truth here)."""
    for number, label in ((3, "AP"), (4, "PA"), (5, "RL"), (6, "LR")):
        (d,) = _of(corpus, "dcm_qa_nih/In/20180918Si", number)
        assert d.entities["dir"] == label, d.reason
        assert d.relpath("01", None) == f"sub-01/fmap/sub-01_dir-{label}_epi"


@pytest.mark.corpus
def test_xa30_runs_and_fieldmap_set(corpus):
    bolds = [_of(corpus, "dcm_qa_xa30i", n)[0] for n in range(7001, 7021)]
    assert [d.entities["run"] for d in bolds] == [str(n) for n in range(1, 21)]  # acquisition order
    assert all(d.entities["task"] == "unknown" for d in bolds)
    (phase,) = _of(corpus, "dcm_qa_xa30i", 10001)
    assert phase.relpath("01", "01") == "sub-01/ses-01/fmap/sub-01_ses-01_phasediff"
    assert {"EchoTime1", "EchoTime2"} <= set(phase.output.sidecar)
    assert phase.missing == ()  # dcm2niix wrote EchoTime1/EchoTime2 for the Siemens phase difference


@pytest.mark.corpus
def test_asl_context_and_missing_fields(vendors):
    (delta,) = _of(vendors, "dcm_qa_philips_asl/In/Classic/301_ASL_MultiPhase", 301)
    assert delta.extra_files == {"aslcontext.tsv": "volume_type\n" + "deltam\n" * 8}
    assert "ArterialSpinLabelingType" in delta.missing and "aslcontext.tsv" not in delta.missing
    (source,) = _of(vendors, "dcm_qa_philips_enh/In/cl", 1903)
    assert source.extra_files == {} and "aslcontext.tsv" in source.missing  # label/control order unknown


def _reclassify(converted: list[Converted], edit, what=lambda d: d.relpath("01", None) or d.reason) -> list[str]:
    """Classify the same session batches again with every sidecar passed through ``edit``."""
    batches: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(converted):
        batches[c.session].append(i)
    names = [""] * len(converted)
    for idx in batches.values():
        outs = [dataclasses.replace(converted[i].decision.output, sidecar=edit(converted[i].decision.output.sidecar))
                for i in idx]
        for i, d in zip(idx, classify_session(outs)):
            names[i] = what(d)
    return names


@pytest.mark.corpus
def test_names_and_descriptions_are_never_read(vendors, corpus):
    """Every sidecar renamed (SeriesDescription, ProtocolName): the same decisions."""
    for converted in (vendors, corpus):
        same = _reclassify(converted, lambda s: s)
        assert same == [c.decision.relpath("01", None) or c.decision.reason for c in converted]
        renamed = _reclassify(converted, lambda s: {**s, "SeriesDescription": "T1w_mprage", "ProtocolName": "dwi_AP"})
        assert renamed == same


@pytest.mark.corpus
def test_bidsguess_is_not_needed_except_for_philips_source_asl(vendors, corpus):
    """dcm2niix's BidsGuess is the only sidecar trace of Philips' private ASL label type; nothing else needs it."""
    for converted in (vendors, corpus):
        before = _reclassify(converted, lambda s: s, what=lambda d: d.suffix)
        after = _reclassify(converted, lambda s: {k: v for k, v in s.items() if k != "BidsGuess"},
                            what=lambda d: d.suffix)
        changed = {(c.folder, c.series_number) for c, b, a in zip(converted, before, after) if b != a}
        assert changed <= {("dcm_qa_philips_enh/In/cl", 1903), ("dcm_qa_philips_asl/In/Classic/402_SOURCE_-_3D_pCASL_6mm", 402)}, changed
