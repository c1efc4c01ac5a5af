"""Checksums of files, streamed (memory does not grow with the file)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read into one buffer reused for the whole file (``hashlib.file_digest``): a new
    block per read would cost a fresh mapping each, large blocks being mapped alone (pacs2bids.memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
