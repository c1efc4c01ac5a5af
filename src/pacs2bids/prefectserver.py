"""Prefect's API server for one ``pacs2bids run``, started by pacs2bids (issue 12: fixed costs).

Prefect's ephemeral mode runs its API server in a process of its own (uvicorn,
``prefect.server.api.server:create_app``, UI off, the ephemeral set of services), but to start
it, the run's own process first imports that server's whole module, only to build the command:
on a small machine, many seconds of CPU the server process then spends again. :func:`start`
starts the same command (same arguments, same environment and flags; the app is Prefect's, its
SQLite transactions begun ``IMMEDIATE``: :mod:`pacs2bids.prefectapp`) at the start of a
run, before Prefect and the flow's modules are imported, so the server's start-up overlaps that
import and nothing of the server is imported twice; Prefect is pointed at it (``PREFECT_API_URL``,
in the environment, read by Prefect's settings and by child processes). :func:`serving` waits
until it answers, then, after the run, drains Prefect's log and event workers (they send to it)
and stops it.

Nothing changes when Prefect is set to use a server of its own (``PREFECT_API_URL`` in the
environment or in a Prefect profile), or is imported already (a second run in one process):
:func:`start` returns None and Prefect starts its ephemeral server as before.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import Pacs2BidsError

FLAGS = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}  # as Prefect's
#: The run's server's own defaults, which the environment overrides. A connection refused a slot of the PACS
#: limit (a global concurrency limit) is told to retry after about the limit's average occupancy, capped at this
#: (Prefect's default cap is 30 s): a study of one instance waited 2-4 s for a slot given back a moment before
#: (issue 12). Waiters still retry in turn, through the server: no process is served ahead of another.
DEFAULTS = {"PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "0.5"}


class ServerFailed(Pacs2BidsError):
    """Prefect's API server for the run did not start."""


def _has_own_server() -> bool:
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        profiles = (home / "profiles.toml").read_text()
    except OSError:
        profiles = ""
    return bool(os.environ.get("PREFECT_API_URL")) or "API_URL" in profiles


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunServer:
    """One Prefect API server process on loopback, for one run."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.warmed = threading.Event()  # set once the server answered /health, then a first API read
        self._launch()
        threading.Thread(target=self._warm, name="prefect-server-warm-up", daemon=True).start()

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                r.read()
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _warm(self) -> None:
        """As soon as the server answers ``/health``, send it the read the run's client sends first
        (``GET admin/version``): the server's first API request after its start takes 0.4-3 s (issue 12,
        its warm-up), paid here while the run's process still imports the flow's modules, not by the flow
        run's creation. A read only: nothing recorded, nothing changed. Ends with the server."""
        while self.process is not None:
            try:  # a refused connection costs microseconds; urllib's opener, the run's own import time
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                listening = True
            except OSError:
                listening = False
            if listening and self._answers("/health"):
                self._answers("/admin/version")
                self.warmed.set()
                return
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        self.port = _free_port()
        # Prefect's app, its SQLite transactions begun IMMEDIATE (pacs2bids.prefectapp: no 503 and 2 s retry
        # when two writers meet)
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "pacs2bids.prefectapp:create_app",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(cmd, env={**DEFAULTS, **os.environ, **FLAGS}, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> None:
        """Until ``/api/health`` answers; a process that ends first (its port taken meanwhile) is
        started again on another port, twice at most."""
        deadline, restarts = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if restarts == 2:
                    break
                restarts += 1
                self._launch()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        code = self.process.poll()
        self.stop()
        raise ServerFailed(
            f"Prefect's API server for this run did not answer on {self.url} within {timeout:.0f} s"
            + (f" (it exited with code {code}; its messages are above)" if code is not None else "")
            + ": raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a loaded machine, or point "
              "PREFECT_API_URL at a running Prefect server")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def start() -> RunServer | None:
    """Start the run's server now (it answers some seconds later) and point ``PREFECT_API_URL`` at it,
    before Prefect is imported: Prefect's root settings, which code outside the run's context (threads,
    Prefect's own event loop) reads, then name it too. None when Prefect has a server of its own, or
    when Prefect is imported already in this process (a second run in one process: Prefect's root
    settings are made; Prefect starts its ephemeral server as it does by itself)."""
    if _has_own_server() or "prefect" in sys.modules:
        return None
    server = RunServer()
    os.environ["PREFECT_API_URL"] = server.url
    return server


def _drain_prefect_workers() -> None:
    """Send what Prefect's log and event workers still hold while their server is up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30, at_exit=False)


@contextmanager
def serving(server: RunServer | None) -> Iterator[None]:
    """Inside, Prefect uses ``server`` (waited for first); on leaving, its workers are drained and it
    is stopped. With None, Prefect keeps its own settings."""
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 180))
        os.environ["PREFECT_API_URL"] = server.url  # child processes (Dask workers) use it too
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            try:
                yield
            finally:
                _drain_prefect_workers()
    finally:
        os.environ.pop("PREFECT_API_URL", None)  # set by start(): there was none before
        server.stop()
