"""The run's own Prefect server (:mod:`pacs2bids.prefectserver`, :mod:`pacs2bids.prefectapp`)
under concurrent writers, as in a run: leases of the PACS limit taken and given back, logs and
task runs written at once, on the one SQLite database. Prefect's own app begins those write
transactions DEFERRED and answers 503 when two meet (then its client waits 2 s: a small study
waited that long for its lease, issue 12); with our app every request is served, waiting for the
write lock instead. Measured here with Prefect's app under the same load: 17-18 of 20 lease
requests answered 503 in 10 s."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from pacs2bids import launch, prefectserver


@pytest.fixture
def run_server(tmp_path, monkeypatch):
    for var in ("PREFECT_API_DATABASE_MIGRATE_ON_START", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
                "PREFECT_SERVER_DATABASE_CONNECTION_URL", *launch.REPEAT_START):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    (tmp_path / "prefect").mkdir()
    server = prefectserver.RunServer()
    try:
        server.wait(180)
        yield server
    finally:
        server.stop()


def test_concurrent_writers_are_all_served_without_503(run_server):
    url = run_server.url
    with httpx.Client(base_url=url, timeout=120) as c:
        c.post("/v2/concurrency_limits/", json={"name": "pacs", "limit": 50, "active": True}).raise_for_status()
        flow = c.post("/flows/", json={"name": "f"}).raise_for_status().json()["id"]
        flow_run = c.post("/flow_runs/", json={"flow_id": flow, "name": "r"}).raise_for_status().json()["id"]
    statuses: list[int] = []
    leases, errors = [0], []
    lock = threading.Lock()
    stop = time.monotonic() + 4

    def leaser() -> None:  # what PrefectGate does per study: a lease taken, then given back
        with httpx.Client(base_url=url, timeout=120) as cl:
            while time.monotonic() < stop:
                r = cl.post("/v2/concurrency_limits/increment-with-lease",
                            json={"names": ["pacs"], "slots": 1, "mode": "concurrency", "lease_duration": 60})
                with lock:
                    statuses.append(r.status_code)
                if r.status_code == 200:
                    cl.post("/v2/concurrency_limits/decrement-with-lease",
                            json={"lease_id": r.json()["lease_id"]}).raise_for_status()
                    with lock:
                        leases[0] += 1

    def logger() -> None:  # the run's logs, sent in batches
        with httpx.Client(base_url=url, timeout=120) as cl:
            while time.monotonic() < stop:
                r = cl.post("/logs/", json=[{"name": "pacs2bids", "level": 20, "message": "x" * 200,
                                             "timestamp": "2026-12-02T00:00:00Z", "flow_run_id": flow_run}] * 20)
                with lock:
                    statuses.append(r.status_code)

    def tasker() -> None:  # task runs created
        with httpx.Client(base_url=url, timeout=120) as cl:
            i = 0
            while time.monotonic() < stop:
                i += 1
                r = cl.post("/task_runs/", json={"flow_run_id": flow_run, "name": "t", "dynamic_key": str(i),
                                                 "task_key": f"k-{threading.get_ident()}"})
                with lock:
                    statuses.append(r.status_code)

    def guarded(fn):
        def run():
            try:
                fn()
            except Exception as exc:  # a dropped connection is a failure of the server too
                errors.append(repr(exc))
        return run

    threads = [threading.Thread(target=guarded(f)) for f in (leaser, leaser, leaser, logger, logger, tasker, tasker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors
    assert statuses.count(503) == 0, f"{statuses.count(503)} of {len(statuses)} requests answered 503"
    assert set(statuses) <= {200, 201} and leases[0] >= 10


def test_the_patch_is_applied_once():
    from prefect.server.database import configurations

    from pacs2bids import prefectapp

    before = configurations.AioSqliteConfiguration.begin_transaction
    try:
        prefectapp.immediate_sqlite_transactions()
        patched = configurations.AioSqliteConfiguration.begin_transaction
        prefectapp.immediate_sqlite_transactions()
        assert configurations.AioSqliteConfiguration.begin_transaction is patched
        assert patched.pacs2bids_immediate and patched is not before
    finally:
        configurations.AioSqliteConfiguration.begin_transaction = before
