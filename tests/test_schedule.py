"""The order studies are submitted in (issue 12): the largest first (LPT), and the run's opt-in
timeline of each study's stages.

The flow test runs the real flow on a real Orthanc holding the bundled sample, its inclusion rows
listed smallest study first, and records (without replacing it) each study the flow submits."""

from __future__ import annotations

import pytest

from pacs2bids.model import SeriesRef, StudyRef
from pacs2bids.run import RunSummary, study_timeline
from pacs2bids.study import StudyResult, longest_first, study_cost


def _study(row: int, *sizes: int | None) -> StudyRef:
    return StudyRef(row, f"{row:02d}", None, f"1.2.{row}",
                    series=[SeriesRef(f"1.2.{row}", f"1.2.{row}.{k}", "MR", k, "", n) for k, n in enumerate(sizes)])


def test_longest_first_orders_by_announced_instances():
    studies = [_study(1, 10), _study(2, 100, 200), _study(3, None), _study(4, 300), _study(5, 150, 150),
               _study(6, 10)]
    # 300 instances in two series before 300 in one; equals keep the query's order; unknown counts last
    assert longest_first(studies) == [1, 4, 3, 0, 5, 2]
    assert longest_first([]) == []


def test_timeline_rows_follow_the_submission_and_stay_out_of_the_summary_unless_asked():
    studies = [_study(1, 5), _study(2, 50)]
    results = [StudyResult("sub-01", clock={"retrieve_started": 101.0, "retrieve_ended": 102.5,
                                            "pseudonymise_ended": 103.0, "convert_ended": 104.25}),
               StudyResult("sub-02", clock={"retrieve_started": 100.5, "retrieve_ended": 101.0})]  # failed retrieval
    rows = study_timeline(studies, results, [1, 0], 100.0)
    assert rows == [{"study": "sub-02", "instances": 50, "retrieve": [0.5, 1.0], "pseudonymise": None,
                     "convert": None},
                    {"study": "sub-01", "instances": 5, "retrieve": [1.0, 2.5], "pseudonymise": [2.5, 3.0],
                     "convert": [3.0, 4.25]}]
    summary = RunSummary("p", "r", "/out")
    assert "timeline" not in summary.to_dict()
    summary.timeline = rows
    assert summary.to_dict()["timeline"] == rows


@pytest.mark.slow
def test_flow_submits_the_largest_study_first(prefect_harness, orthanc_factory, sample_dir, tmp_path, monkeypatch):
    import pacs2bids.flows.extract as extract
    from test_extract_e2e import plant_corpus, run_extraction, write_spec

    planted = plant_corpus(sample_dir, tmp_path / "planted")
    pacs = orthanc_factory()
    pacs.upload(f for files in planted["by_series"].values() for f in files)
    spec = write_spec(tmp_path, f"  dicomweb: {{url: {pacs.dicomweb_url}}}\n", planted, tmp_path / "out")
    files = {p["subject"]: sum(1 for fs in planted["by_series"].values() for f in fs if f.parent.name == g)
             for g, p in planted["patients"].items()}
    rows = sorted(files, key=files.get)  # the inclusion rows (hence the query's order): smallest study first
    (tmp_path / "inclusions.csv").write_text("patient_id,subject\n" + "".join(
        f"{p['patient_id']},{p['subject']}\n" for s in rows for p in planted["patients"].values() if p["subject"] == s))
    assert len(rows) >= 3 and files[rows[0]] < files[rows[-1]]
    submitted, real = [], extract.submit_study
    monkeypatch.setattr(extract, "submit_study", lambda runner, spec, study, ctx: (
        submitted.append(study.subject), real(runner, spec, study, ctx))[1])
    monkeypatch.setenv("PACS2BIDS_TIMELINE", "1")
    summary = run_extraction(spec, monkeypatch)
    assert summary["state"] == "completed", summary
    assert submitted == sorted(rows, key=lambda s: -files[s]), (submitted, files)
    timeline = summary["timeline"]
    assert [t["study"].split("_")[0] for t in timeline] == [f"sub-{s}" for s in submitted]
    assert [t["instances"] for t in timeline] == sorted((t["instances"] for t in timeline), reverse=True)
    for t in timeline:
        assert 0 <= t["retrieve"][0] <= t["retrieve"][1] <= t["pseudonymise"][1] <= t["convert"][1], t


def test_a_study_whose_pixels_are_read_by_ocr_goes_before_larger_ordinary_ones():
    """One ultrasound instance costs seconds of OCR (the 1-instance study ended the shared corpus's
    run, submitted last): it counts as OCR_INSTANCES instances."""
    us = StudyRef(7, "07", None, "1.2.7", series=[SeriesRef("1.2.7", "1.2.7.1", "US", 1, "", 1)])
    studies = [_study(1, 1000), _study(2, 50), us, _study(3, 1)]
    assert longest_first(studies) == [0, 2, 1, 3]


def test_a_study_holding_secondary_captures_under_another_modality_counts_their_ocr():
    """The shared corpus's CT exam summary: 6 Secondary Capture images with Modality CT (and a
    1-image CT localizer), OCR'd for seconds, was submitted twelfth of 14 and ended the run. The
    PACS's SOPClassesInStudy (C-FIND) names the class: its small series count as OCR'd."""
    sc = StudyRef(8, "08", None, "1.2.8", series=[SeriesRef("1.2.8", "1.2.8.1", "CT", 1, "", 6),
                                                  SeriesRef("1.2.8", "1.2.8.2", "CT", 2, "", 1)],
                  sop_classes=("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"))
    plain = StudyRef(9, "09", None, "1.2.9", series=list(sc.series), sop_classes=("1.2.840.10008.5.1.4.1.1.2",))
    studies = [_study(1, 1000), _study(2, 200, 300), plain, sc]
    assert study_cost(sc) == 700 and study_cost(plain) == 7
    assert longest_first(studies) == [0, 3, 1, 2]
    # a large series of such a study is not taken for screenshots
    big = StudyRef(10, "10", None, "1.2.10", series=[SeriesRef("1.2.10", "1.2.10.1", "CT", 1, "", 400)],
                   sop_classes=sc.sop_classes)
    assert study_cost(big) == 400
    # each series' class known (QIDO-RS of Orthanc): exactly the Secondary Capture series counts
    exact = StudyRef(11, "11", None, "1.2.11", series=[
        SeriesRef("1.2.11", "1.2.11.1", "CT", 1, "", 6, "1.2.840.10008.5.1.4.1.1.7"),
        SeriesRef("1.2.11", "1.2.11.2", "CT", 2, "", 1, "1.2.840.10008.5.1.4.1.1.2")])
    assert study_cost(exact) == 601
