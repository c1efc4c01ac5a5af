"""Where a process's CPU goes, thread by thread: a sampling profiler in the process (py-spy is not here).

    .venv/bin/python benchmarks/sampler.py REPORT.txt [--interval 0.01] -- run SPEC --json

runs ``pacs2bids`` with these arguments in this process, with a thread that every ``interval`` seconds
reads each thread's CPU time (``/proc/self/task/TID/stat``, utime + stime) and its Python stack
(``sys._current_frames()``), and charges the CPU the thread used since the last sample to that
stack: a blocked thread costs nothing, whatever its stack. The report (written when the command
ends) lists the CPU seconds per thread kind (names without their numbers), the functions with the
most CPU inside them (inclusive, once per sample) and at the top of the stack (self), as
``file:function``. CPU of child processes (the deid workers, dcm2niix, tesseract) is not in it.
``bench_e2e.py --sample DIR`` runs the timed branch run under it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(native_id: int) -> float:
    """The thread's user + system CPU seconds (0 once it is gone)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _kind(name: str) -> str:
    """A thread's name without its number or UUID (ThreadPoolExecutor-0_3, ...-renewal-<uuid>)."""
    name = re.sub(r"[-_]?[0-9a-f]{8}(-?[0-9a-f]{4}){3}-?[0-9a-f]{12}", "", name)
    return re.sub(r"([-_ ]?\(?\d+\)?)+$", "", name)


def _chain(frame, depth: int = 4) -> str:
    """The top of a stack and the callers under it, innermost first."""
    out = []
    while frame is not None and len(out) < depth:
        out.append(_where(frame.f_code))
        frame = frame.f_back
    return " <- ".join(out)


def _where(code) -> str:
    path = code.co_filename
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{code.co_name}"


class Sampler(threading.Thread):
    def __init__(self, interval: float = 0.01):
        super().__init__(name="sampler", daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.by_thread, self.inclusive, self.self_, self.callers = Counter(), Counter(), Counter(), Counter()
        self.last: dict[int, float] = {}

    def run(self) -> None:
        me = threading.get_ident()
        while not self.stop.wait(self.interval):
            frames = sys._current_frames()
            for t in threading.enumerate():
                if t.ident == me or t.native_id is None or t.ident not in frames:
                    continue
                cpu = _cpu(t.native_id)
                used, self.last[t.native_id] = cpu - self.last.get(t.native_id, cpu), cpu
                if used <= 0:
                    continue
                self.by_thread[_kind(t.name)] += used
                frame, seen = frames[t.ident], set()
                self.self_[_where(frame.f_code)] += used
                self.callers[_chain(frame)] += used
                while frame is not None:
                    key = _where(frame.f_code)
                    if key not in seen:
                        seen.add(key)
                        self.inclusive[key] += used
                    frame = frame.f_back

    def report(self, top: int = 40) -> str:
        total = sum(self.by_thread.values())
        lines = [f"CPU seen in Python threads: {total:.1f} s (process: {time.process_time():.1f} s)", "", "per thread:"]
        lines += [f"  {s:8.2f}  {name}" for name, s in self.by_thread.most_common()]
        for title, counter in (("inclusive", self.inclusive), ("self (top of stack)", self.self_),
                               ("self, with its callers", self.callers)):
            lines += ["", f"{title}:"] + [f"  {s:8.2f}  {k}" for k, s in counter.most_common(top)]
        return "\n".join(lines) + "\n"


def main() -> int:
    args = sys.argv[1:]
    out, interval = Path(args.pop(0)), 0.01
    if args and args[0] == "--interval":
        interval = float(args[1])
        args = args[2:]
    if args and args[0] == "--":
        args = args[1:]
    return run_cli(Sampler(interval), out, args)


def run_cli(watcher: threading.Thread, out: Path, args: list[str]) -> int:
    """``pacs2bids ARGS`` in this process while ``watcher`` (a thread with ``stop`` and ``report()``) runs;
    its report is written to ``out`` when the command ends (memprobe.py uses it too)."""
    watcher.start()
    from pacs2bids.cli import main as cli

    code = 1
    try:
        code = cli(args)
    finally:
        watcher.stop.set()
        watcher.join()
        out.write_text(watcher.report())
    return code


if __name__ == "__main__":
    sys.exit(main())
