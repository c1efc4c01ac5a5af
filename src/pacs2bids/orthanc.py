"""A local Orthanc PACS on loopback, for the demo and the tests.

Starts Debian's ``Orthanc`` (with the DICOMweb plugin when installed) on free loopback ports
with its own storage folder, loads DICOM files through its REST API, and stops it. It never
binds anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import requests

from .childenv import child_env

log = logging.getLogger(__name__)

DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str:
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if exe is None:
        raise FileNotFoundError(
            "Orthanc is not installed: run 'apt-get install -y orthanc orthanc-dicomweb' (Debian)"
        )
    return exe


@dataclass
class Orthanc:
    """One Orthanc process. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    ``modalities`` maps an AE title to ``(host, port)``: the peers Orthanc accepts C-MOVE
    destinations for. ``extra`` is merged into the configuration (e.g. ``LimitFindResults``).
    """

    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    workdir: Path | None = None
    dicom_port: int = 0
    http_port: int = 0
    dicomweb: bool = True
    auth: tuple[str, str] | None = None  # HTTP basic credentials, when ``extra`` enables AuthenticationEnabled
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _owns_workdir: bool = field(default=False, init=False, repr=False)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _config(self) -> dict:
        storage = self.workdir / "db"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": f"pacs2bids-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowStore": True,
            # store, and offer over C-GET, instances of SOP classes DCMTK does not know
            # (vendors' private classes, e.g. Philips 1.3.46.670589.11.0.0.12.x), as a PACS must
            "UnknownSopClassAccepted": True,
            "DicomModalities": {aet: [aet, host, port] for aet, (host, port) in self.modalities.items()},
            "HttpServerEnabled": True,
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "DicomScpTimeout": 30,
            "Plugins": [],
        }
        if self.dicomweb:
            plugin = next(
                (p for d in DICOMWEB_PLUGIN_DIRS for p in sorted(Path(d).glob("libOrthancDicomWeb.so*"))), None
            )
            if plugin is None:
                raise FileNotFoundError(
                    "Orthanc's DICOMweb plugin is not installed: run 'apt-get install -y orthanc-dicomweb'"
                )
            cfg["Plugins"] = [str(plugin)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full"}
        cfg.update(self.extra)
        return cfg

    def start(self, timeout: float = 60.0) -> "Orthanc":
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="pacs2bids-orthanc-"))
            self._owns_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self._config(), indent=2))
        logf = open(self.workdir / "orthanc.log", "ab")
        self._proc = subprocess.Popen(
            [orthanc_binary(), str(cfg_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env(),
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start; see {self.workdir / 'orthanc.log'}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", timeout=2, auth=self.auth).ok and self._dicom_listening():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def _dicom_listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.dicom_port)) == 0

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "orthanc.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, *, keep_storage: bool = False) -> None:
        """Stop the process; remove its folder unless ``keep_storage`` (for a restart)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None
        if self._owns_workdir and not keep_storage and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), keeping the storage: for fault tests."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def restart(self, timeout: float = 60.0) -> "Orthanc":
        """Start again on the same ports and storage."""
        self.stop(keep_storage=True)
        return self.start(timeout=timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- content --------------------------------------------------------------------------
    def upload(self, files: Iterable[Path | bytes]) -> int:
        """Store DICOM files (paths or bytes) through REST; returns how many were accepted."""
        n = 0
        with requests.Session() as s:
            s.auth = self.auth
            for f in files:
                data = f if isinstance(f, (bytes, bytearray)) else Path(f).read_bytes()
                r = s.post(f"{self.url}/instances", data=data, timeout=60)
                if r.ok:
                    n += 1
                else:
                    log.warning("Orthanc refused a file (%s): %s", r.status_code, r.text[:200])
        return n

    def get(self, path: str):
        r = requests.get(f"{self.url}{path}", timeout=60, auth=self.auth)
        r.raise_for_status()
        return r.json()

    def statistics(self) -> dict:
        return self.get("/statistics")

    def clear(self) -> None:
        for p in self.get("/patients"):
            requests.delete(f"{self.url}/patients/{p}", timeout=60, auth=self.auth).raise_for_status()
