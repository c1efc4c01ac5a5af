"""Versions of every tool in the conversion chain (requirement Q3), measured once per process."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .childenv import child_env

_PACKAGES = {
    "pacs2bids": "pacs2bids",
    "heudiconv": "heudiconv",
    "pydicom": "pydicom",
    "pynetdicom": "pynetdicom",
    "nibabel": "nibabel",
    "prefect": "prefect",
    "bids-validator": "bids-validator-deno",
}


def _binary(name: str) -> str | None:
    return shutil.which(name, path=f"{Path(sys.executable).parent}:{shutil.os.environ.get('PATH', '')}")


def dcm2niix_version() -> str | None:
    """The version the dcm2niix binary reports (``v1.0.20260724``), else its wheel's, else None."""
    exe = _binary("dcm2niix")
    if exe:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, env=child_env())
            m = re.search(r"v\d+\.\d+\.\d+\w*", out.stdout + out.stderr)
            if m:
                return m.group(0)
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return metadata.version("dcm2niix")
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _cached() -> tuple[tuple[str, str | None], ...]:
    found: dict[str, str | None] = {}
    for key, dist in _PACKAGES.items():
        try:
            found[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[key] = None
    found["dcm2niix"] = dcm2niix_version()
    return tuple(sorted(found.items()))


def tool_versions() -> dict:
    """``{tool: version or None}`` for pacs2bids, heudiconv, dcm2niix, pydicom, pynetdicom,
    nibabel, prefect and bids-validator. Computed once per process (dcm2niix is asked once)."""
    return dict(_cached())
