"""Where a process's memory goes over time: RSS beside what Python and malloc hold, step by step.

    .venv/bin/python benchmarks/memprobe.py REPORT.txt [--interval 0.5] [--frames 4] [--trace-from FUNCTION] -- run SPEC --json

runs ``pacs2bids`` with these arguments in this process, with a thread that every
``interval`` seconds records the process's RSS (``/proc/self/statm``), the bytes Python objects hold
(``tracemalloc``), what glibc's malloc holds in use and free in its arenas (``mallinfo2``), the number
of threads and the pacs2bids function the main thread is in (the flow's current step). ``tracemalloc``
starts when a function named ``--trace-from`` is on the main thread's stack (default
``_check_and_publish``: the dataset-level steps after the studies; ``_run``: the whole flow; the
imports are never traced, they would take minutes; ``MEMPROBE_TRACE_FROM`` sets it too). Each time
Python's traced memory reaches a new high by 8 MB or more, a snapshot is kept (the last one is
reported). The report lists the timeline (a line per step change or per 5 s) and the allocation
sites that held the most at the highest snapshot, grouped by ``frames`` frames of traceback
(``--frames 0`` or ``MEMPROBE_FRAMES=0``: no tracemalloc, RSS and malloc only, at full speed).

RSS above traced + malloc's free is memory outside Python's heap (pyarrow's pool, thread stacks,
mapped libraries); ``file`` is the part of RSS mapped from files (libraries, memory-mapped data); malloc's free
bytes are fragmentation malloc keeps rather than returns. The
run is slower under tracemalloc (about 1.5-2x): use this for where memory goes, not for time.
``bench_e2e.py --memory DIR`` runs the timed branch run under it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

from sampler import run_cli  # beside this file

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024
OURS = ("/pacs2bids/", "/flows/", "/tasks/")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo():
    """glibc's (in use, free) bytes in its arenas, or (0, 0) where mallinfo2 is missing."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return lambda: (0, 0)
    fn.restype = _MallInfo2

    def read():
        m = fn()
        return m.uordblks + m.hblkhd, m.fordblks

    return read


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def _rss_file() -> int:
    """The resident pages mapped from files (libraries, mapped images): ``RssFile`` of /proc/self/status."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


def _on_stack(frame, name: str) -> bool:
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


def _step(frame) -> str:
    """The innermost pacs2bids function on a stack (the step the flow is in)."""
    while frame is not None:
        path = frame.f_code.co_filename
        for marker in OURS:
            if marker in path:
                return f"{marker.strip('/')}/{Path(path).stem}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "-"


class Probe(threading.Thread):
    def __init__(self, interval: float, main_ident: int, frames: int, trace_from: str):
        super().__init__(name="memprobe", daemon=True)
        self.interval, self.main, self.frames, self.stop = interval, main_ident, frames, threading.Event()
        self.trace_from = trace_from
        self.samples: list[tuple] = []
        self.snapshot, self.snapshot_at, self._high = None, None, 0
        self.mallinfo = _mallinfo()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            frame = sys._current_frames().get(self.main)
            step = _step(frame)
            if self.frames and not tracemalloc.is_tracing() and _on_stack(frame, self.trace_from):
                tracemalloc.start(self.frames)
            traced, _peak = tracemalloc.get_traced_memory()
            used, free = self.mallinfo()
            t = time.monotonic() - self.t0
            self.samples.append((t, _rss(), _rss_file(), traced, used, free, threading.active_count(), step))
            if tracemalloc.is_tracing() and traced > self._high + 8 * MB:
                self._high = traced
                self.snapshot, self.snapshot_at = tracemalloc.take_snapshot(), (t, traced)

    def report(self, top: int = 25) -> str:
        head = f"{'s':>7} {'RSS':>7} {'file':>6} {'traced':>7} {'malloc':>7} {'free':>6} {'thr':>4}  step (MB)"
        lines, last = [head], None
        for i, (t, rss, rss_file, traced, used, free, threads, step) in enumerate(self.samples):
            if step != (last and last[-1]) or last is None or t - last[0] >= 5 or i == len(self.samples) - 1:
                lines.append(f"{t:7.1f} {rss / MB:7.0f} {rss_file / MB:6.0f} {traced / MB:7.0f} {used / MB:7.0f} "
                             f"{free / MB:6.0f} {threads:4d}  {step}")
                last = (t, step)
        if self.samples:
            peak = max(self.samples, key=lambda s: s[1])
            lines += ["", f"peak RSS {peak[1] / MB:.0f} MB at {peak[0]:.1f} s, in {peak[7]} (mapped from files "
                          f"{peak[2] / MB:.0f} MB, traced {peak[3] / MB:.0f}, malloc in use {peak[4] / MB:.0f}, "
                          f"free {peak[5] / MB:.0f})"]
        if self.snapshot is not None:
            t, traced = self.snapshot_at
            lines += ["", f"Python's allocations at {t:.1f} s ({traced / MB:.0f} MB traced), by site:"]
            for stat in self.snapshot.statistics("traceback")[:top]:
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback)
                lines.append(f"  {stat.size / MB:7.1f} MB {stat.count:8d}  {where}")
        return "\n".join(lines) + "\n"


def main() -> int:
    args = sys.argv[1:]
    out, interval = Path(args.pop(0)), 0.5
    trace_from = os.environ.get("MEMPROBE_TRACE_FROM", "_check_and_publish")  # bench_e2e --memory passes none
    frames = int(os.environ.get("MEMPROBE_FRAMES", "4"))  # 0: RSS and malloc only (bench_e2e --memory passes none)
    while args and args[0] in ("--interval", "--frames", "--trace-from"):
        if args[0] == "--interval":
            interval = float(args[1])
        elif args[0] == "--frames":
            frames = int(args[1])
        else:
            trace_from = args[1]
        args = args[2:]
    if args and args[0] == "--":
        args = args[1:]
    return run_cli(Probe(interval, threading.get_ident(), frames, trace_from), out, args)


if __name__ == "__main__":
    sys.exit(main())
