"""The query asks for each study's SOP classes, for the schedule only (issue 12): a study of Secondary
Captures under Modality CT (the shared corpus's CT exam summary) costs seconds of OCR, which its
series' modality does not show. Real Orthanc: over C-FIND it answers SOPClassesInStudy (the study's
small series are then counted as OCR'd), over QIDO-RS (1.10's DICOMweb plugin) not that one but each
series' SOPClassUID (then exactly the Secondary Capture series is)."""

from __future__ import annotations

import pydicom
import pytest

from pacs2bids.config import load_spec
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.pacs import close_pools
from pacs2bids.query import find_studies
from pacs2bids.study import OCR_INSTANCES, study_cost

from test_retrieve import SECRET, dimse_yaml, web_yaml

SC = "1.2.840.10008.5.1.4.1.1.7"


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_the_query_reads_the_study_sop_classes_and_the_cost_counts_their_ocr(kind, corpus_dir, orthanc_factory,
                                                                              tmp_path):
    files = [f for f in iter_dicom_files(corpus_dir / "dcm_qa_ct")
             if "SOPClassUID" in pydicom.dcmread(f, stop_before_pixels=True)]  # not the DICOMDIR files
    patient = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientID)
    pacs = orthanc_factory()
    assert pacs.upload(files) == len(files)
    (tmp_path / "inclusions.csv").write_text(f"patient_id,subject\n{patient},01\n")
    (tmp_path / "spec.yaml").write_text(
        "project: TEST\n"
        f"pacs:\n{dimse_yaml(pacs) if kind == 'dimse' else web_yaml(pacs)}"
        "selection:\n  inclusions: inclusions.csv\n  modalities: [CT]\n"
        "output: out\n"
    )
    try:
        q = find_studies(load_spec(tmp_path / "spec.yaml", environ={"PACS2BIDS_PROJECT_SECRET": SECRET}))
    finally:
        close_pools()
    [study] = q.studies
    assert {s.modality for s in study.series} == {"CT"}  # the series query shows no Secondary Capture
    if kind == "dicomweb":
        assert sorted(s.sop_class for s in study.series) == ["1.2.840.10008.5.1.4.1.1.2", SC], study.series
        assert study_cost(study) == 6 * OCR_INSTANCES + 1  # the 6 screenshots, not the CT localizer
        return
    assert SC in study.sop_classes and "1.2.840.10008.5.1.4.1.1.2" in study.sop_classes, study.sop_classes
    # the 6-image summary series counts its OCR; the 1-image localizer too (a series query cannot tell them)
    assert study_cost(study) == len(files) * OCR_INSTANCES
