"""Helpers shared by the conversion tests: decompress the corpus, compare against plain dcm2niix."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from pacs2bids.dicomfiles import iter_dicom_files


DCM2NIIX_EXE = str(Path(sys.executable).parent / "dcm2niix") if (Path(sys.executable).parent / "dcm2niix").exists() \
    else "dcm2niix"


def copy_decompressed(src: Path, dst: Path) -> Path:
    """Copy a corpus folder, gunzipping ``*.gz`` DICOM, keeping the layout."""
    for p in sorted(src.rglob("*")):
        if not p.is_file() or "Ref" in p.relative_to(src).parts:
            continue
        rel = p.relative_to(src)
        out = dst / rel.parent / (rel.name[:-3] if rel.name.endswith(".gz") else rel.name)
        out.parent.mkdir(parents=True, exist_ok=True)
        if p.name.endswith(".gz"):
            out.write_bytes(gzip.decompress(p.read_bytes()))
        else:
            shutil.copyfile(p, out)
    return dst


def files_by_series(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in iter_dicom_files(root):
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        if "SeriesInstanceUID" in ds:
            out.setdefault(str(ds.SeriesInstanceUID), []).append(p)
    return out


def direct_dcm2niix(files: list[Path], out: Path) -> list[Path]:
    """Plain ``dcm2niix -b y -z n`` on exactly these files (linked into a folder of their own)."""
    src = out / "in"
    src.mkdir(parents=True)
    for i, f in enumerate(files):
        (src / f"{i:05d}.dcm").symlink_to(f.resolve())
    exe = str(Path(sys.executable).parent / "dcm2niix")
    if not Path(exe).exists():
        exe = "dcm2niix"
    proc = subprocess.run([exe, "-b", "y", "-z", "n", "-f", "%s_%e_%z", "-o", str(out), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sorted(out.glob("*.nii"))


def assert_same_images(bids_root: Path, outputs: list[str], direct: list[Path]) -> None:
    """Every BIDS image equals one direct output: shape, affine (allclose), voxels, bval/bvec."""
    ours = [bids_root / o for o in outputs if o.endswith((".nii", ".nii.gz"))]
    assert ours, "no image among the outputs"
    assert len(ours) == len(direct), (outputs, [d.name for d in direct])
    unmatched = list(direct)
    for img in ours:
        a = nib.load(img)
        adata = np.asanyarray(a.dataobj)
        match = None
        for d in unmatched:
            b = nib.load(d)
            if a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4) and \
                    np.array_equal(adata, np.asanyarray(b.dataobj)):
                match = d
                break
        assert match is not None, f"{img.name} equals no direct dcm2niix output {[d.name for d in unmatched]}"
        unmatched.remove(match)
        stem = img.name.split(".")[0]
        for ext in ("bval", "bvec"):
            ours_b = img.parent / f"{stem}.{ext}"
            theirs = match.with_suffix(f".{ext}")
            assert ours_b.exists() == theirs.exists(), (ours_b, theirs)
            if theirs.exists():
                assert np.allclose(np.loadtxt(ours_b), np.loadtxt(theirs), atol=1e-5), ext
