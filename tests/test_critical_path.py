"""The studies' critical path inside a run (issue 12, session 14): what makes a small study slow."""

from __future__ import annotations

import subprocess

import numpy as np

from pacs2bids.deid import pixels


def test_ocr_runs_tesseract_on_one_thread(monkeypatch):
    """tesseract's OpenMP threads spin on cores the run's other work holds: a burned-in-text check
    took 2-3x the wall time and twice the CPU beside it, for the same boxes. The child gets
    OMP_THREAD_LIMIT=1 (and still never the project's key)."""
    seen, real = [], subprocess.run

    def spy(cmd, **kw):
        seen.append((cmd[0], kw.get("env") or {}))
        return real(cmd, **kw)

    monkeypatch.setattr(pixels.subprocess, "run", spy)
    monkeypatch.setenv("PACS2BIDS_SECRET", "do-not-pass-this-on")
    grey = np.zeros((64, 64), dtype=np.uint8)
    assert pixels.ocr_boxes(grey) == []
    assert [c for c, _ in seen] == ["tesseract"]
    env = seen[0][1]
    assert env.get("OMP_THREAD_LIMIT") == "1"
    assert "PACS2BIDS_SECRET" not in env
