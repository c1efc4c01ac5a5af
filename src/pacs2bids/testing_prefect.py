"""A real Prefect server, its workers and a PostgreSQL database on loopback (issue 14), for tests.

- :class:`Postgres`: Debian's PostgreSQL (``initdb`` + ``postgres``) in a folder of its own, on a
  free 127.0.0.1 port, password (SCRAM) authentication only; run as ``nobody`` when we are root
  (PostgreSQL refuses to run as root).
- :class:`PrefectServer`: ``prefect server start`` on a free 127.0.0.1 port, with its own
  PREFECT_HOME; SQLite there by default, or the database URL given (PostgreSQL); optionally the
  server auth string (PREFECT_SERVER_API_AUTH_STRING) and a fast scheduler.
- :class:`PrefectWorker`: ``prefect worker start --pool ...`` against such a server.

Each binds 127.0.0.1 only and stops every process it started, by its id.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .orthanc import free_port
from .testing_servers import _kill, _wait_port


def postgres_bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise FileNotFoundError("PostgreSQL is not installed: apt-get install -y postgresql (Debian)")
    return found[-1].parent


def _prefect_command() -> list[str]:
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "prefect"]


@dataclass
class Postgres:
    """One PostgreSQL cluster in a temporary folder (removed at :meth:`stop`)."""

    user: str = "prefect"
    database: str = "prefect"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    port: int = 0
    workdir: Path | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect takes (PREFECT_SERVER_DATABASE_CONNECTION_URL); holds the password."""
        return f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "nobody", "--", *cmd] if os.getuid() == 0 else cmd

    def start(self, timeout: float = 60.0) -> "Postgres":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # never leave a cluster running behind a failed start
            raise

    def _start(self, timeout: float) -> "Postgres":
        bindir = postgres_bin_dir()
        self.workdir = Path(tempfile.mkdtemp(prefix="pacs2bids-postgres-"))  # /tmp: reachable by nobody
        data, pwfile = self.workdir / "data", self.workdir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.getuid() == 0:
            import pwd

            nobody = pwd.getpwnam("nobody")
            os.chown(self.workdir, nobody.pw_uid, nobody.pw_gid)
            os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
        pwfile.chmod(0o600)
        subprocess.run(self._as_owner([str(bindir / "initdb"), "-D", str(data), "-U", self.user, "-E", "UTF8",
                                       f"--pwfile={pwfile}", "--auth=scram-sha-256", "--no-sync"]),
                       check=True, capture_output=True, cwd=self.workdir)
        pwfile.unlink()
        self.port = self.port or free_port()
        log = open(self.workdir / "postgres.log", "ab")
        self._proc = subprocess.Popen(
            self._as_owner([str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
                            "-k", str(self.workdir), "-c", "fsync=off", "-c", "max_connections=60"]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir)
        log.close()
        _wait_port(self.port, self._proc, "postgres", timeout)
        env = {**os.environ, "PGPASSWORD": self.password}
        deadline = time.monotonic() + timeout
        while True:  # the port opens before the cluster accepts connections ("starting up")
            done = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                   "-U", self.user, self.database], capture_output=True, text=True, env=env)
            if done.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL: createdb {self.database} failed: {done.stderr.strip()}")
            time.sleep(0.5)

    def query(self, sql: str) -> str:
        """One SQL statement through ``psql``; its unaligned output."""
        done = subprocess.run([str(postgres_bin_dir() / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", self.user, "-d", self.database, "-Atc", sql], capture_output=True, text=True,
                              env={**os.environ, "PGPASSWORD": self.password}, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL: {sql!r} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def stop(self) -> None:
        _kill(self._proc, signal.SIGINT)  # fast shutdown of the postmaster and its children
        _kill(self._proc)
        self._proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class PrefectServer:
    """``prefect server start`` on loopback. :meth:`client_env` is what a client process needs."""

    home: Path
    database_url: str | None = None  # None: SQLite in ``home``
    auth_string: str | None = field(default=None, repr=False)  # "user:password", required of every client
    scheduler_seconds: float | None = 5.0  # None: no scheduler service
    port: int = 0
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def client_env(self, home: Path | None = None, base: dict | None = None) -> dict:
        """An environment for a client (CLI, worker, script): this server's URL and auth string."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(home or self.home / "client"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", NIPYPE_NO_ET="1")
        if self.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string
        return env

    def _server_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_UI_ENABLED="false",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                   PREFECT_SERVER_DATABASE_CONNECTION_URL=self.database_url
                   or f"sqlite+aiosqlite:///{self.home / 'prefect.db'}")
        if self.auth_string:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth_string
        if self.scheduler_seconds is not None:
            env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = str(self.scheduler_seconds)
        return env

    def start(self, timeout: float = 180.0) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cmd = [*_prefect_command(), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
               "--no-ui", "--analytics-off"]
        if self.scheduler_seconds is None:
            cmd.append("--no-scheduler")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self._server_env(), cwd=self.home, start_new_session=True)
        deadline = time.monotonic() + timeout  # a first start migrates a new database
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prefect server exited at start ({self._proc.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(f"{self.api_url}/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"prefect server did not answer {self.api_url}/health within {timeout:.0f} s")
            time.sleep(0.5)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cli(self, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``prefect <args>`` against this server; raises with its output when it fails."""
        done = subprocess.run([*_prefect_command(), "--no-prompt", *args], cwd=cwd, env=env or self.client_env(),
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        return done

    def worker(self, pool: str, workdir: Path, env: dict | None = None) -> "PrefectWorker":
        return PrefectWorker(self, pool, workdir, env or {}).start()


@dataclass
class PrefectWorker:
    """``prefect worker start --pool <pool>``: runs the pool's flow runs as child processes."""

    server: PrefectServer
    pool: str
    workdir: Path
    env: dict
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "worker.log"

    def start(self) -> "PrefectWorker":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**self.server.client_env(self.workdir / "home"), **self.env,
               "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*_prefect_command(), "worker", "start", "--pool", self.pool, "--type", "process"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.workdir,
                start_new_session=True)
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        _kill(self._proc, signal.SIGTERM)
        _kill(self._proc)
        self._proc = None
