"""The deployments in deployments/prefect.yaml point at the real flows, with parameters they take.

Loaded with Prefect's own loader (the one ``prefect deploy`` uses), so a moved file, a renamed
function or a parameter the flow no longer takes fails here, not on the first scheduled run.
An entrypoint whose file is not in the tree yet is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def _present(deployment: dict) -> str:
    """The entrypoint, once its file is known to exist (else skip; under CI=true, fail)."""
    path = deployment["entrypoint"].partition(":")[0]
    if not (ROOT / path).is_file():
        message = f"entrypoint file {path} of deployment {deployment['name']} does not exist"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return deployment["entrypoint"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_entrypoint_is_the_package_flow(deployment, monkeypatch):
    from prefect.flows import Flow, load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # entrypoints are relative to the project root, where `prefect deploy` runs
    entrypoint = _present(deployment)
    path, _, name = entrypoint.partition(":")
    loaded = load_flow_from_entrypoint(entrypoint)
    assert isinstance(loaded, Flow)
    assert loaded.name == name, f"{entrypoint}: the flow is named {loaded.name!r}, not {name!r}"
    # the file the package runs (pacs2bids.flows.<module>), not a copy of it
    packaged = getattr(importlib.import_module(f"pacs2bids.flows.{Path(path).stem}"), name)
    assert Path(loaded.fn.__code__.co_filename).resolve() == Path(packaged.fn.__code__.co_filename).resolve()


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_parameters_match_the_flow_schema(deployment, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    schema = load_flow_from_entrypoint(_present(deployment)).parameters.model_dump()
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


def test_extraction_is_on_demand_replication_and_purge_are_scheduled():
    by_name = {d["name"]: d for d in _deployments()}
    assert not by_name["extract-project"].get("schedules"), "extraction runs on demand"
    assert not by_name["reintegrate-derivative"].get("schedules"), "reintegration runs on demand"
    for name in ("replicate-project", "purge-project"):
        assert by_name[name].get("schedules"), f"{name} has no schedule"
    assert all(d["work_pool"]["name"] == "pacs2bids" for d in by_name.values())


@pytest.mark.parametrize("deployment", [d for d in _deployments() if d.get("schedules")], ids=lambda d: d["name"])
def test_schedules_are_valid_prefect_cron_schedules_with_a_timezone(deployment):
    """Prefect's own schedule model parses them (a bad cron or timezone fails here, not at deploy)."""
    from prefect.client.schemas.schedules import CronSchedule

    for entry in deployment["schedules"]:
        assert entry.get("timezone"), f"{deployment['name']}: give each schedule the PACS's timezone"
        CronSchedule(cron=entry["cron"], timezone=entry["timezone"])


def test_replication_starts_inside_the_retrieval_windows_the_file_documents():
    """The replicate crons fire inside the windows named in the file's header: nights 20:00-06:00
    on week days, and the week-end from Saturday 08:00 to Monday 06:00 (Europe/Paris)."""
    from datetime import datetime, time
    from zoneinfo import ZoneInfo

    import asyncio

    from prefect.server.schemas.schedules import CronSchedule  # the one the scheduler service uses

    from pacs2bids.windows import is_open

    class W:
        def __init__(self, days, start, end):
            self.days, self.start, self.end = days, time.fromisoformat(start), time.fromisoformat(end)

    windows = [W(["mon", "tue", "wed", "thu", "fri"], "20:00", "06:00"), W(["sat"], "08:00", "23:59"),
               W(["sun"], "00:00", "23:59"), W(["mon"], "00:00", "06:00")]
    replicate = next(d for d in _deployments() if d["name"] == "replicate-project")
    tz = ZoneInfo("Europe/Paris")
    start = datetime(2026, 1, 1, tzinfo=tz)
    for entry in replicate["schedules"]:
        assert entry["timezone"] == "Europe/Paris"
        schedule = CronSchedule(cron=entry["cron"], timezone=entry["timezone"])
        fires = asyncio.run(schedule.get_dates(n=30, start=start))
        assert len(fires) == 30
        for moment in fires:
            local = moment.astimezone(tz).replace(tzinfo=None)
            assert is_open(windows, local), f"{entry['cron']} fires at {local}, outside the PACS's windows"
