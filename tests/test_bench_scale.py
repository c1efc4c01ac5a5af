"""Smoke test of benchmarks/bench_replicate.py with its scale-out figures (bench_scaleout.py), on a tiny
project: every figure printed and in the JSON, the full extraction on 1 and 2 Dask workers for limits 1
and 2, each within its per-PACS limit, giving the same dataset as the first full extraction, and no slot
of the limit left held (a later figure would wait for it). No timing is asserted (the machine is shared)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"


@pytest.mark.slow
def test_bench_replicate_with_scaleout_on_a_tiny_project(tmp_path):
    figures = tmp_path / "figures.json"
    env = {**os.environ, "NIPYPE_NO_ET": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PACS2BIDS_TASK_RUNNER", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_replicate.py"), "--studies", "3", "--new", "1", "--quick",
         "--limits", "1,2", "--json", str(figures)],
        capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = done.stdout
    for label in ("full extraction (first replication)", "no-op replication (goal <= 10 s)",
                  "replication with 1 new studies"):
        assert re.search(rf"^{re.escape(label)}\s+{NUMBER}\s+{NUMBER}$", out, re.M), (label, out)
    for limit in (1, 2):  # workers, limit, seconds, [ratio], studies, peak, limit held, same files
        assert re.search(rf"^\s+1\s+{limit}\s+{NUMBER}\s+3\s+\d+\s+yes\s+yes$", out, re.M), out
        assert re.search(rf"^\s+2\s+{limit}\s+{NUMBER}\s+{NUMBER}\s+3\s+\d+\s+yes\s+yes$", out, re.M), out

    fig = json.loads(figures.read_text())
    assert fig["studies"] == 3 and fig["new"] == 1 and fig["quick"] is True
    assert fig["full"] > 0 and fig["noop_replicate"] > 0 and fig["new_replicate"] > 0
    scale = fig["scaleout"]
    assert scale["reference_files"] > 0
    assert sorted((r["workers"], r["limit"]) for r in scale["runs"]) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for run in scale["runs"]:
        assert run["seconds"] > 0 and run["studies"] == 3 and run["same_files"] is True, run
        assert run["samples"] > 10 and 1 <= run["peak_connections"] <= run["limit"] and run["limit_held"], run
    assert set(scale["ratio_2_over_1"]) == {"1", "2"} and all(v > 0 for v in scale["ratio_2_over_1"].values())
