"""The deployment in deployments/prefect.yaml points at the real flow, with parameters it takes.

Loaded with Prefect's own loader (the one ``prefect deploy`` uses), so a moved file, a renamed
function or a parameter the flow no longer takes fails here, not on the first scheduled run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_entrypoint_is_the_extract_flow(deployment, monkeypatch):
    from prefect.flows import Flow, load_flow_from_entrypoint

    from pacs2bids.flows.extract import extract_project

    monkeypatch.chdir(ROOT)  # entrypoints are relative to the project root, where `prefect deploy` runs
    path, _, name = deployment["entrypoint"].partition(":")
    assert (ROOT / path).is_file(), f"entrypoint file {path} of deployment {deployment['name']} does not exist"
    loaded = load_flow_from_entrypoint(deployment["entrypoint"])
    assert isinstance(loaded, Flow)
    assert name == "extract_project" and loaded.name == "extract_project"
    # the file the package runs, not a copy of it
    assert Path(loaded.fn.__code__.co_filename).resolve() == Path(extract_project.fn.__code__.co_filename).resolve()


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_parameters_match_the_flow_schema(deployment, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    schema = load_flow_from_entrypoint(deployment["entrypoint"]).parameters.model_dump()
    given = deployment.get("parameters") or {}
    unknown = set(given) - set(schema["properties"])
    assert not unknown, f"deployment {deployment['name']} passes parameters the flow does not take: {unknown}"
    missing = set(schema.get("required", [])) - set(given)
    assert not missing, f"deployment {deployment['name']} lacks required parameters {missing}"
    for key, value in given.items():
        if schema["properties"][key].get("type") == "string":
            assert isinstance(value, str), f"{key}: a string is expected, the deployment gives {value!r}"


def test_a_broken_entrypoint_is_refused(monkeypatch):
    """The loader this file relies on does refuse a wrong name (so the tests above can fail)."""
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    path = _deployments()[0]["entrypoint"].partition(":")[0]
    with pytest.raises(Exception):
        load_flow_from_entrypoint(f"{path}:no_such_flow")
