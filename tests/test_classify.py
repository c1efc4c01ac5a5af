"""classify.py: names from dcm2niix sidecars.

Real data first: every series of ../shared/data/dicom-vendors, ../shared/data/dicom and the bundled
sample is converted once per test session by dcm2niix (the pinned PyPI wheel), one folder per series as
convert does, and each session's outputs are classified together. Each series is a parameter, so a failure
names it. Then the pure rules, on small hand-built sidecars (edge cases the corpora do not hold).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pacs2bids.convert.classify import (
    ASL_REQUIRED, ENTITY_ORDER, Dcm2niixOutput, Decision, classify_session, phase_encoding_label, read_output,
)
from pacs2bids.convert.corpus import classify_corpus


# --------------------------------------------------------------------------- converting a corpus once

@dataclasses.dataclass(frozen=True)
class Converted:
    session: str              # StudyInstanceUID (+ "enh" for the Philips enhanced export): one BIDS session
    folder: str               # folder of the series' first file, relative to the corpus root
    series_number: int | None
    decision: Decision


def convert_and_classify(root: Path, work: Path, images: bool = True) -> list[Converted]:
    """Group files by session (StudyInstanceUID; the Philips enhanced export apart) and SeriesInstanceUID,
    run dcm2niix once per series folder, classify each session's outputs together."""
    run = classify_corpus(root, work, images=images)
    return [Converted(o.session, o.folder, o.series_number, o.decision) for o in run.outputs]


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
    ("pacsman", "PACSMAN_data", None, "contrast unknown"),  # synthetic: no TE, TR or sequence at all
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
    ("pacsman", "PACSMAN_data", None, "contrast unknown"),
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
    assert all(d.entities["task"] == "unknown" and d.missing == () for d in bolds)
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
        assert changed <= {("dcm_qa_philips_enh/In/cl", 1903),
                           ("dcm_qa_philips_asl/In/Classic/402_SOURCE_-_3D_pCASL_6mm", 402)}, changed


# --------------------------------------------------------------------------- pure rules on hand-built sidecars

_n = iter(range(10 ** 6))


def mk(tmp_path: Path, *, shape=(64, 64, 30), series_number=1, series_uid=None, bvals=None, affine=None,
       **sidecar) -> Dcm2niixOutput:
    """A Dcm2niixOutput with a hand-built sidecar; a real NIfTI is written only when an affine is given."""
    stem = tmp_path / f"o{next(_n)}"
    if affine is not None:
        nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), np.asarray(affine, dtype=float)),
                 f"{stem}.nii")
    side = {"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], **sidecar}
    return Dcm2niixOutput(stem=stem, sidecar=side, shape=tuple(shape), series_uid=series_uid or f"2.25.{series_number}",
                          series_number=series_number, bvals=tuple(bvals) if bvals is not None else None)


def names(decisions: list[Decision]) -> list[str | None]:
    return [d.relpath("01", None) for d in decisions]


MAG = ["ORIGINAL", "PRIMARY", "M", "ND", "MAGNITUDE"]
PHASE = ["ORIGINAL", "PRIMARY", "P", "ND", "PHASE"]
GRE = dict(ScanningSequence="GR", SequenceVariant="SP", SequenceName="*fl3d", MRAcquisitionType="3D",
           RepetitionTime=0.05, FlipAngle=15)
EPI = dict(ScanningSequence="EP", SequenceVariant="SK", SequenceName="epfid2d1_64", MRAcquisitionType="2D",
           EchoTime=0.03, RepetitionTime=2.0, FlipAngle=80, PhaseEncodingDirection="j-")


def test_missing_echo_time_is_left_out_naming_the_field(tmp_path):
    (d,) = classify_session([mk(tmp_path, **{**GRE, "RepetitionTime": 0.02})])
    assert d.datatype is None
    assert "without EchoTime" in d.reason and "project heuristic" in d.reason


def test_unrecognised_contrast_reason_names_what_was_seen(tmp_path):
    (d,) = classify_session([mk(tmp_path, ScanningSequence="GR", SequenceVariant="SS", MRAcquisitionType="3D",
                                RepetitionTime=0.02, EchoTime=0.0046, FlipAngle=10, ImageType=MAG)])
    assert d.datatype is None
    assert d.reason.startswith("GR 3D TR=20 TE=4.6 TI=- flip=10")
    assert d.reason.endswith("not a recognised contrast; name it in a project heuristic")


def test_phase_image_alone_is_left_out(tmp_path):
    (d,) = classify_session([mk(tmp_path, **GRE, EchoTime=0.02, ImageType=PHASE)])
    assert d.datatype is None and "phase image alone" in d.reason


def test_multi_echo_gre_is_megre_with_echo_and_part(tmp_path):
    outs = [mk(tmp_path, **GRE, EchoTime=te, EchoNumber=n, ImageType=it)
            for n, te in enumerate((0.005, 0.012, 0.02), start=1) for it in (MAG, PHASE)]
    assert names(classify_session(outs)) == [
        f"sub-01/anat/sub-01_echo-{n}_part-{p}_MEGRE" for n in (1, 2, 3) for p in ("mag", "phase")]


def test_single_echo_gre_with_phase_is_t2starw_with_part(tmp_path):
    outs = [mk(tmp_path, **GRE, EchoTime=0.02, ImageType=MAG), mk(tmp_path, **GRE, EchoTime=0.02, ImageType=PHASE)]
    assert names(classify_session(outs)) == ["sub-01/anat/sub-01_part-mag_T2starw",
                                             "sub-01/anat/sub-01_part-phase_T2starw"]


def test_fieldmap_one_phase_is_phasediff_two_phases_are_phase1_phase2(tmp_path):
    fm = dict(GRE, MRAcquisitionType="2D", RepetitionTime=0.5, FlipAngle=60, SequenceName="*fm2d2r")
    one = [mk(tmp_path, series_number=2, **fm, EchoTime=0.00492, EchoNumber=1, ImageType=MAG),
           mk(tmp_path, series_number=2, **fm, EchoTime=0.00738, EchoNumber=2, ImageType=MAG),
           mk(tmp_path, series_number=3, **fm, EchoTime=0.00738, EchoNumber=2, ImageType=PHASE)]
    assert [d.suffix for d in classify_session(one)] == ["magnitude1", "magnitude2", "phasediff"]
    assert classify_session(one)[2].missing == ("EchoTime1", "EchoTime2")  # BIDS requires them; convert adds
    two = one[:2] + [mk(tmp_path, series_number=3, **fm, EchoTime=0.00492, EchoNumber=1, ImageType=PHASE),
                     mk(tmp_path, series_number=3, **fm, EchoTime=0.00738, EchoNumber=2, ImageType=PHASE)]
    assert [d.suffix for d in classify_session(two)] == ["magnitude1", "magnitude2", "phase1", "phase2"]
    assert "phase image" in classify_session(one[:2])[0].reason  # magnitudes without their phase: incomplete


def test_multi_echo_bold_and_its_sbref(tmp_path):
    outs = [mk(tmp_path, series_number=5, shape=(64, 64, 30), **{**EPI, "EchoTime": te}, EchoNumber=n)
            for n, te in ((1, 0.015), (2, 0.035), (3, 0.055))]
    outs += [mk(tmp_path, series_number=6, shape=(64, 64, 30, 200), **{**EPI, "EchoTime": te}, EchoNumber=n)
             for n, te in ((1, 0.015), (2, 0.035), (3, 0.055))]
    assert names(classify_session(outs)) == [f"sub-01/func/sub-01_task-unknown_echo-{n}_sbref" for n in (1, 2, 3)] + \
        [f"sub-01/func/sub-01_task-unknown_echo-{n}_bold" for n in (1, 2, 3)]


def test_single_volume_after_the_run_is_not_its_sbref(tmp_path):
    outs = [mk(tmp_path, series_number=6, shape=(64, 64, 30, 200), **EPI),
            mk(tmp_path, series_number=7, shape=(64, 64, 30), **EPI)]
    assert names(classify_session(outs)) == ["sub-01/func/sub-01_task-unknown_run-1_bold",
                                             "sub-01/func/sub-01_task-unknown_run-2_bold"]


def test_dwi_sbref(tmp_path):
    dwi = dict(EPI, SequenceName="ep_b0", EchoTime=0.08)
    outs = [mk(tmp_path, series_number=10, shape=(96, 96, 60), bvals=[0], **dwi),
            mk(tmp_path, series_number=11, shape=(96, 96, 60, 31), bvals=[0] + [1000] * 30, **dwi)]
    assert names(classify_session(outs)) == ["sub-01/dwi/sub-01_sbref", "sub-01/dwi/sub-01_dwi"]


@pytest.mark.parametrize("sidecar,suffix", [
    (dict(ScanningSequence="SE\\IR", SequenceVariant="SK\\SP", InversionTime=2.5, EchoTime=0.09,
          RepetitionTime=9.0), "FLAIR"),
    (dict(ScanningSequence="SE", SequenceVariant="SK", EchoTime=0.1, RepetitionTime=4.0), "T2w"),
    (dict(ScanningSequence="SE", SequenceVariant="SK", EchoTime=0.02, RepetitionTime=3.0), "PDw"),
    (dict(ScanningSequence="SE", SequenceVariant="SK", EchoTime=0.012, RepetitionTime=0.5), "T1w"),
    (dict(ScanningSequence="GR\\IR", SequenceVariant="SK\\SP\\MP", InversionTime=0.9, EchoTime=0.003,
          RepetitionTime=2.3, MRAcquisitionType="3D"), "T1w"),
    (dict(ScanningSequence="GR", SequenceVariant="SP", EchoTime=0.0035, RepetitionTime=0.025, FlipAngle=20,
          MRAcquisitionType="3D", MTState=True), "angio"),
    (dict(ScanningSequence="GR", SequenceVariant="SP", EchoTime=0.0035, RepetitionTime=0.025, FlipAngle=20,
          MRAcquisitionType="3D", ScanOptions="TOF"), "angio"),
    (dict(ScanningSequence="GR", SequenceVariant="SP", EchoTime=0.003, RepetitionTime=0.008, FlipAngle=12,
          MRAcquisitionType="3D"), "T1w"),
    (dict(ScanningSequence="SE\\IR", SequenceVariant="SK", InversionTime=0.16, EchoTime=0.07,
          RepetitionTime=5.0), None),  # STIR: no BIDS suffix says it; left for a project heuristic
])
def test_anatomical_contrasts(tmp_path, sidecar, suffix):
    (d,) = classify_session([mk(tmp_path, ImageType=MAG, **sidecar)])
    assert d.suffix == suffix, d.reason
    assert d.datatype == ("anat" if suffix else None)


@pytest.mark.parametrize("image_type,word", [
    (["DERIVED", "PRIMARY", "DIFFUSION", "ADC"], "ADC"),
    (["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"], "TRACEW"),
    (["DERIVED", "PRIMARY", "MIP_SAG"], "DERIVED"),
    (["DERIVED", "SECONDARY", "MPR"], "MPR"),
    (["ORIGINAL", "PRIMARY", "LOCALIZER"], "localizer"),
    (["ORIGINAL", "PRIMARY", "M", "ND", "MOCO"], "MOCO"),
    (["DERIVED", "SECONDARY", "SCREEN SAVE"], "secondary capture"),
])
def test_derived_and_localizers_are_left_out(tmp_path, image_type, word):
    (d,) = classify_session([mk(tmp_path, shape=(64, 64, 30, 3), bvals=[0, 1000, 1000], **EPI, ImageType=image_type)])
    assert d.datatype is None and word in d.reason


def test_other_modalities_stay_in_sourcedata(tmp_path):
    (d,) = classify_session([mk(tmp_path, Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])])
    assert d.relpath("01", "01") is None
    assert d.reason == "no BIDS datatype for modality CT: kept as pseudonymised DICOM in sourcedata/"


def test_pet_lists_what_bids_needs_and_the_sidecar_lacks(tmp_path):
    (d,) = classify_session([mk(tmp_path, Modality="PT", shape=(128, 128, 90, 20), Manufacturer="Siemens",
                                TracerName="FDG", ImageType=["ORIGINAL", "PRIMARY"])])
    assert d.relpath("01", "01") == "sub-01/ses-01/pet/sub-01_ses-01_pet"
    assert "InjectedRadioactivity" in d.missing and "TracerName" not in d.missing and "Manufacturer" not in d.missing


def test_epi_reference_direction_and_polarity(tmp_path):
    se = dict(EPI, ScanningSequence="SE\\EP", SequenceName="epse2d1_90")
    las = np.diag([-2.0, 2.0, 2.0, 1.0])  # dcm2niix's usual axial storage: i towards left, j towards anterior
    outs = [mk(tmp_path, series_number=3, shape=(90, 90, 60, 3), affine=las, **{**se, "PhaseEncodingDirection": "j-"}),
            mk(tmp_path, series_number=4, shape=(90, 90, 60, 3), affine=las, **{**se, "PhaseEncodingDirection": "j"}),
            mk(tmp_path, series_number=5, shape=(90, 90, 60, 3), affine=las,
               **{k: v for k, v in se.items() if k != "PhaseEncodingDirection"}, PhaseEncodingAxis="j")]
    d = classify_session(outs)
    assert names(d)[:2] == ["sub-01/fmap/sub-01_dir-AP_epi", "sub-01/fmap/sub-01_dir-PA_epi"]
    assert d[0].missing == ("TotalReadoutTime",)
    assert d[2].datatype is None and "PhaseEncodingAxis (no polarity)" in d[2].reason


def test_phase_encoding_label_follows_the_affine():
    sag = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)  # i->A, j->S, k->R
    assert phase_encoding_label("i", sag) == "PA"
    assert phase_encoding_label("i-", sag) == "AP"
    assert phase_encoding_label("j", sag) == "IS"
    assert phase_encoding_label("k-", sag) == "RL"
    assert phase_encoding_label("i", np.diag([-1.0, 1, 1, 1])) == "RL"
    assert phase_encoding_label("j", None) is None and phase_encoding_label(None, sag) is None


def test_runs_follow_acquisition_order_not_list_order(tmp_path):
    t1 = dict(ScanningSequence="GR\\IR", SequenceVariant="MP", InversionTime=0.9, EchoTime=0.003, RepetitionTime=2.3)
    outs = [mk(tmp_path, series_number=7, **t1), mk(tmp_path, series_number=3, **t1)]
    assert names(classify_session(outs)) == ["sub-01/anat/sub-01_run-2_T1w", "sub-01/anat/sub-01_run-1_T1w"]


def test_relpath_prefixes_and_no_session(tmp_path):
    (d,) = classify_session([mk(tmp_path, **EPI, shape=(64, 64, 30, 100))])
    assert d.relpath("sub-07", "ses-2") == d.relpath("07", "2") == "sub-07/ses-2/func/sub-07_ses-2_task-unknown_bold"
    assert d.relpath("07", None) == "sub-07/func/sub-07_task-unknown_bold"


def test_asl_deltam_source_and_m0scan(tmp_path):
    perf = dict(ScanningSequence="GR", SequenceVariant="SK", SequenceName="GraSE", MRAcquisitionType="3D",
                EchoTime=0.009, RepetitionTime=4.25, FlipAngle=90)
    outs = [mk(tmp_path, series_number=1, shape=(96, 96, 40), **perf,
               ImageType=["ORIGINAL", "PRIMARY", "PERFUSION", "FFE"]),
            mk(tmp_path, series_number=2, shape=(96, 96, 40, 6), **perf,
               ImageType=["ORIGINAL", "PRIMARY", "PERFUSION", "NONE", "MAGNITUDE"]),
            mk(tmp_path, series_number=3, shape=(96, 96, 40), **perf, ImageType=["ORIGINAL", "PRIMARY", "M0"],
               ArterialSpinLabelingType="PCASL"),
            mk(tmp_path, series_number=4, shape=(96, 96, 40), **{**perf, "RepetitionTime": 6.0}, ImageType=MAG)]
    d = classify_session(outs)
    assert [x.suffix for x in d] == ["asl", "asl", "m0scan", "m0scan"]
    assert d[0].extra_files == {"aslcontext.tsv": "volume_type\ndeltam\n"}
    assert d[0].aslcontext == ("deltam",) and d[1].aslcontext is None
    assert d[1].extra_files == {} and d[1].missing[0] == "aslcontext.tsv"
    assert set(ASL_REQUIRED) - {"FlipAngle", "EchoTime", "MRAcquisitionType"} <= set(d[0].missing)
    assert [x.entities.get("run") for x in d] == ["1", "2", "1", "2"]


def test_read_output(tmp_path):
    stem = tmp_path / "s5_e1"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), dtype=np.uint8), np.eye(4)), f"{stem}.nii.gz")
    Path(f"{stem}.json").write_text(json.dumps({"SeriesNumber": 5, "EchoTime": 0.08}))
    Path(f"{stem}.bval").write_text("0 1000 1000\n")
    o = read_output(stem, "2.25.9", None)
    assert (o.shape, o.series_number, o.bvals, o.volumes) == ((4, 5, 6, 3), 5, (0.0, 1000.0, 1000.0), 3)
    assert np.allclose(o.affine(), np.eye(4))
    with pytest.raises(FileNotFoundError, match="run dcm2niix with -b y"):
        read_output(tmp_path / "nothing", "2.25.9", None)


def test_bold_with_phase_images_uses_part(tmp_path):
    outs = [mk(tmp_path, series_number=6, shape=(64, 64, 30, 200), **EPI, ImageType=MAG),
            mk(tmp_path, series_number=6, shape=(64, 64, 30, 200), **EPI, ImageType=PHASE)]
    assert names(classify_session(outs)) == ["sub-01/func/sub-01_task-unknown_part-mag_bold",
                                             "sub-01/func/sub-01_task-unknown_part-phase_bold"]


def test_reversed_b0_reference_is_an_epi_fieldmap_but_a_lone_b0_stays_dwi(tmp_path):
    dwi = dict(EPI, SequenceName="ep_b0", EchoTime=0.08)
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    main = mk(tmp_path, series_number=11, shape=(96, 96, 60, 31), bvals=[0] + [1000] * 30, affine=las, **dwi)
    ref = mk(tmp_path, series_number=12, shape=(96, 96, 60, 2), bvals=[0, 0], affine=las,
             **{**dwi, "PhaseEncodingDirection": "j"})
    assert names(classify_session([main, ref])) == ["sub-01/dwi/sub-01_dwi", "sub-01/fmap/sub-01_dir-PA_epi"]
    assert names(classify_session([ref])) == ["sub-01/dwi/sub-01_dwi"]


def test_dsc_perfusion_is_not_asl_nor_bold(tmp_path):
    dsc = dict(EPI, EchoTime=0.032, RepetitionTime=1.5, ImageType=["ORIGINAL", "PRIMARY", "PERFUSION", "NONE"])
    (d,) = classify_session([mk(tmp_path, shape=(128, 128, 20, 60), **dsc)])
    assert d.datatype is None and "dynamic susceptibility contrast" in d.reason
    (d,) = classify_session([mk(tmp_path, shape=(128, 128, 20, 60), **{**EPI, "PulseSequenceDetails":
                                                                       "%SiemensSeq%\\ep2d_perf"})])
    assert d.datatype is None and "dynamic susceptibility contrast" in d.reason


def test_inversion_time_zero_is_no_inversion(tmp_path):
    outs = [mk(tmp_path, **GRE, EchoTime=0.02, InversionTime=0, ImageType=MAG),
            mk(tmp_path, **GRE, EchoTime=0.02, InversionTime=0, ImageType=PHASE)]
    assert [d.suffix for d in classify_session(outs)] == ["T2starw", "T2starw"]


@pytest.mark.parametrize("name", ["sample", pytest.param("vendors", marks=pytest.mark.corpus),
                                  pytest.param("corpus", marks=pytest.mark.corpus)])
def test_sidecars_without_images_never_give_another_name(request, name, tmp_path_factory):
    """dcm2niix -b o (a plan): the same suffix, or left out asking for the image; short EPI pairs stay bold."""
    root = request.getfixturevalue({"sample": "sample_dir", "vendors": "vendors_dir", "corpus": "corpus_dir"}[name])
    with_images = request.getfixturevalue(name)
    without = convert_and_classify(root, tmp_path_factory.mktemp(f"cls-{name}-bo"), images=False)
    full = {(c.folder, c.series_number, c.decision.output.stem.name): c.decision for c in with_images}
    mr = {k for k, d in full.items() if d.output.sidecar.get("Modality") == "MR"}
    assert mr <= {(c.folder, c.series_number, c.decision.output.stem.name) for c in without}
    for c in without:
        d, ref = c.decision, full.get((c.folder, c.series_number, c.decision.output.stem.name))
        if ref is None:  # dcm2niix splits some CT secondary captures differently without images
            assert d.output.sidecar.get("Modality") != "MR" and d.datatype is None
            continue
        assert d.output.shape == () and d.output.bvals is None
        if d.suffix == ref.suffix:
            assert d.entities.get("dir") == ref.entities.get("dir")
        elif ref.suffix == "epi" and d.suffix == "bold":
            assert "volume" in ref.reason  # pairing needs the volume count
        else:
            assert d.suffix is None and "dcm2niix -b y" in d.reason, (ref.suffix, d.reason)
            assert d.output.sidecar.get("Manufacturer") == "Toshiba"  # the only DWI with no diffusion fact at all


def test_epi_direction_without_an_image_comes_from_the_orientation(tmp_path):
    se = dict(EPI, ScanningSequence="SE\\EP", SequenceName="epse2d1_90",
              ImageOrientationPatientDICOM=[1, 0, 0, 0, 1, 0])  # axial: rows L->R... in LPS, columns A->P
    refs = [mk(tmp_path, series_number=3, shape=(90, 90, 60, 3), **{**se, "PhaseEncodingDirection": "j-"})]
    assert names(classify_session(refs)) == ["sub-01/fmap/sub-01_dir-AP_epi"]
    (d,) = classify_session([dataclasses.replace(refs[0], shape=())])
    assert d.datatype is None and "dcm2niix -b y" in d.reason  # volume count unknown: not guessed


def test_relpath_writes_entities_in_bids_order(tmp_path):
    d = Decision(output=mk(tmp_path), datatype="pet", suffix="pet", reason="x",
                 entities={"run": "2", "trc": "FDG", "rec": "acdyn", "acq": "lowdose", "task": "rest"})
    assert d.relpath("01", None) == "sub-01/pet/sub-01_task-rest_acq-lowdose_trc-FDG_rec-acdyn_run-2_pet"


def test_dce_with_a_perfusion_image_type_is_not_asl(tmp_path):
    dce = dict(GRE, RepetitionTime=0.004, EchoTime=0.0015, ImageType=["ORIGINAL", "PRIMARY", "PERFUSION", "NONE"])
    (d,) = classify_session([mk(tmp_path, shape=(256, 256, 40, 30), **dce)])
    assert d.datatype is None and "several volumes of a non-EPI sequence" in d.reason


@pytest.mark.parametrize("junk", [
    {"EchoTime": "n/a", "RepetitionTime": None, "FlipAngle": "90", "EchoNumber": [1, 2]},
    {"EchoTime": [0.01, 0.02], "RepetitionTime": float("nan"), "ImageType": "ORIGINAL\\PRIMARY\\P"},
    {"ScanningSequence": None, "PhaseEncodingDirection": "j?", "ImageType": None, "Modality": None},
    {"ScanningSequence": "EP", "PhaseEncodingDirection": "y-", "SeriesNumber": "x"},
])
def test_odd_sidecar_values_never_crash_and_say_why(tmp_path, junk):
    outs = [mk(tmp_path, shape=(64, 64, 30, 2), **{**GRE, **junk}), mk(tmp_path, shape=(), **junk)]
    for d in classify_session(outs):
        assert d.reason
        assert (d.datatype is None) == (d.relpath("01", None) is None)


def test_only_the_last_single_volume_before_a_run_is_its_sbref(tmp_path):
    """XA exports a run as one series per volume: those stay bold, only the volume just before the run is sbref."""
    outs = [mk(tmp_path, series_number=n, shape=(64, 64, 30), **EPI) for n in (5, 6, 7, 8)]
    outs.append(mk(tmp_path, series_number=9, shape=(64, 64, 30, 200), **EPI))
    got = [(d.output.series_number, d.suffix, d.entities.get("run")) for d in classify_session(outs)]
    assert got == [(5, "bold", "1"), (6, "bold", "2"), (7, "bold", "3"), (8, "sbref", None), (9, "bold", "4")]


@pytest.mark.corpus
def test_orientation_fallback_agrees_with_the_affine_on_real_data(vendors, corpus):
    """The direction read from ImageOrientationPatientDICOM (for -b o) equals the one read from the NIfTI affine."""
    from pacs2bids.convert.facts import _axes_from_orientation

    checked = 0
    for c in vendors + corpus:
        o = c.decision.output
        pe = o.sidecar.get("PhaseEncodingDirection")
        if pe and o.affine() is not None and _axes_from_orientation(o.sidecar) is not None:
            from_iop = phase_encoding_label(pe, _axes_from_orientation(o.sidecar))
            assert phase_encoding_label(pe, o.affine()) == from_iop, o.stem.name
            checked += 1
    assert checked >= 50
