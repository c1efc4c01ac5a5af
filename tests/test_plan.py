"""``pacs2bids plan SPEC`` against a real Orthanc holding the bundled sample (identity planted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_extract_e2e import SECRET, identifying_values, plant_corpus, write_spec


@pytest.mark.slow
def test_plan_lists_every_series_without_identifiers(orthanc_factory, sample_dir, tmp_path):
    planted = plant_corpus(sample_dir, tmp_path / "planted")
    pacs = orthanc_factory()
    assert pacs.upload(f for files in planted["by_series"].values() for f in files) > 0
    out = tmp_path / "out" / "dataset"
    spec = write_spec(tmp_path, f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs.dicom_port}, "
                                f"retrieve: c-get}}\n", planted, out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS2BIDS_")}
    env["PACS2BIDS_PROJECT_SECRET"] = SECRET
    proc = subprocess.run([sys.executable, "-m", "pacs2bids.cli", "plan", str(spec)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    # every planted patient is a subject, each of its series has a line with a BIDS path or a reason
    subjects = {p["subject"] for p in planted["patients"].values()}
    for sub in subjects:
        assert f"sub-{sub}" in text, text
    lines = [l for l in text.splitlines() if l.startswith("  series ")]
    assert len(lines) >= len(planted["by_series"]), text
    # (dcm2niix -b o writes no .bval: telling diffusion from the sidecar alone is the classifier's job)
    assert any("/func/" in l and l.rstrip().endswith("_bold") for l in lines), text
    assert any("/fmap/" in l and "_fieldmap" in l for l in lines), text
    assert any("left out: " in l and "contrast unknown" in l for l in lines), text  # PACSMAN: no sequence
    # nothing published, no original identifier printed (stdout or stderr)
    assert not out.exists()
    both = (proc.stdout + proc.stderr).lower()
    leaks = [v for v in identifying_values(planted) if len(v) >= 6 and v.lower() in both]
    assert not leaks, leaks[:5]
    # the retrieved studies stay in the private work folder for the next run; no scratch is left
    work = out.parent / f".{out.name}.pacs2bids-work"
    assert list((work / "raw").rglob("*.dcm"))
    assert not (work / "plan-scratch").exists()


@pytest.mark.corpus
def test_plan_session_says_what_conversion_does(corpus_dir, tmp_path):
    """The plan shows the same verdicts as the conversion: stacked series with their run, a split
    series left out with its reason, non-image objects left out."""
    from _bidscheck import copy_decompressed
    from pacs2bids.plan import Plan, plan_session

    xa = copy_decompressed(corpus_dir / "dcm_qa_xa30i" / "In", tmp_path / "xa")
    folders = sorted(p for p in xa.iterdir() if p.is_dir())
    ts = copy_decompressed(corpus_dir / "dcm_qa_ts" / "In", tmp_path / "ts")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    planned = plan_session(folders, "x", "1", scratch)
    by_number = {p.series_number: p for p in planned.series}
    (run,) = by_number[7001].paths
    assert run.startswith("sub-x/ses-1/func/sub-x_ses-1_task-unknown") and run.endswith("_bold")
    assert by_number[7005].paths == by_number[7001].paths and "stacked by dcm2niix with series 7001" in by_number[7005].reason
    assert not by_number[99].paths and "non-image" in by_number[99].reason
    split = plan_session([ts], "t", None, scratch)
    (only,) = split.series
    assert not only.paths and "split this series into 9 images" in only.reason
    text = "\n".join(Plan([planned, split]).lines())
    assert f"  series 7005: {run}  (stacked by dcm2niix with series 7001)" in text
    assert "left out: dcm2niix split this series" in text
    assert not list(scratch.iterdir())
