"""Smoke test of benchmarks/bench_e2e.py on the bundled sample: every row printed with a figure,
the JSON holding every key. No timing is asserted (the machine is shared; speed is the benchmark's job)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"
FLOORS = ("wado_rs", "c_get", "pydicom_rw", "dcm2niix", "read_once")
STAGES = ("query", "retrieve", "pseudonymise", "convert", "released", "finalise", "validate", "lineage", "leak_scan",
          "publish")
ROWS = ("floor: raw WADO-RS, every study", "floor: pynetdicom C-GET, one association", "floor: pydicom read + write",
        "floor: dcm2niix -z y, every series", "floor: every byte read once", "pacs2bids run, dicomweb",
        "pacs2bids run, c-get")


def test_bench_e2e_quick_on_the_sample(tmp_path):
    figures = tmp_path / "figures.json"
    env = {**os.environ, "NIPYPE_NO_ET": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--corpus", "sample", "--studies", "2", "--quick",
         "--json", str(figures)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for label in ROWS:  # each row: its label, seconds, and its ratio to its floor
        assert re.search(rf"^{re.escape(label)}\s+{NUMBER}\s+{NUMBER}x\s", out, re.M), (label, out)
    stage_rows = re.findall(rf"^  stage (\w+)\s+({NUMBER}|n/a)\b", out, re.M)
    assert [s for s, _ in stage_rows] == list(STAGES) * 2, out  # n/a only while the flow does not report them
    for transport in ("dicomweb", "c-get"):
        assert re.search(rf"^peak RSS, pacs2bids run {transport}: \d+ MB$", out, re.M), out
        assert re.search(rf"^GOAL end to end over {transport} <= .*: {NUMBER}x (PASS|MISS)$", out, re.M), out
    assert "anchor:" not in out  # --quick skips them

    data = json.loads(figures.read_text())
    assert data["corpus"] == "sample" and data["quick"] is True
    (size,) = data["sizes"]
    assert size["copies"] == 1 and size["studies"] == 2 and size["instances"] > 0 and size["megabytes"] > 0
    assert set(size["floors"]) == set(FLOORS) and all(v > 0 for v in size["floors"].values())
    assert size["anchors"] == {}
    for transport in ("dicomweb", "c-get"):
        run = size["runs"][transport]
        assert run["exit_code"] in (0, 3) and run["state"] in ("completed", "completed with failures"), run
        assert run["seconds"] > 0 and run["peak_rss_mb"] > 0
        assert run["stage_seconds"] is None or set(STAGES) <= set(run["stage_seconds"])
        assert set(size["goals"][transport]) == {"ratio", "goal", "pass"}


def test_bench_e2e_dicomweb_alone_beside_a_base_commit(tmp_path):
    """``--transports dicomweb``: no C-GET floor nor run (the pydicom floor reads the uploaded files);
    ``--base COMMIT``: that commit's pacs2bids runs too, in the same run, with its own rows."""
    figures = tmp_path / "figures.json"
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--corpus", "sample", "--studies", "2", "--quick",
         "--transports", "dicomweb", "--base", "HEAD", "--json", str(figures)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "floor: pynetdicom C-GET" not in out and "pacs2bids run, c-get" not in out
    for label in ("floor: pydicom read + write", "pacs2bids run, dicomweb (base)", "pacs2bids run, dicomweb"):
        assert re.search(rf"^{re.escape(label)}\s+{NUMBER}\s+{NUMBER}x\s", out, re.M), (label, out)
    (size,) = json.loads(figures.read_text())["sizes"]
    assert size["floors"]["c_get"] is None and size["floors"]["pydicom_rw"] > 0
    assert set(size["runs"]) == {"dicomweb (base)", "dicomweb"}
    for run in size["runs"].values():
        assert run["exit_code"] in (0, 3) and run["state"] in ("completed", "completed with failures"), run


def test_the_peak_rss_of_a_run_is_its_own_not_the_benchmarks(tmp_path):
    """A child of a large process reports, through wait4, the memory it was forked with: the benchmark's.
    benchmarks/waited.py reports the command's own peak (session 17: "the run's peak" at x1 was the
    benchmark's 409 MB; the run peaked at 328 MB)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import waited
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    held = bytearray(300 * 2**20)  # this process: 300 MB more, every page touched
    held[::4096] = b"x" * len(held[::4096])
    small = [sys.executable, "-c", "pass"]
    proc = subprocess.Popen(small)
    _pid, _status, usage = os.wait4(proc.pid, 0)
    assert usage.ru_maxrss / 1024 > 300, "the direct child was expected to report its parent's size"
    code, seconds, peak, _cpu = waited.run(small)
    assert code == 0 and seconds > 0 and peak < 100, f"waited.py reported {peak:.0f} MB for an empty interpreter"
    code, _s, peak, _cpu = waited.run([sys.executable, "-c", "b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert code == 0 and 150 < peak < 250, f"a child that holds 150 MB: reported {peak:.0f} MB"
    del held
