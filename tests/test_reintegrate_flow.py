"""Reintegration as a Prefect flow (issue 14): ``reintegrate_derivative`` run through Prefect's
ephemeral backend (the session's harness) on a project dataset extracted by the real flow
(tests/test_provenance.py's module fixture). Its run is named ``<project>/reintegrate-<run id>``
and tagged with the project; the version it publishes carries that run id; it is audited as the
command is, and a refusal fails the run with nothing published."""

from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client

from pacs2bids import audit
from pacs2bids.config import load_spec
from pacs2bids.flows.reintegrate import reintegrate_derivative
from pacs2bids.publish import current_version

import test_provenance
from test_extract_e2e import SECRET
from test_reintegrate import PRODUCER, results

extracted = test_provenance.extracted  # the module fixture: the project dataset, extracted by the real flow


@pytest.fixture
def project(extracted, monkeypatch):
    out, _, spec_path = extracted
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    spec = load_spec(spec_path)
    return spec, spec_path, sorted(p.name for p in out.glob("sub-*") if p.is_dir())


def _flow_run(state):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def _entries(spec, outcome: str) -> list[dict]:
    v = audit.verify(spec)
    assert v.intact, v.broken
    return [e.record for e in v.entries if e.record.get("action") == "reintegrate" and e.record["outcome"] == outcome]


def test_the_flow_publishes_the_derivative_in_a_run_named_after_the_project(project, tmp_path):
    spec, spec_path, subjects = project
    before = current_version(spec.output)
    folder = results(tmp_path / "seg", subjects)
    producer_file = tmp_path / "producer.json"
    producer_file.write_text(json.dumps({"name": PRODUCER.name, "tool": PRODUCER.tool,
                                         "tool_version": PRODUCER.tool_version, "method": PRODUCER.method}))
    state = reintegrate_derivative(str(spec_path), str(folder), producer_file=str(producer_file), return_state=True)
    assert state.is_completed(), state
    got = state.result()
    run = _flow_run(state)
    assert run.name == f"{spec.project}/reintegrate-{got['run_id']}" and spec.project in run.tags
    assert got["run_id"].endswith(str(run.id)[:8])
    after = current_version(spec.output)
    assert after != before and after.name == got["version"] == got["run_id"]
    assert got["derivative"] == "derivatives/segmentation" and got["subjects"] == len(subjects)
    assert (after / "derivatives" / "segmentation" / subjects[0] / "anat").is_dir()
    entry = _entries(spec, "published")[-1]
    assert entry["version"] == after.name and entry["producer"] == PRODUCER.name


def test_a_refused_derivative_fails_the_run_and_is_audited(project, tmp_path):
    spec, spec_path, subjects = project
    before = current_version(spec.output)
    refused = len(_entries(spec, "refused"))
    folder = results(tmp_path / "r", [subjects[0], "sub-zz99"])
    state = reintegrate_derivative(str(spec_path), str(folder), producer=PRODUCER.name, tool=PRODUCER.tool,
                                   tool_version=PRODUCER.tool_version, method=PRODUCER.method, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="sub-zz99"):
        state.result()
    assert current_version(spec.output) == before
    assert len(_entries(spec, "refused")) == refused + 1
    assert _flow_run(state).name.startswith(f"{spec.project}/reintegrate-")


def test_a_run_without_a_derivative_path_says_what_to_give(project):
    _, spec_path, _ = project
    state = reintegrate_derivative(str(spec_path), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="give derivative_path"):
        state.result()
