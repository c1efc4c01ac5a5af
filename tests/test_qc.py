"""Protocol conformity QC (issue 15) on the bundled sample converted by convert_session: missing, extra,
duplicated series, parameters out of tolerance and its edges, image indices, the derivative's validity."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError

from pacs2bids.bids import finalise_dataset
from pacs2bids.config.qc import Expected, QcSettings
from pacs2bids.convert import convert_session
from pacs2bids.derivatives import qc_indices
from pacs2bids.derivatives.qc import QC_DIR, check_qc_dataset, check_value, run_qc
from pacs2bids.errors import ValidationFailed
from pacs2bids.validate import validate_dataset

SESSIONS = {"dcm_qa_fmap": "gefmap", "dcm_qa_nih": "nih", "dcm_qa_philips": "philips"}
GENERATED_BY = {"Name": "pacs2bids", "Version": "test"}
NIH_AP = "sub-01/ses-nih/fmap/sub-01_ses-nih_dir-AP_epi"


@pytest.fixture(scope="module")
def converted(sample_dir, tmp_path_factory) -> Path:
    """Three sessions of the sample, converted as the flow does, finalised (read only: tests copy it)."""
    root = tmp_path_factory.mktemp("bids")
    work = tmp_path_factory.mktemp("work")
    for folder, ses in SESSIONS.items():
        convert_session(sample_dir / folder, root, subject="01", session=ses, heuristic="auto", work_dir=work)
    finalise_dataset(root, name="qc sample", participants=["01"], generated_by=GENERATED_BY)
    return root


@pytest.fixture
def dataset(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "bids"))


def sidecar(root: Path, stem: str) -> dict:
    return json.loads((root / f"{stem}.json").read_text())


def settings(protocol: dict | None, snapshots: bool = False) -> QcSettings:
    return QcSettings.model_validate({"protocol": protocol, "snapshots": snapshots})


def by_label(result) -> dict:
    return {s.label: s for s in result.sessions}


# -- the tolerance rule ------------------------------------------------------------------------------------
def test_tolerance_edges():
    assert check_value(Expected(value=2.3, tolerance=0.01), 2.31) is None  # the edge is within
    assert check_value(Expected(value=2.3, tolerance=0.01), 2.2899) is not None
    assert check_value(Expected(value=2.3, tolerance=0.01), 2.3101) is not None
    assert check_value(Expected(value=0.05, relative=0.1), 0.055) is None
    assert check_value(Expected(value=0.05, relative=0.1), 0.0551) is not None
    assert check_value(Expected(value=2.0), 2) is None and check_value(Expected(value=2.0), 2.001) is not None
    assert "expected 2 value(s)" in check_value(Expected(value=[1, 1]), [1, 1, 1])
    assert check_value(Expected(value=[1, 1, 1], tolerance=0.05), [1.05, 0.95, 1]) is None
    assert check_value(Expected(value=[1, 1, 1], tolerance=0.05), [1.06, 1, 1]) is not None
    assert check_value(Expected(value="Siemens"), "Siemens") is None
    assert check_value(Expected(value="Siemens"), "SIEMENS") is not None
    assert check_value(Expected(regex="Siemens|GE"), "GE") is None
    assert check_value(Expected(regex="Siemens|GE"), "GE Medical") is not None  # the whole value
    assert check_value(Expected(value=3), None) == "absent"
    assert check_value(Expected(value=3), "three").startswith("not a number")


def test_protocol_spec_refuses_what_it_cannot_check():
    for bad in ({"series": [{"match": "T1w mprage"}]}, {"series": [{"match": "mprage_T1w"}]},
                {"series": [{"match": "T1w"}, {"match": "T1w", "count": 2}]},
                {"parameters": {"repetition_time": {"value": 2}}},
                {"parameters": {"Manufacturer": {"value": "GE", "tolerance": 1}}},
                {"parameters": {"EchoTime": {"value": 0.03, "regex": "0.03"}}},
                {"parameters": {"Manufacturer": {"regex": "(GE"}}}):
        with pytest.raises(ValidationError):
            settings(bad)
    ok = settings({"series": [{"match": "acq-mprage_run-1_T1w", "count": 2}]}).protocol.series[0]
    assert ok.suffix == "T1w" and ok.entities == {"acq": "mprage", "run": "1"}


# -- conformity on real converted sessions -------------------------------------------------------------------
def test_session_conforms_then_each_deviation(dataset):
    """The NIH session against a protocol built from its own sidecars: pass; then one change at a time."""
    meta = sidecar(dataset, NIH_AP)
    img = nib.load(str(dataset / f"{NIH_AP}.nii.gz"))
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    epi = {"RepetitionTime": {"value": meta["RepetitionTime"], "tolerance": 0.001},
           "EchoTime": {"value": meta["EchoTime"], "relative": 0.05},
           "FlipAngle": {"value": meta["FlipAngle"]},
           "VoxelSize": {"value": zooms, "tolerance": 0.01},
           "Matrix": {"value": list(img.shape[:3])},
           "ManufacturersModelName": {"value": meta["ManufacturersModelName"]},
           "SoftwareVersions": {"regex": ".*E11.*"}}
    protocol = {"parameters": {"MagneticFieldStrength": {"value": meta["MagneticFieldStrength"], "tolerance": 0.1},
                               "Manufacturer": {"regex": "Siemens|GE"}},
                "series": [{"match": f"dir-{d}_epi", "parameters": epi} for d in ("AP", "PA", "LR", "RL")]}
    nih = by_label(run_qc(dataset, settings(protocol), GENERATED_BY))["sub-01_ses-nih"]
    assert nih.status == "pass", nih.to_dict()
    assert not (nih.missing or nih.duplicated or nih.extra or nih.deviations)
    assert {i.series for i in nih.images} == {"dir-AP_epi", "dir-PA_epi", "dir-LR_epi", "dir-RL_epi"}

    # a TR beyond its tolerance by a hair, on every series: four deviations, status fail
    protocol["series"] = [{**s, "parameters": {**epi, "RepetitionTime": {
        "value": meta["RepetitionTime"] + 0.0011, "tolerance": 0.001}}} for s in protocol["series"]]
    nih = by_label(run_qc(dataset, settings(protocol), GENERATED_BY))["sub-01_ses-nih"]
    assert nih.status == "fail" and {d["Parameter"] for d in nih.deviations} == {"RepetitionTime"}
    assert len(nih.deviations) == 4 and nih.deviations[0]["Value"] == meta["RepetitionTime"]
    # ... and exactly at the tolerance: within
    protocol["series"] = [{**s, "parameters": {**epi, "RepetitionTime": {
        "value": meta["RepetitionTime"] + 0.001, "tolerance": 0.001}}} for s in protocol["series"]]
    assert by_label(run_qc(dataset, settings(protocol), GENERATED_BY))["sub-01_ses-nih"].status == "pass"


def test_missing_duplicated_extra(dataset):
    protocol = {"series": [{"match": "epi", "count": 2},            # four dir-* epi: duplicated
                           {"match": "dir-AP_epi", "count": 1},     # more specific: takes the AP image
                           {"match": "T1w", "count": 1},            # none: missing
                           {"match": "magnitude", "count": 1}]}
    result = by_label(run_qc(dataset, settings(protocol), GENERATED_BY))
    nih, gefmap, philips = result["sub-01_ses-nih"], result["sub-01_ses-gefmap"], result["sub-01_ses-philips"]
    assert nih.duplicated == [{"Series": "epi", "Expected": 2, "Found": 3, "Images": [
        "sub-01_ses-nih_dir-LR_epi", "sub-01_ses-nih_dir-PA_epi", "sub-01_ses-nih_dir-RL_epi"]}]
    assert {m["Series"] for m in nih.missing} == {"T1w", "magnitude"} and nih.status == "fail"
    assert gefmap.extra == ["sub-01_ses-gefmap_fieldmap"] and {m["Series"] for m in gefmap.missing} == {
        "epi", "dir-AP_epi", "T1w"}
    assert philips.extra == ["sub-01_ses-philips_task-unknown_bold"]
    # only extra and duplicated series: a warning, not a failure
    warn = by_label(run_qc(dataset, settings({"series": [{"match": "epi", "count": 1}]}), GENERATED_BY))
    assert warn["sub-01_ses-nih"].status == "warn" and warn["sub-01_ses-nih"].duplicated
    assert warn["sub-01_ses-philips"].status == "fail"  # its epi is missing
    # count 0: the series must not be there
    zero = by_label(run_qc(dataset, settings({"series": [{"match": "bold", "count": 0}]}), GENERATED_BY))
    assert zero["sub-01_ses-philips"].duplicated[0]["Found"] == 1


def test_outputs_and_validity(dataset):
    """One JSON per session (what run_qc found), snapshots, the report, a derivative the validator accepts."""
    result = run_qc(dataset, settings({"series": [{"match": "bold"}]}, snapshots=True), GENERATED_BY)
    out = dataset / QC_DIR
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "pacs2bids"
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:"}] and desc["DatasetLinks"] == {"raw": "../../"}
    for s in result.sessions:
        written = json.loads((out / s.json).read_text())
        assert written["Status"] == s.status and len(written["Images"]) == len(s.images) > 0
        for image in written["Images"]:
            png = out / image["Snapshot"]
            assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "index.html").is_file()
    # W3C PROV (issue 15): each session's QC JSON was generated by a "qc" activity that used its images
    from pacs2bids.provdoc import index, read_records

    nodes = index(doc for _, doc in read_records(dataset))
    for s in result.sessions:
        entity = nodes[f"bids::{(QC_DIR / s.json).as_posix()}"]
        activity = nodes[entity["GeneratedBy"]]
        assert activity["Label"] == "qc" and activity["StartedAtTime"] and activity["EndedAtTime"]
        assert {f"bids::{i.path}" for i in s.images} <= set(activity["Used"])
        assert entity["Digest"]["sha256"] == hashlib.sha256((out / s.json).read_bytes()).hexdigest()
    report = validate_dataset(out)
    assert report.ok, report.summary()
    check_qc_dataset(out)
    assert validate_dataset(dataset).ok  # the raw dataset with its derivative
    # the check is not a rubber stamp: a file the validator does not know is refused, naming the folder
    (out / "sub-01" / "notes.txt").write_text("x")
    with pytest.raises(ValidationFailed, match="pacs2bids-qc"):
        check_qc_dataset(out)


def test_without_protocol_indices_and_report(dataset):
    result = run_qc(dataset, settings(None), GENERATED_BY)
    assert {s.status for s in result.sessions} == {"no protocol"} and len(result.sessions) == 3
    snrs = [i.indices["snr"] for s in result.sessions for i in s.images if i.suffix != "fieldmap"]
    assert len(snrs) == 6 and all(v is not None and v > 1 for v in snrs), snrs
    assert "No protocol is declared" in (dataset / QC_DIR / "index.html").read_text()
    assert result.summary() == {"statuses": {"no protocol": 3}, "sessions": 3, "reused": 0,
                                "seconds_per_session": round(result.seconds / 3, 3)}
    # a second run replaces the first: no stale session files
    (dataset / QC_DIR / "sub-01" / "ses-old").mkdir()
    run_qc(dataset, settings(None), GENERATED_BY)
    assert not (dataset / QC_DIR / "sub-01" / "ses-old").exists()


# -- image indices ------------------------------------------------------------------------------------------
def test_indices_follow_the_image(dataset):
    """On a real EPI: more background noise lowers SNR; a planted N/2 ghost raises the ghosting ratio;
    a zero-filled background gives no SNR, said so."""
    vol, _, _ = qc_indices.load(dataset / f"{NIH_AP}.nii.gz")
    meta = sidecar(dataset, NIH_AP)
    base = qc_indices.indices(vol, meta)
    assert base.snr and base.ghosting is not None and base.phase_axis == "j"
    rng = np.random.default_rng(0)
    noisy = qc_indices.indices(vol + np.abs(rng.normal(0, vol.std(), vol.shape)).astype(np.float32), meta)
    assert noisy.snr < base.snr / 2
    ghosted = vol + 0.2 * np.roll(vol, vol.shape[1] // 2, axis=1)
    assert qc_indices.indices(ghosted, meta).ghosting > base.ghosting + 0.05
    # the ghost is looked for along the phase-encoding axis the sidecar gives
    assert qc_indices.indices(ghosted, {**meta, "PhaseEncodingDirection": "i"}).phase_axis == "i"
    masked = np.where(qc_indices.head_mask(vol), vol, 0).astype(np.float32)
    flat = qc_indices.indices(masked, meta)
    assert flat.snr is None and "zero-filled" in flat.note


def test_spec_declares_the_protocol(tmp_path):
    """The protocol is read from spec.yaml under qc:, and a wrong one is refused naming the key."""
    from test_config import BASE, ENV, write_spec

    from pacs2bids.config import load_spec
    from pacs2bids.errors import SpecError

    qc = ("qc:\n  protocol:\n    parameters: {MagneticFieldStrength: {value: 3, tolerance: 0.1}}\n"
          "    series:\n      - {match: acq-mprage_T1w, count: 1, parameters: {RepetitionTime: {value: 2.3, "
          "relative: 0.01}, Matrix: {value: [256, 256, 176]}}}\n")
    spec = load_spec(write_spec(tmp_path, BASE + qc), environ=ENV)
    (t1,) = spec.qc.protocol.series
    assert t1.entities == {"acq": "mprage"} and t1.parameters["Matrix"].value == [256, 256, 176]
    assert spec.qc.enabled and load_spec(write_spec(tmp_path, BASE), environ=ENV).qc.protocol is None
    with pytest.raises(SpecError, match="qc"):
        load_spec(write_spec(tmp_path, BASE + qc.replace("acq-mprage_T1w", "mprage T1w")), environ=ENV)


def test_first_volume_of_a_4d_series(dataset):
    """A 4D BOLD is judged on its first volume, read alone, with the header's scaling applied."""
    img = nib.load(str(next(dataset.glob("sub-01/ses-philips/func/*_bold.nii.gz"))))
    assert len(img.shape) == 4 and img.shape[3] > 1
    vol = qc_indices.first_volume(img)
    assert vol.shape == img.shape[:3] and vol.dtype == np.float32
    np.testing.assert_allclose(vol, img.get_fdata()[..., 0], rtol=1e-6, atol=0.05)
    assert not np.allclose(vol, img.get_fdata()[..., 1], atol=0.05)  # the first, not any


def test_unreadable_image_fails_its_session_only(dataset):
    """A truncated NIfTI is reported (not a crash of the run); the session's other images are still checked."""
    broken = dataset / "sub-01/ses-nih/fmap/sub-01_ses-nih_dir-LR_epi.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    for protocol in (None, {"series": [{"match": "epi", "count": 4}]}):
        result = by_label(run_qc(dataset, settings(protocol), GENERATED_BY))
        nih = result["sub-01_ses-nih"]
        assert nih.status == "fail" and nih.unreadable == [
            {"Image": "sub-01_ses-nih_dir-LR_epi", "Reason": nih.unreadable[0]["Reason"]}]
        assert nih.unreadable[0]["Reason"].startswith("could not be read (")
        assert sum(1 for i in nih.images if i.indices.get("snr")) == 3 and not nih.missing
        assert result["sub-01_ses-philips"].status != "fail" or protocol  # others untouched


def test_unchanged_sessions_keep_their_qc(dataset):
    """A re-run (staging is a copy of the published dataset, times kept) re-reads only what changed."""
    protocol = {"series": [{"match": "epi", "count": 4}]}
    first = run_qc(dataset, settings(protocol, snapshots=True), GENERATED_BY)
    assert not any(s.reused for s in first.sessions)
    texts = {s.label: (dataset / QC_DIR / s.json).read_text() for s in first.sessions}
    copy = Path(shutil.copytree(dataset, dataset.parent / "seeded"))  # as seed_staging copies it
    again = by_label(run_qc(copy, settings(protocol, snapshots=True), GENERATED_BY))
    assert all(s.reused for s in again.values())
    assert {k: (copy / QC_DIR / s.json).read_text() for k, s in again.items()} == texts
    assert [s.to_dict() for s in again.values()] == [json.loads(t) for t in texts.values()]
    # a new conversion in one session: that one is read again, and only it
    bold = next(copy.glob("sub-01/ses-philips/func/*_bold.json"))
    meta = json.loads(bold.read_text())
    bold.write_text(json.dumps({**meta, "RepetitionTime": 3.0}))
    third = by_label(run_qc(copy, settings(protocol, snapshots=True), GENERATED_BY))
    assert [k for k, s in third.items() if not s.reused] == ["sub-01_ses-philips"]
    assert third["sub-01_ses-philips"].images[0].parameters["RepetitionTime"] == 3.0
    # another protocol: every session again; a lost snapshot: its session again
    changed = {"series": [{"match": "epi", "count": 3}]}
    assert not any(s.reused for s in run_qc(copy, settings(changed, snapshots=True), GENERATED_BY).sessions)
    next((copy / QC_DIR).glob("sub-01/ses-nih/figures/*.png")).unlink()
    fourth = by_label(run_qc(copy, settings(changed, snapshots=True), GENERATED_BY))
    assert [k for k, s in fourth.items() if not s.reused] == ["sub-01_ses-nih"]
    assert len(list((copy / QC_DIR).glob("sub-01/ses-nih/figures/*.png"))) == 4
    # a session the dataset no longer holds: its QC goes too
    shutil.rmtree(copy / "sub-01" / "ses-gefmap")
    run_qc(copy, settings(changed, snapshots=True), GENERATED_BY)
    assert not (copy / QC_DIR / "sub-01" / "ses-gefmap").exists()
    assert validate_dataset(copy / QC_DIR).ok


def test_no_snr_on_a_fieldmap_in_hz(dataset):
    gefmap = by_label(run_qc(dataset, settings(None), GENERATED_BY))["sub-01_ses-gefmap"]
    indices = {i.suffix: i.indices for i in gefmap.images}
    assert indices["fieldmap"]["snr"] is None and "not a magnitude image" in indices["fieldmap"]["note"]
    assert indices["magnitude"]["snr"] > 1


def test_colour_image_is_reported_not_a_crash(dataset):
    """An RGB NIfTI (a screen capture kept as an image, say) has no grey levels to measure: reported."""
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), dataset / "sub-01/ses-nih/fmap/sub-01_ses-nih_acq-rgb_epi.nii.gz")
    nih = by_label(run_qc(dataset, settings(None), GENERATED_BY))["sub-01_ses-nih"]
    (bad,) = nih.unreadable
    assert bad["Image"] == "sub-01_ses-nih_acq-rgb_epi" and "TypeError" in bad["Reason"] and nih.status == "fail"


def test_large_volume_is_sampled_not_skipped(dataset):
    """A volume with axes over MAX_SIDE voxels is measured on an even sample: the same SNR as the full
    grid (here: the EPI repeated twice along i and j, so the sample is the original)."""
    vol, _, _ = qc_indices.load(dataset / f"{NIH_AP}.nii.gz")
    meta = sidecar(dataset, NIH_AP)
    big = np.repeat(np.repeat(vol, 2, axis=0), 2, axis=1)  # 144 x 144 x 5: sampled every 2nd voxel
    assert max(big.shape) > qc_indices.MAX_SIDE
    small, sampled = qc_indices.indices(vol, meta), qc_indices.indices(big, meta)
    assert sampled.foreground_voxels <= (qc_indices.MAX_SIDE ** 2) * vol.shape[2]
    assert sampled == small
