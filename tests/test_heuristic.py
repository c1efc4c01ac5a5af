"""``heuristic: auto``: a shipped name whose naming is pacs2bids.convert.classify (no heudiconv), recorded by
the classifier's own checksum; a project's heudiconv heuristic is a file path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pacs2bids import convert
from pacs2bids.bids import layout, names
from pacs2bids.convert import auto, classify, dcm2niix, facts, rules
from pacs2bids.errors import ConversionError
from pacs2bids.heuristic_path import heuristic_file, heuristic_sha256


def test_auto_is_still_a_shipped_name():
    assert heuristic_file("auto").name == "auto.py"
    with pytest.raises(FileNotFoundError, match="shipped: auto"):
        heuristic_file("nosuch")


def test_auto_sha_follows_the_classifier_not_the_pointer():
    expected = hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                        for m in (facts, rules, classify, dcm2niix, auto, names, layout))).hexdigest()
    assert heuristic_sha256("auto") == expected
    assert heuristic_sha256("auto") != hashlib.sha256(heuristic_file("auto").read_bytes()).hexdigest()


def test_provenance_records_the_same_sha(tmp_path):
    from pacs2bids.bids.provenance import write_series_provenance

    (tmp_path / "a.nii.gz").write_bytes(b"x")
    now = datetime.now(timezone.utc)
    rec = json.loads(write_series_provenance(tmp_path / "p.json", pseudo_study_uid="2.25.1", pseudo_series_uid="2.25.2",
                                             instance_count=1, outputs=[tmp_path / "a.nii.gz"], bids_root=tmp_path,
                                             heuristic="auto", flow_run_id=None, started=now, finished=now,
                                             extra={}).read_text())
    convert = next(a for a in rec["Records"]["Activities"] if a["Label"] == "convert")  # W3C PROV record
    assert convert["Parameters"]["heuristic_sha256"] == heuristic_sha256("auto")


def test_the_pointer_refuses_to_be_run_by_heudiconv(sample_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("auto_pointer", heuristic_file("auto"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(RuntimeError, match="heuristic: auto"):
        mod.infotodict([])
    with pytest.raises(ConversionError, match="not a heudiconv heuristic"):
        convert.convert_session(sample_dir / "dcm_qa_ge", tmp_path / "bids", subject="01", session=None,
                                heuristic=str(heuristic_file("auto")), work_dir=tmp_path / "w")
