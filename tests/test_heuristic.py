"""The ``auto`` heuristic classifies real headers by acquisition metadata, never by names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from heudiconv.utils import SeqInfo

from _bidscheck import copy_decompressed
from pacs2bids.heuristic_path import heuristic_file


def _load():
    spec = importlib.util.spec_from_file_location("auto_heuristic", heuristic_file("auto"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


auto = _load()


def plan_folder(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """{SeriesDescription: output name} and {SeriesDescription: reason left out} for a folder."""
    files = [str(p) for p in sorted(folder.rglob("*")) if p.is_file()]
    named, left = {}, {}
    for seqinfos in auto.grouping(files, None, SeqInfo).values():
        seqs = list(seqinfos)
        ok, out = auto.plan([auto.features_of(s) for s in seqs])
        for i, template, _ in ok:
            named.setdefault(seqs[i].series_description, []).append(template.rsplit("/", 1)[-1]
                                                                   .replace("{bids_subject_session_prefix}_", ""))
        for i, reason in out:
            left[seqs[i].series_description] = reason
    return {k: sorted(v) if len(v) > 1 else v[0] for k, v in named.items()}, left


def test_sample_headers(sample_dir):
    named, left = plan_folder(sample_dir)
    # no EchoTime, RepetitionTime or sequence: its contrast cannot be read, so it is left out, not guessed
    assert "pacsman_testing_dicom" not in named
    assert "contrast unknown" in left["pacsman_testing_dicom"]
    assert named["B0map"] == "fieldmap"  # GE B0 map in Hz
    assert named["Ax DWI TENSOR R2"] == "dwi"
    assert named["EPI_asc"] == "task-unknown_bold"  # Philips EPI (FEEPI)
    for pe in ("AP", "PA", "RL", "LR"):
        assert named[f"EPI PE={pe}"] == f"dir-{pe}_epi"  # direction from CSA polarity, not the name
    assert set(left) == {"pacsman_testing_dicom"}


def test_names_are_not_used(sample_dir, tmp_path):
    """Renaming every series description and protocol changes nothing."""
    import pydicom

    src = sample_dir / "dcm_qa_nih"
    for p in src.rglob("*"):
        if p.is_file() and p.read_bytes()[128:132] == b"DICM":
            ds = pydicom.dcmread(p)
            ds.SeriesDescription = "T1w_mprage"
            ds.ProtocolName = "dwi"
            out = tmp_path / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out)
    named, _ = plan_folder(tmp_path)
    assert sorted(named["T1w_mprage"]) == ["dir-AP_epi", "dir-LR_epi", "dir-PA_epi", "dir-RL_epi"]


@pytest.mark.corpus
def test_corpus_headers(corpus_dir, tmp_path):
    xa = copy_decompressed(corpus_dir / "dcm_qa_xa30i", tmp_path / "xa")
    named, left = plan_folder(xa)
    assert named["anat-T1w_acq-tfl"] == "T1w"
    assert named["func-bold_task-fa_run-1"] == "task-unknown_bold"  # 20 per-volume series merged
    assert named["DWI_dir80_AP"] == "dwi"
    assert named["gre_field_mapping"] == ["magnitude1", "magnitude2", "phasediff"]
    for scout in ("AAHead_Scout_MPR_sag", "AAHead_Scout_MPR_cor", "AAHead_Scout_MPR_tra"):
        assert "derived" in left[scout]
    assert "PhoenixZIPReport" not in named

    named, left = plan_folder(corpus_dir / "dcm_qa_fmap" / "In" / "Siemens")
    assert named["gre_field_magph"] == ["magnitude", "phasediff"]  # two echoes in one series
    named, _ = plan_folder(corpus_dir / "dcm_qa_fmap" / "In" / "Philips")
    assert named["B0 NS"] == "fieldmap"
    named, _ = plan_folder(corpus_dir / "dcm_qa_nih" / "In" / "20180918GE")
    assert named["Axial EPI-FMRI (Interleaved I to S)"] == "task-unknown_bold"
    ph = copy_decompressed(corpus_dir / "dcm_qa_philips_dwi", tmp_path / "phdwi")
    named, _ = plan_folder(ph)
    assert named["DTI_Biobank_2mm_MB3S2_EPI"] == "dwi"  # PR and private objects dropped
    named, left = plan_folder(corpus_dir / "dcm_qa_ct")
    assert not named  # CT localizer and secondary captures are not MR


def _features(**kw):
    base = dict(sop_class="1.2.840.10008.5.1.4.1.1.4", modality="MR", manufacturer="X", image_type=("ORIGINAL", "PRIMARY", "M"),
                frame_types=(), scanning_sequence=("SE",), sequence_variant=("SK",), mr_acquisition_type="2D",
                te=100.0, tr=5000.0, ti=None, echo_numbers=(1,), echo_times=(100.0,), n_files=30, n_slices=30,
                n_volumes=1, n_orientations=1, mosaic=False, pixel_spacing=(0.5, 0.5), slice_step=4.0, max_b=None,
                pe_vector=None, pe_positive=None, ge_sequence="", philips_technique="", philips_types=(),
                temporal_positions=0, acquisition_number=1, rows=256, columns=256, orientation=(1, 0, 0, 0, 1, 0))
    base.update(kw)
    return base


@pytest.mark.parametrize("kw,kind", [
    ({}, "anat/T2w"),  # long TR/TE spin echo
    ({"scanning_sequence": ("SE", "IR"), "ti": 2500.0, "tr": 9000.0, "te": 90.0}, "anat/FLAIR"),
    ({"scanning_sequence": ("GR", "IR"), "ti": 900.0, "tr": 2300.0, "te": 3.0, "mr_acquisition_type": "3D"}, "anat/T1w"),
    ({"scanning_sequence": ("GR",), "sequence_variant": ("SP", "SS"), "tr": 8.0, "te": 3.0,
      "mr_acquisition_type": "3D"}, "anat/T1w"),
    ({"tr": 500.0, "te": 15.0}, "anat/T1w"),
    ({"image_type": ("DERIVED", "PRIMARY", "ADC")}, None),
    ({"n_orientations": 3}, None),
    ({"tr": 1500.0, "te": 45.0}, None),  # intermediate spin echo: not guessed
    ({"scanning_sequence": ("EP", "SE"), "max_b": 1000.0, "n_volumes": 7}, "dwi/dwi"),
    ({"scanning_sequence": ("EP", "GR"), "n_volumes": 200, "te": 30.0, "tr": 2000.0}, "func/bold"),
    ({"scanning_sequence": ("EP", "SE"), "n_volumes": 40}, None),
    ({"modality": "CT", "sop_class": "1.2.840.10008.5.1.4.1.1.2"}, None),
])
def test_classify_rules(kw, kind):
    got, reason = auto.classify(_features(**kw))
    assert got == kind, reason
    assert reason


def test_runs_are_numbered():
    f = _features(scanning_sequence=("EP", "GR"), n_volumes=100, te=30.0, tr=2000.0)
    named, left = auto.plan([f, _features(), f])
    names = [t.rsplit("/", 1)[-1] for _, t, _ in named]
    assert names == ["{bids_subject_session_prefix}_task-unknown_run-1_bold", "{bids_subject_session_prefix}_T2w",
                     "{bids_subject_session_prefix}_task-unknown_run-2_bold"]
    assert not left


def test_unpaired_phase_is_left_out():
    ph = _features(scanning_sequence=("GR",), image_type=("ORIGINAL", "PRIMARY", "P"), te=7.0, tr=500.0,
                   echo_times=(7.0,))
    named, left = auto.plan([ph])
    assert not named and "magnitude" in left[0][1]
