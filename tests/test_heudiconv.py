"""A project's heudiconv heuristic on pseudonymised DICOM, through heudiconv's command line (no patch
of heudiconv), its outputs mapped back to their series through heudiconv's filegroup table."""

from __future__ import annotations

import json
import shutil

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs2bids.convert import convert_session
from test_convert import PROJECT_HEURISTIC as HEURISTIC  # a project's own heudiconv heuristic


def _pseudonymised_copy(src, dest) -> set[str]:
    """A copy of ``src`` whose files carry the De-identification Method elements a pseudonymiser
    writes (PS3.15 E.1.1: code 113107, whose meaning holds the word "Dates"); returns the series UIDs."""
    shutil.copytree(src, dest)
    uids = set()
    for f in sorted(p for p in dest.rglob("*") if p.is_file() and p.suffix not in (".md", "")):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113107", "DCM"
        code.CodeMeaning = "Retain Longitudinal Temporal Information Modified Dates Option"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "Basic Profile, Retain Modified Dates Option"
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        ds.save_as(f)
        uids.add(str(ds.SeriesInstanceUID))
    assert uids, f"no DICOM under {src}"
    return uids


def test_pseudonymised_series_converts_and_maps_to_its_series(sample_dir, tmp_path):
    uids = _pseudonymised_copy(sample_dir / "dcm_qa_ge", tmp_path / "dicom")
    heur = tmp_path / "project.py"
    heur.write_text(HEURISTIC)
    root = tmp_path / "bids"
    result = convert_session(tmp_path / "dicom", root, subject="01", session=None, heuristic=str(heur),
                             work_dir=tmp_path / "w")
    (s,) = result.series
    assert s.status == "converted", s.reason
    assert s.series_uid in uids
    assert "sub-01/dwi/sub-01_acq-project_dwi.nii.gz" in s.outputs
    sidecar = json.loads((root / "sub-01/dwi/sub-01_acq-project_dwi.json").read_text())
    assert "DeidentificationMethodCodeSequence" not in sidecar and "AcquisitionDateTime" not in sidecar
    # the dataset's own copy is untouched: only heudiconv's private staged input lost the elements
    planted = [f for f in (tmp_path / "dicom").rglob("*.MRDC.*")]
    assert planted and all("DeidentificationMethodCodeSequence" in pydicom.dcmread(f, stop_before_pixels=True)
                           for f in planted)


def test_series_left_out_by_the_heuristic_are_reported_per_series(sample_dir, tmp_path):
    heur = tmp_path / "none.py"
    heur.write_text("def infotodict(seqinfo):\n    return {}\n")
    result = convert_session(sample_dir / "dcm_qa_ge", tmp_path / "bids", subject="01", session="a",
                             heuristic=str(heur), work_dir=tmp_path / "w")
    assert [s.status for s in result.series] == ["skipped"]
    assert result.series[0].reason == "not selected by the heuristic" and result.series[0].series_number is not None
    assert not (tmp_path / "bids" / "sub-01").exists()
