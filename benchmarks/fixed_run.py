"""One ``pacs2bids run``, phase by phase: where its fixed seconds go (issue 12). Used by ``bench_fixed.py --run``.

    .venv/bin/python benchmarks/fixed_run.py SPEC OUT.json      # one timed run, in this process
    .venv/bin/python benchmarks/fixed_run.py --first-call 5     # a first flow call, before_the_server off/on

:func:`timed_run` takes ``launch.run_spec`` apart in its own order (Prefect settings, Prefect's server module, the
early server start, the flow's imports, the wait for the server, the flow run) and times each phase; inside the
flow, the phases come from the summary's ``stage_seconds`` and from wrappers around the flow's body and its
``_extract_studies``. Every HTTP request of Prefect's client is counted, with its seconds, by kind. The run is the
same as ``pacs2bids run SPEC``'s: nothing is skipped or stubbed.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

# -- one `pacs2bids run`, phase by phase (issue 12: where the fixed seconds go) ------------------------------------
FLOW_STAGES = ("released", "finalise", "qc", "validate", "lineage", "leak_scan", "publish")


def _count_api(counts: dict) -> None:
    """Count the Prefect client's HTTP requests and add up their seconds (threads overlap: a sum, not a span)."""
    from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient

    real_async, real_sync = PrefectHttpxAsyncClient.send, PrefectHttpxSyncClient.send

    def note(request, started: float) -> None:
        key = f"{request.method} {'/'.join(p for p in request.url.path.split('/')[2:4] if '-' not in p)}"
        n, s = counts.get(key, (0, 0.0))
        counts[key] = (n + 1, s + time.perf_counter() - started)

    async def send_async(self, request, *a, **kw):
        t = time.perf_counter()
        try:
            return await real_async(self, request, *a, **kw)
        finally:
            note(request, t)

    def send_sync(self, request, *a, **kw):
        t = time.perf_counter()
        try:
            return real_sync(self, request, *a, **kw)
        finally:
            note(request, t)

    PrefectHttpxAsyncClient.send, PrefectHttpxSyncClient.send = send_async, send_sync


def _lap(marks: dict, key: str, since: float) -> float:
    now = time.perf_counter()
    marks[key] = round(now - since, 3)
    return now


def timed_run(spec_path: Path) -> dict:
    """``launch.run_spec`` taken apart, in this process, each phase timed in its order (the run itself is the
    same: same settings, same server start, same flow); prints nothing, returns the phases."""
    t0 = t = time.perf_counter()
    marks: dict = {}
    from pacs2bids import launch, prefectserver

    t = _lap(marks, "import pacs2bids (launch, config)", t)
    skips_migrations = launch._prefect_defaults()
    if hasattr(launch, "load_spec"):  # older trees: the spec read (pydantic imported) before the server's start
        launch.load_spec(spec_path)
        t = _lap(marks, "Prefect settings, spec read", t)
        server = prefectserver.start()
        t = _lap(marks, "start Prefect's server process", t)
    else:  # the server first, then the spec (issue 12, session 15)
        server = prefectserver.start()
        from pacs2bids.config import load_spec

        load_spec(spec_path)
        t = _lap(marks, "Prefect settings, spec read", t)
    from pacs2bids.flows import extract

    t = _lap(marks, "import the flow's modules (server starting meanwhile)", t)
    if hasattr(launch, "before_the_server"):  # as run_spec does since session 15: before the wait for the server
        launch.before_the_server()
        t = _lap(marks, "versions, Prefect's engines imported (server starting meanwhile)", t)
    with prefectserver.serving(server):
        t = _lap(marks, "wait for the server after the imports", t)
        out = _timed_flow(extract, spec_path, marks, t, t0)
        t = time.perf_counter()
    _lap(marks, "drain Prefect's workers, stop the server", t)
    if not skips_migrations:
        launch._record_migrated()
    out["phases"], out["total_in_process"] = marks, round(time.perf_counter() - t0, 3)
    return out


def _timed_flow(extract, spec_path: Path, marks: dict, t: float, t0: float) -> dict:
    counts: dict = {}
    _count_api(counts)
    inside: dict = {}
    real_studies, real_fn = extract._extract_studies, extract.extract_project.fn

    before = set(sys.modules)

    def studies(*a, **kw):
        inside["studies_in"] = time.perf_counter()
        inside["late_modules"] = sorted(set(sys.modules) - before)
        try:
            return real_studies(*a, **kw)
        finally:
            inside["studies_out"] = time.perf_counter()

    @functools.wraps(real_fn)
    def body(*a, **kw):
        inside["in"] = time.perf_counter()
        try:
            return real_fn(*a, **kw)
        finally:
            inside["out"] = time.perf_counter()

    extract._extract_studies, extract.extract_project.fn = studies, body
    try:
        summary = extract.extract_project(str(spec_path))
    except extract.RunFailed as exc:
        summary = exc.summary
    end = time.perf_counter()
    stages = summary.get("stage_seconds") or {}
    marks["flow run created, until its body starts"] = round(inside["in"] - t, 3)
    marks["flow body: before the query (spec, versions, PACS limit, tags, staging)"] = round(
        inside["studies_in"] - inside["in"], 3)
    marks["query"] = stages.get("query", 0.0)
    marks["studies (retrieve, pseudonymise, convert: wall)"] = round(
        inside["studies_out"] - inside["studies_in"] - stages.get("query", 0.0), 3)
    for stage in FLOW_STAGES:
        if stage in stages:
            marks[stage] = stages[stage]
    after = inside["out"] - inside["studies_out"] - sum(stages.get(s, 0.0) for s in FLOW_STAGES)
    marks["flow body: the rest (summary, audit, artifacts, cleanup)"] = round(after, 3)
    marks["flow run finished, after its body"] = round(end - inside["out"], 3)
    late = inside.get("late_modules", [])
    modules = f"{len(late)}: " + ", ".join(sorted({m.split('.')[0] if not m.startswith('prefect') else m for m in late}))
    return {"phases": marks, "total_in_process": round(end - t0, 3), "state": summary.get("state"),
            "modules imported once the server answered, before the studies": modules,
            "api_requests": {k: [n, round(s, 3)] for k, (n, s) in sorted(counts.items())}}


def _time_the_exit(marks: dict) -> None:
    """Mark the stages of the interpreter's exit in ``marks``: Prefect's services drained and the other
    threads joined (``threading`` shutdown), then the ``atexit`` handlers (the last one written here runs last:
    it was registered first, before Prefect's)."""
    import atexit
    import threading

    def at(key):
        return lambda: marks.setdefault(key, time.perf_counter())

    threading._register_atexit(at("threading shutdown begins"))  # runs first: registered last
    atexit.register(at("atexit handlers begin"))  # runs first of the atexit handlers: registered last
    marks["main returned"] = time.perf_counter()


# -- the first flow call once the server answers, with and without launch.before_the_server (session 15) --------
FIRST_CALL = """
import os, sys, time
from pacs2bids import launch, prefectserver
launch._prefect_defaults()
server = prefectserver.start()
import pacs2bids.flows.extract
from prefect import flow, task
if sys.argv[1] == "on":
    launch.before_the_server()
from pacs2bids.tasks import TASK_DEFAULTS
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
inside = {}

@task(name="one", **TASK_DEFAULTS)
def one(x):
    return x

@flow(name="first-call", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def first_call(spec_path: str) -> dict:
    inside["body"], inside["body_cpu"] = time.perf_counter(), time.process_time()
    get_run_logger().info("a line")
    one(1)
    return {"n": one.submit(2).result()}

with prefectserver.serving(server):
    server.warmed.wait(60)
    time.sleep(1)  # the server idle: what is measured is the run's process
    t, c = time.perf_counter(), time.process_time()
    first_call("spec.yaml")
    print(inside["body"] - t, inside["body_cpu"] - c, time.perf_counter() - t, time.process_time() - c)
"""


def first_calls(rounds: int) -> str:
    """A first flow call (a flow run with a log line, a task called and one submitted) in a new process, once
    its server answered and idled, after ``launch.before_the_server`` (on) or not (off), alternating: seconds
    and CPU seconds of the run's process until the flow's body starts, and until the flow returned."""
    import os
    import statistics
    import subprocess
    import tempfile

    env = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(prefix="first-call-")}
    got: dict = {"off": [], "on": []}
    for i in range(rounds * 2 + 1):
        mode = ("off", "on")[i % 2]
        done = subprocess.run([sys.executable, "-c", FIRST_CALL, mode], env=env, capture_output=True, text=True,
                              timeout=900)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        if i:  # the first process creates the database
            got[mode].append([float(v) for v in done.stdout.split()[-4:]])
    lines = ["| first flow call (median of %d) | to its body s | CPU s | whole call s | CPU s |" % rounds,
             "| --- | ---: | ---: | ---: | ---: |"]
    for mode in ("off", "on"):
        cols = [statistics.median(r[k] for r in got[mode]) for k in range(4)]
        lines.append(f"| before_the_server {mode} | " + " | ".join(f"{v:.3f}" for v in cols) + " |")
    return "\n".join(lines) + "\n\nrounds: " + json.dumps(got)


if __name__ == "__main__" and sys.argv[1] == "--first-call":
    print(first_calls(int(sys.argv[2])))
elif __name__ == "__main__":
    import atexit

    exit_marks: dict = {}
    exit_file = Path(sys.argv[2]).with_suffix(".exit.json")
    atexit.register(lambda: exit_file.write_text(json.dumps({**exit_marks, "atexit handlers end": time.perf_counter()})))
    out = timed_run(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(out, indent=2))
    _time_the_exit(exit_marks)
    from pacs2bids import launch

    if hasattr(launch, "end_process"):  # as `pacs2bids run` ends its process (issue 12); older trees: as they did
        launch.end_process(0)
