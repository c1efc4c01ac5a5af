"""Tertiary reintegration (issue 15): a researcher's derivative dataset checked, then published as a new
version of the project dataset under ``derivatives/<name>/`` with its producer in the PROV record.

The project dataset is made by the real flow from the bundled sample with planted identities (the
module fixture of tests/test_provenance.py); every refusal is checked to leave the published version
as it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pacs2bids.bids.dataset import write_derivative_description
from pacs2bids.config import load_spec
from pacs2bids.errors import LeakDetected
from pacs2bids.provdoc import index, read_records
from pacs2bids.publish import current_version
from pacs2bids.reintegrate import Producer, ReintegrationRefused, reintegrate
from pacs2bids.validate import validate_dataset

import test_provenance
from test_extract_e2e import SECRET
from test_provenance import brain_mask

extracted = test_provenance.extracted  # the module fixture: the project dataset, extracted by the real flow

PRODUCER = Producer("Team Segmentation", "fastsurfer", "2.4.2", "FastSurferCNN whole-brain segmentation")


def results(root: Path, subjects: list[str]) -> Path:
    """A researcher's derivative dataset: one brain mask per subject."""
    write_derivative_description(root, "segmentation", generated_by=[{"Name": "fastsurfer", "Version": "2.4.2"}])
    for s in subjects:
        brain_mask(root / s / "anat" / f"{s}_desc-brain_mask.nii.gz")
    return root


@pytest.fixture
def project(extracted, monkeypatch):
    out, planted, spec_path = extracted
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    spec = load_spec(spec_path)
    subjects = sorted(p.name for p in out.glob("sub-*") if p.is_dir())
    return spec, out, planted, subjects


def _refused(spec, folder, producer=PRODUCER, match="", exc=ReintegrationRefused):
    before = current_version(spec.output)
    with pytest.raises(exc, match=match):
        reintegrate(spec, folder, producer)
    assert current_version(spec.output) == before  # nothing changed
    assert not [d for d in (before / "derivatives").glob("*") if not d.name.startswith("pacs2bids-")]  # ours only


def _audited(spec, outcome: str) -> list[dict]:
    """The reintegration entries of the project's operations audit log with ``outcome`` (chain verified)."""
    from pacs2bids import audit

    v = audit.verify(spec)
    assert v.intact, v.broken
    return [e.record for e in v.entries if e.record.get("action") == "reintegrate" and e.record["outcome"] == outcome]


def test_refuses_a_foreign_subject(project, tmp_path):
    spec, _, _, subjects = project
    before = len(_audited(spec, "refused"))
    _refused(spec, results(tmp_path / "r", [subjects[0], "sub-zz99"]), match="sub-zz99")
    refused = _audited(spec, "refused")  # audited like an export: who tried, what kind of refusal
    assert len(refused) == before + 1 and refused[-1]["refusal"] == "ReintegrationRefused"
    assert refused[-1]["producer"] == PRODUCER.name and "sub-zz99" not in json.dumps(refused[-1])


def test_refuses_a_missing_producer(project, tmp_path):
    spec, _, _, subjects = project
    folder = results(tmp_path / "r", subjects[:1])
    _refused(spec, folder, Producer("Team Segmentation", "fastsurfer", "", ""), match="--tool-version, --method")
    before = current_version(spec.output)
    shown = subprocess.run([sys.executable, "-m", "pacs2bids.cli", "reintegrate", str(spec.output.parent.parent /
                            "spec.yaml"), str(folder), "--producer", "Team Segmentation", "--tool", "fastsurfer"],
                           capture_output=True, text=True, timeout=120, env=_env())
    assert shown.returncode == 1 and "--tool-version, --method" in shown.stderr, shown.stderr
    assert current_version(spec.output) == before


def test_refuses_an_identifying_value_in_a_sidecar_or_a_file_name(project, tmp_path):
    spec, _, planted, subjects = project
    patient = next(iter(planted["patients"].values()))
    folder = results(tmp_path / "r", subjects[:1])
    sidecar = folder / subjects[0] / "anat" / f"{subjects[0]}_desc-brain_mask.json"
    sidecar.write_text(json.dumps({"Description": f"mask of {patient['name'].replace('^', ' ')}"}))
    _refused(spec, folder, match="identifying value", exc=LeakDetected)
    sidecar.unlink()
    named = folder / subjects[0] / "anat" / f"{subjects[0]}_desc-{patient['patient_id']}_mask.nii.gz"
    brain_mask(named)
    _refused(spec, folder, match="file name", exc=LeakDetected)


def test_refuses_an_invalid_dataset(project, tmp_path):
    spec, _, _, subjects = project
    folder = results(tmp_path / "r", subjects[:1])
    (folder / subjects[0] / "anat" / "notes.txt").write_text("free text")
    _refused(spec, folder, match="not a valid BIDS derivative")
    raw = results(tmp_path / "raw", subjects[:1])
    desc = json.loads((raw / "dataset_description.json").read_text())
    (raw / "dataset_description.json").write_text(json.dumps({**desc, "DatasetType": "raw"}))
    _refused(spec, raw, match="DatasetType must be")
    with pytest.raises(ReintegrationRefused, match="pacs2bids' own"):  # a researcher never replaces the defaced images
        reintegrate(spec, folder, PRODUCER, name="pacs2bids-deface")


def test_publishes_a_new_version_with_its_producer(project, tmp_path):
    spec, out, _, subjects = project
    spec_path = out.parent.parent / "spec.yaml"
    before = current_version(out)
    folder = results(tmp_path / "seg", subjects)
    producer_file = tmp_path / "producer.json"
    producer_file.write_text(json.dumps({"name": PRODUCER.name, "tool": PRODUCER.tool,
                                         "tool_version": PRODUCER.tool_version, "method": PRODUCER.method}))
    shown = subprocess.run([sys.executable, "-m", "pacs2bids.cli", "reintegrate", str(spec_path), str(folder),
                            "--producer-file", str(producer_file)],
                           capture_output=True, text=True, timeout=600, env=_env())
    assert shown.returncode == 0, shown.stderr
    after = current_version(out)
    assert after != before and (before / subjects[0]).exists()  # the previous version is kept
    mask = out / "derivatives" / "segmentation" / subjects[0] / "anat" / f"{subjects[0]}_desc-brain_mask.nii.gz"
    assert mask.is_file() and (out / subjects[0]).is_dir()  # the dataset, plus the results
    assert validate_dataset(out).ok
    manifest = json.loads((out / ".pacs2bids" / "published.json").read_text())
    assert manifest["previous"] == before.name
    note = json.loads((out / ".pacs2bids" / "reintegrations" / f"{manifest['run_id']}.json").read_text())
    assert note["producer"]["tool"] == "fastsurfer" and note["subjects"] == subjects
    nodes = index(doc for _, doc in read_records(out))
    e = nodes[f"bids::{mask.relative_to(out).as_posix()}"]
    assert nodes[e["AttributedTo"]]["Label"] == PRODUCER.name
    assert nodes[e["GeneratedBy"]]["Parameters"] == {"method": PRODUCER.method}
    story = subprocess.run([sys.executable, "-m", "pacs2bids.cli", "lineage", str(mask)],
                           capture_output=True, text=True, timeout=120)
    assert story.returncode == 0 and PRODUCER.name in story.stdout and "fastsurfer 2.4.2" in story.stdout, story
    entry = _audited(spec, "published")[-1]  # the export of results into the project, audited
    assert entry["version"] == after.name and entry["producer"] == PRODUCER.name and entry["files"] == len(subjects) + 1
    assert entry["derivative"] == "derivatives/segmentation" and entry["tool"] == "fastsurfer 2.4.2"
    shutil.rmtree(folder)  # the dataset holds its own copy
    assert mask.is_file()


def _env() -> dict:
    import os

    return {**os.environ, "PACS2BIDS_PROJECT_SECRET": SECRET}
