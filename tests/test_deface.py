"""Defacing (issue 15) on real images: pydeface's template and face mask, registered with SimpleITK
(FSL flirt when installed), into ``derivatives/pacs2bids-deface/``.

The head is the Philips ADNI 3D MPRAGE of ../shared/data/dicom-vendors (P1, 170 sagittal slices,
1 mm), converted here with dcm2niix. The failure case is the Siemens XA30 3D "T1w" of
../shared/data/dicom (dcm_qa_xa30i), a real scanner export of a bottle phantom: no face, no brain.
Face and brain are judged with regions derived here, independently of the registration: the tip
of the nose (the head's most anterior voxels at the height of the eyes and mouth) and a box well
inside the upper head.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _bidscheck import copy_decompressed

pytestmark = [pytest.mark.slow, pytest.mark.corpus]


@pytest.fixture(scope="module")
def head_t1w(vendors_dir, tmp_path_factory) -> Path:
    """The Philips 3D T1w head, converted by dcm2niix (NIfTI + sidecar)."""
    tmp = tmp_path_factory.mktemp("head")
    src = copy_decompressed(vendors_dir / "dcm_qa_philips_enh" / "In" / "cl", tmp / "dicom")
    for f in src.iterdir():
        if not f.name.startswith("1301_"):
            f.unlink()
    subprocess.run(["dcm2niix", "-b", "y", "-z", "y", "-f", "head", "-o", str(tmp), str(src)], check=True,
                   capture_output=True, timeout=300)
    return tmp / "head.nii.gz"


@pytest.fixture(scope="module")
def phantom_t1w(corpus_dir) -> Path:
    return corpus_dir / "dcm_qa_xa30i" / "Ref" / "5001_anat-T1w_acq-tfl.nii.gz"


def _canonical(a: np.ndarray, affine) -> np.ndarray:
    return nib.orientations.apply_orientation(a, nib.orientations.io_orientation(affine))


def head_regions(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nose, brain box) in a canonical (RAS) head image, from its silhouette alone: the nose is the
    head's most anterior 6 mm between 35% and 65% of its height from the top; the brain box is the
    middle third of the head's width and depth, from 10% to 35% of its height below the top."""
    from scipy import ndimage

    head = ndimage.binary_fill_holes(data > np.percentile(data[data > 0], 60) / 3)
    xs, ys, zs = (np.nonzero(head.any(axis=tuple(i for i in range(3) if i != k)))[0] for k in range(3))
    height = zs.max() - zs.min()
    band = slice(int(zs.max() - 0.65 * height), int(zs.max() - 0.35 * height))
    front = np.nonzero(head[:, :, band].any(axis=(0, 2)))[0].max()
    nose = np.zeros_like(head)
    nose[:, front - 5:front + 1, band] = head[:, front - 5:front + 1, band]
    box = np.zeros_like(head)
    w, d = xs.max() - xs.min(), ys.max() - ys.min()
    box[xs.min() + w // 3: xs.max() - w // 3, ys.min() + d // 3: ys.max() - d // 3,
        int(zs.max() - 0.35 * height): int(zs.max() - 0.10 * height)] = True
    return nose, box & head


def test_real_head_face_zeroed_brain_untouched(head_t1w, capsys):
    from pacs2bids.derivatives.deface import deface, load_3d

    img = load_3d(head_t1w)
    started = time.monotonic()
    done = deface(img)
    seconds = time.monotonic() - started
    with capsys.disabled():
        print(f"\ndefacing {img.shape} at {img.header.get_zooms()} mm: {seconds:.0f} s ({done.tool} "
              f"{done.tool_version}; pydeface reports 2-10 minutes per image); checks {done.measures}")
    before = _canonical(np.asanyarray(img.dataobj), img.affine)
    after = _canonical(np.asanyarray(done.image.dataobj), img.affine)
    nose, brain = head_regions(before.astype(np.float32))
    assert nose.sum() > 100 and brain.sum() > 10000
    assert (after[nose] == 0).mean() > 0.9, "the nose is not zeroed"
    assert np.array_equal(after[brain], before[brain]), "a brain voxel changed"
    changed = after != before
    assert changed.sum() == done.zeroed > 10000 and (after[changed] == 0).all()  # zeroed, nothing else
    assert done.image.header.get_data_dtype() == img.header.get_data_dtype()
    assert np.allclose(done.image.affine, img.affine)
    assert seconds < 900, f"defacing took {seconds:.0f} s: minutes, not tens of minutes, are the goal (shared machine)"


def test_non_head_image_fails_loudly(phantom_t1w):
    """A real 3D T1w of a phantom: the template cannot match, the mask covers no face: DefaceFailed."""
    from pacs2bids.derivatives.deface import DefaceFailed, deface, load_3d

    with pytest.raises(DefaceFailed) as failed:
        deface(load_3d(phantom_t1w))
    assert "head" in str(failed.value) or "brain" in str(failed.value), str(failed.value)


def test_4d_image_refused(tmp_path):
    from pacs2bids.derivatives.deface import DefaceFailed, load_3d

    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), path)
    with pytest.raises(DefaceFailed, match="only 3D"):
        load_3d(path)


def test_spec_section(tmp_path):
    from pydantic import ValidationError

    from pacs2bids.config.derivatives import DefaceSettings, DerivativesSettings

    s = DerivativesSettings.model_validate({"deface": {}})
    assert s.deface.suffixes == ("T1w", "T2w", "FLAIR", "PDw") and s.deface.only_3d and not s.deface.replace_raw
    assert DerivativesSettings().deface is None
    with pytest.raises(ValidationError, match="not BIDS suffixes"):
        DefaceSettings(suffixes=["T1w", "bad-one"])
    with pytest.raises(ValidationError):
        DerivativesSettings.model_validate({"deface": {"replace": True}})  # unknown keys refused


def test_defaced_name():
    from pacs2bids.derivatives.deface_study import defaced_name

    assert (defaced_name("sub-01/ses-02/anat/sub-01_ses-02_acq-mprage_run-1_T1w.nii.gz")
            == "sub-01/ses-02/anat/sub-01_ses-02_acq-mprage_run-1_desc-defaced_T1w.nii.gz")


def _place(root: Path, src: Path, rel: str, mr_type: str | None = "3D") -> str:
    out = root / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(src.read_bytes())
    out.with_name(out.name.replace(".nii.gz", ".json")).write_text(json.dumps(
        {"MRAcquisitionType": mr_type} if mr_type else {}))
    return rel


def test_study_step_replace_raw_and_validator(head_t1w, phantom_t1w, tmp_path):
    """deface_study on a staging dataset: the head defaced into a valid BIDS derivative (snapshot,
    sidecar), the raw image replaced, its original kept in the work area; the phantom reported
    failed, left out of the shared dataset, and not published as defaced; a 2D image not chosen."""
    from pacs2bids.bids.dataset import finalise_dataset
    from pacs2bids.config.derivatives import DefaceSettings, DerivativesSettings
    from pacs2bids.derivatives.deface_study import deface_study
    from pacs2bids.run import RunContext
    from pacs2bids.validate import validate_dataset

    class Spec:  # only what RunContext's folders and deface_study read
        derivatives = DerivativesSettings(deface=DefaceSettings(replace_raw=True))
        resolved_work_dir = tmp_path / "work"

    staging = tmp_path / "work" / "staging"
    head = _place(staging, head_t1w, "sub-01/anat/sub-01_T1w.nii.gz")
    phantom = _place(staging, phantom_t1w, "sub-01/anat/sub-01_acq-phantom_T1w.nii.gz")
    flat = _place(staging, head_t1w, "sub-01/anat/sub-01_acq-twod_T2w.nii.gz", mr_type="2D")
    original = nib.load(staging / head).get_fdata()
    ctx = RunContext(Spec(), "run1", None, staging)
    entries = {e["source"]: e for e in deface_study(ctx, "sub-01", [head, phantom, flat], "9.9")}
    assert sorted(entries) == sorted([head, phantom])  # the 2D image is not chosen
    assert entries[head]["status"] == "defaced", entries[head]
    assert entries[phantom]["status"] == "failed" and "replace_raw" in entries[phantom]["reason"]
    root = staging / "derivatives" / "pacs2bids-deface"
    defaced = root / "sub-01/anat/sub-01_desc-defaced_T1w.nii.gz"
    assert entries[head]["file"] == defaced.relative_to(staging).as_posix()
    assert not list(root.rglob("*phantom*"))  # never published as defaced
    sidecar = json.loads(defaced.with_name("sub-01_desc-defaced_T1w.json").read_text())
    assert sidecar["Sources"] == [f"bids:raw:{head}"] and sidecar["VoxelsZeroed"] == entries[head]["voxels_zeroed"]
    assert sidecar["RegistrationTool"] in ("SimpleITK", "FSL flirt") and sidecar["DefaceStarted"]
    assert (root / sidecar["Snapshot"]).stat().st_size > 1000
    # W3C PROV (issue 15): a "deface" activity, by pydeface, used the raw image and generated the defaced one
    from pacs2bids.provdoc import index, read_records

    nodes = index(doc for _, doc in read_records(staging))
    activity = nodes[nodes[f"bids::{entries[head]['file']}"]["GeneratedBy"]]
    assert activity["Label"] == "deface" and activity["Used"] == [f"bids::{head}"]
    assert activity["Parameters"]["replace_raw"] is True and activity["EndedAtTime"] == sidecar["DefaceFinished"]
    assert not any("phantom" in i for i in nodes)  # a failed image has no record of being defaced
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["SourceDatasets"]
    assert [g["Name"] for g in description["GeneratedBy"]][:2] == ["pacs2bids", "pydeface"]
    # replace_raw: the shared copy holds the defaced voxels; the face stays only in the work area
    assert np.array_equal(nib.load(staging / head).get_fdata(), nib.load(defaced).get_fdata())
    kept = tmp_path / "work" / "deface-originals" / "run1"
    assert np.array_equal(nib.load(kept / head).get_fdata(), original)
    assert not (staging / phantom).exists() and (kept / phantom).exists()
    assert not (staging / phantom.replace(".nii.gz", ".json")).exists()
    # the derivative alone, and the dataset holding it, are valid BIDS
    finalise_dataset(staging, name="t", participants=["01"], generated_by={})
    for where in (root, staging):
        report = validate_dataset(where)
        assert report.ok, report.summary()


def test_flow_publishes_defaced_t1w(prefect_harness, orthanc_factory, vendors_dir, tmp_path, monkeypatch):
    """End to end through ``extract_project``: the Philips 3D T1w from a real Orthanc, published with
    derivatives/pacs2bids-deface (validator 0 errors on the dataset and on the derivative), the
    defacing in the run summary, the raw image left as it was (replace_raw off)."""
    from test_extract_e2e import plant_corpus, run_extraction, write_spec

    from pacs2bids.validate import validate_dataset

    src = tmp_path / "src" / "philips"
    copy_decompressed(vendors_dir / "dcm_qa_philips_enh" / "In" / "cl", src)
    for f in src.iterdir():
        if not f.name.startswith("1301_"):
            f.unlink()
    planted = plant_corpus(tmp_path / "src", tmp_path / "planted")
    pacs = orthanc_factory()
    assert pacs.upload(f for files in planted["by_series"].values() for f in files) == 170
    out = tmp_path / "out" / "dataset"
    spec = write_spec(tmp_path, f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs.dicom_port}, "
                                "retrieve: c-get}\n", planted, out)
    spec.write_text(spec.read_text() + "derivatives: {deface: {}}\n")
    summary = run_extraction(spec, monkeypatch)
    assert summary["published"] and summary["state"] == "completed", summary
    (entry,) = summary["derivatives"]
    assert entry["status"] == "defaced" and summary["counts"]["images_defaced"] == 1, entry
    assert summary["stage_seconds"]["deface"] > 0
    defaced = out / entry["file"]
    raw = out / entry["source"]
    assert defaced.is_file() and raw.is_file()
    zeroed = (nib.load(defaced).get_fdata() == 0).sum() - (nib.load(raw).get_fdata() == 0).sum()
    assert zeroed == entry["voxels_zeroed"] > 10000  # the raw image keeps its face (replace_raw off)
    assert list((out / "derivatives" / "pacs2bids-deface" / "figures").glob("*.png"))
    for where in (out, out / "derivatives" / "pacs2bids-deface"):
        report = validate_dataset(where)
        assert report.ok, report.summary()


def test_mask_over_the_brain_is_refused(head_t1w):
    """A face mask that landed on the brain (as a broken registration puts it) is refused by the
    checks, and one on the nose is not: the brain estimate comes from the image alone."""
    from pacs2bids.derivatives.checks import problems

    img = nib.as_closest_canonical(nib.load(head_t1w))
    data = img.get_fdata(dtype=np.float32)
    nose, brain = head_regions(data)
    zooms = img.header.get_zooms()
    found, _ = problems(data, zooms, data, ~nose, np.eye(4))  # the nose only: too little of the head
    assert not any("brain" in f for f in found), found
    misplaced = np.ones(data.shape, bool)
    misplaced[brain] = False  # zeroing a box inside the upper head
    found, measures = problems(data, zooms, data, misplaced, np.eye(4))
    assert any("of the brain estimate" in f for f in found), (found, measures)
    found, _ = problems(data, zooms, data, misplaced, np.diag([-1.0, 1, 1, 1]))  # a mirror
    assert any("implausible" in f for f in found), found
