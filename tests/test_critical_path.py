"""The studies' critical path inside a run (issue 12, session 14): what makes a small study slow."""

from __future__ import annotations

import subprocess

import numpy as np

from pacs2bids.deid import pixels


def test_ocr_runs_tesseract_on_one_thread(monkeypatch):
    """tesseract's OpenMP threads spin on cores the run's other work holds: a burned-in-text check
    took 2-3x the wall time and twice the CPU beside it, for the same boxes. The child gets
    OMP_THREAD_LIMIT=1 (and still never the project's key), and reads the frame uncompressed."""
    seen, images, real = [], [], subprocess.run

    def spy(cmd, **kw):
        seen.append((cmd[0], kw.get("env") or {}))
        images.append(cmd[1])
        return real(cmd, **kw)

    monkeypatch.setattr(pixels.subprocess, "run", spy)
    monkeypatch.setenv("PACS2BIDS_SECRET", "do-not-pass-this-on")
    grey = np.zeros((64, 64), dtype=np.uint8)
    assert pixels.ocr_boxes(grey) == []
    assert [c for c, _ in seen] == ["tesseract"]
    env = seen[0][1]
    assert env.get("OMP_THREAD_LIMIT") == "1"
    assert "PACS2BIDS_SECRET" not in env
    # an uncompressed image: PNG's deflate of a frame enlarged x2 cost 0.25 s of the caller's CPU (10x the rest)
    assert images[0].endswith(".pgm")


def test_a_small_series_batches_go_before_those_a_large_one_queued_earlier():
    """The shared pool served batches first come, first served: a small study's series waited
    behind every batch a 1,700-file study had queued. Batches now wait in one queue by priority
    (a series passes its number of files), so the small series' batches run next."""
    import threading
    import time

    from pacs2bids.deid.pool import map_ordered

    assert list(map_ordered(abs, [(-1,), (-2,)], 2)) == [1, 2]  # the pool's workers are up
    large: list[float] = []

    def run_large() -> None:
        for _ in map_ordered(time.sleep, [(0.3,)] * 10, 2, window=10, priority=1000):
            large.append(time.monotonic())

    t = threading.Thread(target=run_large)
    t.start()
    time.sleep(0.1)  # the large series' ten batches are queued
    assert list(map_ordered(time.sleep, [(0.3,), (0.3,)], 2, priority=2)) == [None, None]
    small_done = time.monotonic()
    t.join(60)
    assert len(large) == 10
    # first come, first served, the small series would end after all ten (1.5 s of two workers)
    assert small_done < large[5], (small_done, large)


def test_the_sampler_charges_cpu_to_the_busy_thread_not_the_blocked_one():
    """benchmarks/sampler.py (bench_e2e --sample): a blocked thread costs nothing, whatever its stack."""
    import sys
    import threading
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sampler import Sampler

    spun_out, release = threading.Event(), threading.Event()

    def spin_here(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass
        spun_out.set()
        release.wait(30)  # alive until the sampler has read its CPU (a loaded machine starves the sampler)

    def sleep_here(seconds: float) -> None:
        time.sleep(seconds)

    sampler = Sampler(0.005)
    sampler.start()
    threads = [threading.Thread(target=spin_here, args=(0.6,), name="busy-1"),
               threading.Thread(target=sleep_here, args=(1.0,), name="idle-1")]
    for t in threads:
        t.start()
    spun_out.wait(60)
    time.sleep(0.5)
    release.set()
    for t in threads:
        t.join()
    sampler.stop.set()
    sampler.join()
    spun = sum(s for k, s in sampler.inclusive.items() if k.endswith(":spin_here"))
    slept = sum(s for k, s in sampler.inclusive.items() if k.endswith(":sleep_here"))
    assert spun > 0.3 and slept < 0.05, sampler.report()
    assert sampler.by_thread["busy"] > 0.3 and "spin_here" in sampler.report()


def test_only_small_series_go_ahead_in_the_pool_queue(monkeypatch, tmp_path):
    """A series of at most SMALL_SERIES files passes its size as its priority; larger ones share one
    priority (first come, first served among them), so the largest study, often the critical path,
    is delayed by no more than the small series' own work."""
    from pacs2bids.config import PseudonymizationSettings
    from pacs2bids.deid import Pseudonymiser
    from pacs2bids.deid import series as deid_series

    seen = []

    def record(fn, batches, workers, window=None, priority=0):
        seen.append(priority)
        return iter(())

    monkeypatch.setattr(deid_series.pool, "map_ordered", record)
    p = Pseudonymiser("prio", b"0123456789abcdef0123", PseudonymizationSettings(workers=2), tmp_path / "keys")
    for n in (3, deid_series.SMALL_SERIES, 500, 1692):
        p.pseudonymise_series([tmp_path / f"f{i}" for i in range(n)], tmp_path / f"out{n}", subject="001",
                              session=None, quarantine_dir=tmp_path / "q")
    small = deid_series.SMALL_SERIES
    assert seen == [3, small, small + 1, small + 1]
