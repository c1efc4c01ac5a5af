"""Prefect's fixed costs at launch (issue 12): a database this Prefect version has migrated is not
migrated again by the next run's ephemeral server."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from pacs2bids import launch, prefectserver
from pacs2bids.dicomfiles import iter_dicom_files
from test_cli import cli, spec_for

MIGRATE = "PREFECT_API_DATABASE_MIGRATE_ON_START"


@pytest.fixture
def home(tmp_path, monkeypatch):
    for var in (MIGRATE, "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
                "PREFECT_SERVER_DATABASE_CONNECTION_URL", *launch.REPEAT_START):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    (tmp_path / "prefect").mkdir()
    yield tmp_path / "prefect"
    launch._unset_repeat_start()
    os.environ.pop(MIGRATE, None)


def test_migrations_are_skipped_only_for_a_database_this_version_migrated(home, monkeypatch):
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ  # no database yet
    (home / "prefect.db").write_bytes(b"")
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ  # no marker yet
    launch._record_migrated()
    assert (home / launch.MIGRATED).read_text().strip() == version("prefect")
    assert launch._prefect_defaults() is True and os.environ[MIGRATE] == "false"
    # nor are the block types registered again (loading every Prefect collection: ~1 s of the server's CPU)
    assert os.environ["PREFECT_API_BLOCKS_REGISTER_ON_START"] == "false"
    assert os.environ["PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION"] == "false"
    launch._unset_repeat_start()  # as run_spec does after the run (monkeypatch would restore it)
    assert not set(launch.REPEAT_START) & set(os.environ)
    (home / launch.MIGRATED).write_text("0.0.1\n")  # another Prefect version migrated it
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ
    launch._record_migrated()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a server of its own: not ours to touch
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ
    monkeypatch.delenv("PREFECT_API_URL")
    (home / "profiles.toml").write_text('[profiles.x]\nPREFECT_API_DATABASE_CONNECTION_URL = "postgresql://h/db"\n')
    assert launch._prefect_defaults() is False and MIGRATE not in os.environ


def test_a_second_run_skips_the_migrations_and_completes(tmp_path, orthanc_factory, sample_dir):
    """Two real runs on one PREFECT_HOME: the first migrates and records it, the second's server
    starts without migrating and the run completes."""
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = cli("run", str(spec_for(tmp_path / "a", pacs, "phantom")), env_extra=env)
    assert first.returncode in (0, 3), first.stdout + first.stderr[-3000:]
    assert (tmp_path / "prefect" / launch.MIGRATED).read_text().strip() == version("prefect")
    second = cli("run", str(spec_for(tmp_path / "b", pacs, "phantom")), env_extra=env)
    assert second.returncode in (0, 3), second.stdout + second.stderr[-3000:]
    for done in (first, second):  # Prefect's workers sent everything before the run's server stopped
        assert "Traceback" not in done.stderr and "Failed to send" not in done.stderr, done.stderr[-3000:]
        # one server, the run's own: no part of the run (the PACS limit's slots) fell back to an ephemeral one
        assert "Starting temporary server" not in done.stderr, done.stderr[-3000:]


OWN_SERVER = """
import sys, urllib.request
from pacs2bids import prefectserver
server = prefectserver.start()
import pacs2bids.flows.extract  # the flow's modules import while the server starts
from pacs2bids import launch
launch.before_the_server()
from prefect import flow, get_client
from prefect.logging import get_run_logger

@flow
def where() -> str:
    get_run_logger().info("a line for Prefect's log worker to send")
    return str(get_client(sync_client=True).api_url)

assert server.warmed.wait(300)  # answered /health and a first API read, before anyone waited for it
with prefectserver.serving(server):
    url = server.url
    before = set(sys.modules)
    assert where().rstrip("/") == url, (where(), url)
    late = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("fastapi", "starlette", "graphviz")
                  or m.startswith(("prefect.flow_engine", "prefect.task_engine")))
    assert not late, late  # imported before the server answered (launch.PREIMPORT), not by the first flow call
assert server.process is None  # stopped on leaving
try:
    urllib.request.urlopen(url + "/health", timeout=5)
    raise SystemExit("the server still answers")
except OSError:
    pass
assert "prefect.server.api.server" not in sys.modules  # the server's module is not imported in the run's process
print("own-server-ok")
"""


def test_the_run_starts_its_own_server_uses_it_and_stops_it(tmp_path):
    """The flow talks to the server started before the flow's import; after the run it is stopped, and
    Prefect's server module was never imported in the run's process (issue 12: fixed costs)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    done = subprocess.run([sys.executable, "-c", OWN_SERVER], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "own-server-ok" in done.stdout, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]  # the log worker sent its lines before the stop


def test_no_own_server_when_prefect_has_a_server_of_its_own_or_is_imported(home, monkeypatch):
    importlib.import_module("prefect")  # imported: a second run in this process leaves Prefect to start its own

    assert prefectserver.start() is None and "PREFECT_API_URL" not in os.environ
    monkeypatch.delitem(sys.modules, "prefect")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert prefectserver.start() is None
    monkeypatch.delenv("PREFECT_API_URL")
    (home / "profiles.toml").write_text('[profiles.x]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    assert prefectserver.start() is None


def test_a_server_that_cannot_start_is_named_with_the_fix(home, monkeypatch):
    """A fault the real server does not show on demand: a server command that exits at once (as uvicorn
    does when its port is taken). It is started three times, then the error names the setting to raise."""
    launched = []

    def launch(self):
        self.port = prefectserver._free_port()
        self.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        launched.append(self.port)

    monkeypatch.setattr(prefectserver.RunServer, "_launch", launch)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    server = prefectserver.RunServer()
    with pytest.raises(prefectserver.ServerFailed, match="PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        with prefectserver.serving(server):
            raise AssertionError("never inside")
    assert len(launched) == 3 and server.process is None and "PREFECT_API_URL" not in os.environ


ENDED = """
import atexit, logging, sys, threading, time
from pathlib import Path
out = Path(sys.argv[1])

class Freed:
    def __del__(self):  # runs only in the interpreter's finalisation (module globals freed)
        (out / "finalised").write_text("yes")

kept = Freed()
atexit.register(lambda: (out / "atexit").write_text("yes"))
handler = logging.FileHandler(out / "log.txt")
logging.getLogger("t").addHandler(handler)
logging.getLogger("t").warning("the last line")
threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("yes"))).start()
print("printed", end="")
{end}
"""


@pytest.mark.parametrize("end", ["from pacs2bids.launch import end_process; end_process(3)",
                                 "sys.argv = ['pacs2bids', 'run', str(out / 'missing.yaml')]\n"
                                 "from pacs2bids.cli import main; sys.exit(main())"])
def test_the_command_ends_its_process_without_finalisation_and_loses_nothing(tmp_path, end):
    """After the run returned, the command's process ends with os._exit (issue 12: the interpreter's
    finalisation took seconds): threads joined, atexit handlers run, logs and streams flushed first."""
    script = ENDED.replace("{end}", end)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert done.returncode == (3 if "end_process(3)" in end else launch.EXIT_USAGE), done.stderr[-3000:]
    assert done.stdout.startswith("printed")
    assert (tmp_path / "thread").read_text() == "yes" and (tmp_path / "atexit").read_text() == "yes"
    assert (tmp_path / "log.txt").read_text() == "the last line\n"
    assert not (tmp_path / "finalised").exists()  # no finalisation: the process ended with os._exit
    if "cli" in end:
        assert "missing.yaml" in done.stderr  # the command's message, flushed


FIRST = """
import os, subprocess, sys
from pacs2bids import prefectserver
seen = {}

def launch(self):  # records what the run's process had imported when it started the server
    seen["imported"] = sorted(m for m in ("pydantic", "pacs2bids.config", "yaml", "prefect") if m in sys.modules)
    self.port = prefectserver._free_port()
    self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    seen["process"] = self.process

def serving(server):  # the run's process waits for its server: what has it done before?
    from pacs2bids import versions

    seen["versions"] = versions._cached.cache_info().currsize * all(m in sys.modules for m in launch_.PREIMPORT)
    server.stop()
    os.environ.pop("PREFECT_API_URL")
    raise RuntimeError("stop here")

from pacs2bids import launch as launch_
prefectserver.RunServer._launch = launch
prefectserver.serving = serving
from pacs2bids.cli import main
code = main(["run", sys.argv[1]])
print(code, seen["imported"], seen["process"].poll() is not None, "PREFECT_API_URL" in os.environ,
      seen.get("versions"))
"""


def _first(tmp_path, spec) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PACS2BIDS_PROJECT_SECRET="launch-secret-0123456789abcdef")
    done = subprocess.run([sys.executable, "-c", FIRST, str(spec)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_server_starts_first_and_the_versions_are_read_while_it_starts(tmp_path):
    """``pacs2bids run`` starts Prefect's server first, before it imports the spec's models (pydantic) or
    Prefect (issue 12: the server's start-up is the run's longest fixed cost); before it waits for the server,
    it reads the tools' versions and imports what Prefect imports at a first flow call (not on the critical
    path, inside the flow). The server command is a stand-in that sleeps: the run's process is checked."""
    (tmp_path / "p").mkdir()
    spec = spec_for(tmp_path / "p", "{dicomweb: {url: 'http://127.0.0.1:9/dicom-web'}}", "X1")
    done = _first(tmp_path, spec)
    assert done.stdout.split() == [str(launch.EXIT_FAILED), "[]", "True", "False", "1"], \
        done.stdout + done.stderr[-2000:]
    assert "stop here" in done.stderr


def test_a_bad_spec_stops_the_server_started_for_the_run(tmp_path):
    done = _first(tmp_path, tmp_path / "missing.yaml")
    assert done.stdout.split() == [str(launch.EXIT_USAGE), "[]", "True", "False", "None"], \
        done.stdout + done.stderr[-2000:]
    assert "missing.yaml" in done.stderr


def test_a_command_called_from_python_returns(tmp_path):
    """``main(argv)`` (a library call, or under pytest) returns its code: the process goes on."""
    from pacs2bids import cli

    assert cli.main(["run", str(tmp_path / "missing.yaml")]) == launch.EXIT_USAGE


def _retry_after(url: str, name: str) -> list[float]:
    """Take the only slot of a new limit ``name``, then the Retry-After of five refused takes."""
    import json as _json
    import urllib.error
    import urllib.request

    def post(path: str, body: dict):
        req = urllib.request.Request(url + path, data=_json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=30)

    post("/v2/concurrency_limits/", {"name": name, "limit": 1, "active": True})
    post("/v2/concurrency_limits/increment", {"names": [name], "slots": 1, "mode": "concurrency"})
    waits = []
    for _ in range(5):
        with pytest.raises(urllib.error.HTTPError) as refused:
            post("/v2/concurrency_limits/increment", {"names": [name], "slots": 1, "mode": "concurrency"})
        assert refused.value.code == 423
        waits.append(float(refused.value.headers["Retry-After"]))
    return waits


def test_the_run_server_tells_slot_waiters_to_retry_soon(tmp_path, monkeypatch):
    """A connection refused a slot of the PACS limit retries within ~0.5 s on the run's own server (Prefect's
    default told it about 2-5 s on a new limit, the cap 30 s: issue 12), and the environment can set another cap."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS", raising=False)
    server = prefectserver.RunServer()
    try:
        server.wait(300)
        assert max(_retry_after(server.url, "pacs2bids-pacs-test")) <= 0.5 * 1.3 + 1e-6
    finally:
        server.stop()
    monkeypatch.setenv("PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS", "10")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-2"))
    server = prefectserver.RunServer()
    try:
        server.wait(300)
        assert min(_retry_after(server.url, "pacs2bids-pacs-test")) > 0.65
    finally:
        server.stop()
