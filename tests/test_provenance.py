"""Provenance in W3C PROV terms (issue 15): the per-series and per-run records (BEP028 JSON-LD under
``prov/``), derivative dataset descriptions, and ``pacs2bids lineage FILE`` telling the same story.

The end-to-end part extracts the bundled sample, with planted identities, from a real Orthanc
through the real flow, then reads the published dataset's records back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pacs2bids.bids.dataset import derivative_description, write_derivative_description
from pacs2bids.bids.provenance import write_run_provenance, write_series_provenance
from pacs2bids.checksum import sha256_file
from pacs2bids.orthanc import Orthanc
from pacs2bids.provdoc import BEP028_CONTEXT, index, read_records
from pacs2bids.validate import validate_dataset

from test_extract_e2e import SECRET, assert_nothing_leaks, identifying_values, plant_corpus, write_spec


def brain_mask(path: Path) -> Path:
    """A small real NIfTI mask (a BIDS derivative file)."""
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.uint8), np.eye(4)).to_filename(path)
    return path


def _series_files(root: Path) -> tuple[list[Path], list[Path]]:
    src = root / "sourcedata" / "sub-01" / "001-abc"
    src.mkdir(parents=True)
    instances = []
    for i in range(3):
        (src / f"2.25.{i}.dcm").write_bytes(b"DICM" + bytes([i]) * 100)
        instances.append(src / f"2.25.{i}.dcm")
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_T1w.nii.gz").write_bytes(b"nifti")
    (anat / "sub-01_T1w.json").write_text("{}")
    return instances, [anat / "sub-01_T1w.nii.gz", anat / "sub-01_T1w.json"]


def test_series_record_is_w3c_prov_in_bep028_terms(tmp_path, monkeypatch):
    monkeypatch.setenv("PACS2BIDS_OPERATOR", "team-imaging")
    instances, outputs = _series_files(tmp_path)
    path = write_series_provenance(
        tmp_path / "prov" / "sub-01" / "prov-series1.jsonld", pseudo_study_uid="2.25.1", pseudo_series_uid="2.25.2",
        instance_count=3, instances=instances, outputs=outputs, bids_root=tmp_path, heuristic="auto",
        flow_run_id="f00d", run_id="r1", started="2026-01-01T10:00:00+00:00", finished="2026-01-01T10:05:00+00:00",
        stages={"retrieve": {"started": "2026-01-01T10:00:00+00:00", "ended": "2026-01-01T10:01:00+00:00",
                             "parameters": {"transport": "c-get"}}}, extra={})
    doc = json.loads(path.read_text())
    assert doc["@context"][0] == BEP028_CONTEXT
    assert set(doc["Records"]) == {"Software", "Agents", "Activities", "Entities"}
    nodes = index([doc])
    acts = {n["Label"]: n for n in nodes.values() if n["_kind"] == "Activities"}
    assert set(acts) == {"retrieve", "pseudonymise", "convert"}
    assert acts["retrieve"]["Parameters"] == {"transport": "c-get"}
    assert acts["retrieve"]["EndedAtTime"] == "2026-01-01T10:01:00+00:00"
    assert acts["convert"]["StartedAtTime"] == "2026-01-01T10:00:00+00:00"  # not given: the run's times
    assert acts["convert"]["Parameters"]["heuristic"] == "auto"
    tools = {nodes[a]["Label"] for a in acts["convert"]["AssociatedWith"]}
    assert {"dcm2niix", "pacs2bids", "team-imaging", "Prefect flow run f00d"} <= tools
    series = nodes["urn:dicom:uid:2.25.2"]
    assert series["InstanceCount"] == 3 and series["AtLocation"] == "sourcedata/sub-01/001-abc"
    assert len(series["Digest"]["sha256-of-instance-sha256s"]) == 64
    assert series["GeneratedBy"] == acts["pseudonymise"]["Id"] and acts["convert"]["Used"] == [series["Id"]]
    for out in outputs:
        e = nodes[f"bids::{out.relative_to(tmp_path).as_posix()}"]
        assert e["Digest"] == {"sha256": sha256_file(out)} and e["GeneratedBy"] == acts["convert"]["Id"]
        assert e["DerivedFrom"] == [series["Id"]]
    # the run record ties the run's series records together
    run = json.loads(write_run_provenance(tmp_path, run_id="r1", flow_run_id="f00d", started="x",
                                          parameters={"project": "p"}).read_text())
    members = next(n for n in run["Records"]["Entities"] if n["Label"] == "BIDS dataset version")["HadMember"]
    assert members == ["bids::prov/sub-01/prov-series1.jsonld"]
    assert write_run_provenance(tmp_path, run_id="r2", flow_run_id=None, started="x", parameters={}).exists()
    assert [p.name for p, _ in read_records(tmp_path)] == ["prov-run-r1.jsonld", "prov-run-r2.jsonld",
                                                             "prov-series1.jsonld"]


def test_derivative_description_passes_the_validator(tmp_path):
    with pytest.raises(ValueError, match="GeneratedBy"):
        derivative_description("x", generated_by=[])
    root = tmp_path / "deriv"
    (root / "sub-01" / "anat").mkdir(parents=True)
    write_derivative_description(root, "seg", generated_by=[{"Name": "fastsurfer", "Version": "2.0"}])
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["SourceDatasets"] and desc["GeneratedBy"]
    brain_mask(root / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")
    report = validate_dataset(root)
    assert not report.errors, report.errors


# -- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extracted(prefect_harness, sample_dir, tmp_path_factory):
    """The bundled sample, planted, extracted once from a real Orthanc by the real flow."""
    tmp = tmp_path_factory.mktemp("prov-e2e")
    planted = plant_corpus(sample_dir, tmp / "planted")
    pacs = Orthanc(workdir=tmp / "orthanc").start()
    try:
        assert pacs.upload(f for files in planted["by_series"].values() for f in files) > 0
        out = tmp / "out" / "dataset"
        spec = write_spec(tmp, f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs.dicom_port}, "
                               "retrieve: c-get}\n", planted, out)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
            mp.setenv("PACS2BIDS_OPERATOR", "operator-e2e")
            from pacs2bids.flows.extract import extract_project

            summary = extract_project(str(spec))
    finally:
        pacs.stop()
    assert summary["published"], summary
    return out, planted, spec


def test_every_published_image_has_its_prov_story(extracted):
    out, planted, _ = extracted
    records = read_records(out)
    nodes = index(doc for _, doc in records)
    located = {n["AtLocation"]: n for n in nodes.values() if n["_kind"] == "Entities" and n.get("AtLocation")}
    images = sorted(out.glob("sub-*/**/*.nii.gz"))
    assert images
    for image in images:
        e = located[image.relative_to(out).as_posix()]
        assert e["Digest"]["sha256"] == sha256_file(image)
        series = nodes[e["DerivedFrom"][0]]
        assert series["InstanceCount"] >= 1 and (out / series["AtLocation"]).is_dir()
        convert = nodes[e["GeneratedBy"]]
        assert convert["StartedAtTime"] <= convert["EndedAtTime"]
        assert {nodes[a]["Label"] for a in convert["AssociatedWith"]} >= {"pacs2bids", "operator-e2e", "dcm2niix"}
    run = [doc for p, doc in records if p.name.startswith("prov-run-")]
    assert len(run) == 1
    version = next(n for n in run[0]["Records"]["Entities"] if n["Label"] == "BIDS dataset version")
    assert len(version["HadMember"]) == len([p for p, _ in records if p.name.startswith("prov-series")])
    assert validate_dataset(out).ok
    assert_nothing_leaks(out / "prov", identifying_values(planted))


def test_lineage_command_shows_the_prov_story(extracted):
    out, _, _ = extracted
    image = next(out.glob("sub-*/**/*.nii.gz"))
    shown = subprocess.run([sys.executable, "-m", "pacs2bids.cli", "lineage", str(image)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "PROV record prov/" in text and sha256_file(image) in text
    for stage in ("activity convert", "activity pseudonymise", "activity retrieve"):
        assert stage in text, text
    assert "operator-e2e" in text and "instance(s)" in text


def test_a_later_stage_is_one_call_and_lineage_follows_it_back(tmp_path, monkeypatch):
    """What deface or QC will call: its record links to the series record through the input file."""
    from pacs2bids.provdoc import record_stage

    (tmp_path / ".pacs2bids" / "lineage").mkdir(parents=True)  # a pacs2bids dataset
    instances, outputs = _series_files(tmp_path)
    write_series_provenance(tmp_path / "prov" / "sub-01" / "prov-series1.jsonld", pseudo_study_uid="2.25.1",
                            pseudo_series_uid="2.25.2", instance_count=3, instances=instances, outputs=outputs,
                            bids_root=tmp_path, heuristic="auto", flow_run_id=None, started="t0", finished="t1",
                            extra={})
    defaced = brain_mask(tmp_path / "derivatives" / "pacs2bids-deface" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    path = record_stage(tmp_path, "deface", tool="pydeface", version="2.0.2", inputs=[outputs[0]], outputs=[defaced],
                        started="t2", ended="t3", parameters={"template": "mni"}, run_id="r9")
    assert path.name == "prov-deface-r9.jsonld"
    shown = subprocess.run([sys.executable, "-m", "pacs2bids.cli", "lineage", str(defaced)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "activity deface by pydeface 2.0.2" in text and '{"template": "mni"}' in text
    # through the raw image, back to its conversion, pseudonymisation and retrieval (the series record)
    assert "used bids::sub-01/anat/sub-01_T1w.nii.gz" in text
    for stage in ("activity convert", "activity pseudonymise", "activity retrieve"):
        assert stage in text, text
