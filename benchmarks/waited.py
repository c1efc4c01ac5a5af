"""Run a command and report its peak RSS and CPU, free of the benchmark's own size.

    python benchmarks/waited.py USAGE.json -- COMMAND [ARG...]

runs COMMAND (standard streams inherited), waits for it with ``wait4`` and writes ``{"peak_rss_mb",
"cpu_seconds"}`` of it and its waited-for descendants to USAGE.json, then exits with its exit code.

Why a process between: Linux records, when a process calls ``exec``, the peak RSS of the memory it
had until then (``signal->maxrss``), and ``wait4`` reports it. A child forked (or vforked) by a
benchmark that holds 400 MB of figures and corpus starts with the benchmark's memory: its ``ru_maxrss``
is then the benchmark's size, whatever the command does (session 17 found bench_e2e's "peak RSS of the
run" at ×1 to be the benchmark's own 409 MB; the run's process peaked at 328 MB). This script is a
fresh interpreter (its memory, small, is what the command starts from) and reports only its child.
:func:`run` is the benchmarks' way to call it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], **popen) -> tuple[int, float, float, float]:
    """``cmd`` through this script: (exit code, wall seconds, peak RSS MB, CPU seconds)."""
    with tempfile.TemporaryDirectory(prefix="waited-") as tmp:
        usage = Path(tmp) / "usage.json"
        t = time.perf_counter()
        code = subprocess.run([sys.executable, __file__, str(usage), "--", *cmd], **popen).returncode
        seconds = time.perf_counter() - t
        data = json.loads(usage.read_text()) if usage.is_file() else {"peak_rss_mb": 0.0, "cpu_seconds": 0.0}
    return code, seconds, data["peak_rss_mb"], data["cpu_seconds"]


def main() -> int:
    usage_file, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        print(__doc__, file=sys.stderr)
        return 2
    proc = subprocess.Popen(cmd)
    _pid, status, usage = os.wait4(proc.pid, 0)
    Path(usage_file).write_text(json.dumps({"peak_rss_mb": usage.ru_maxrss / 1024,
                                            "cpu_seconds": usage.ru_utime + usage.ru_stime}))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
