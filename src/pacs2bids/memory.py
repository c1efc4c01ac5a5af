"""The run's memory between its steps: what a step freed goes back to the system.

A run's process allocates from three places: Python's objects (glibc's ``malloc`` for large ones),
pyarrow's buffers (its own pool: mimalloc by default) and the libraries' own ``malloc`` calls. Memory a
step frees stays with the allocator that gave it, counted in the process's RSS, until that allocator
returns it; glibc and mimalloc return little on their own. Measured over a 10x project
(benchmarks/memprobe.py, docs/BENCHMARKS.md): glibc held 25 MB free after the first studies and
100 MB by the last, and pyarrow's pool kept what the lineage tables and the leak scan's Parquet reads
had used (about 35 MB each). The peak of the run was at its end, every step's leftovers stacked.

- :func:`arrow_system_pool`: pyarrow takes its buffers from the system allocator (where they are
  returned with the rest), unless ``ARROW_DEFAULT_MEMORY_POOL`` chooses a pool.
- :func:`give_back`: returns what is free (pyarrow's pool, then glibc's arenas: ``malloc_trim``,
  about 20 ms for 150 MB free), called after each study (``tasks/study.py``) and after the lineage
  tables. It frees nothing in use; on a system without glibc it does only the pyarrow part.
- :func:`tune_malloc`: glibc gives every block of :data:`MMAP_THRESHOLD` (256 kB) or more its own
  mapping, returned to the system the moment it is freed, and returns the free top of a heap once it
  passes :data:`TRIM_THRESHOLD` (1 MB). By default glibc raises both thresholds with the largest block
  freed so far (up to 32 and 64 MB): after the first large file, every file's bytes, received part and
  volume come from the heaps, and what they free stays there, counted in RSS, until the next
  ``malloc_trim``. Measured at 10x the shared corpus (benchmarks/memprobe.py, docs/BENCHMARKS.md,
  session 18): peak RSS 379-409 MB by default, 335-338 MB with these two; the same with a 256 kB trim
  threshold but about 10 % more CPU (the heaps' tops returned and taken again), 386-403 MB with
  16-64 MB. Called when a run's flow starts and by each study; thresholds the environment chose
  (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) are kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
MMAP_THRESHOLD = 256 * 1024
TRIM_THRESHOLD = 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_CHOSEN = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def arrow_system_pool() -> None:
    """pyarrow's default pool becomes the system allocator (idempotent), unless the environment chose one."""
    if os.environ.get(POOL_ENV):
        return
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


@lru_cache(maxsize=None)
def _glibc(name: str, argtypes: tuple = (ctypes.c_int,)):
    """glibc's function ``name`` (returning an int), or None (another C library)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def tune_malloc() -> bool:
    """glibc's malloc maps each block of :data:`MMAP_THRESHOLD` or more on its own and trims a heap's
    free top past :data:`TRIM_THRESHOLD` (see the module docstring), for the rest of the process's
    life; idempotent. False when nothing was changed: the environment chose either threshold, or the
    C library is not glibc."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(v) for v in _CHOSEN) or any(f"malloc.{t}_threshold" in tunables for t in ("mmap", "trim")):
        return False
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
    return (mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)


def give_back() -> None:
    """Return the memory the allocators hold free to the system (pyarrow's pool, then glibc's arenas)."""
    if "pyarrow" in sys.modules:  # not imported: nothing of it to give back
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    if (trim := _glibc("malloc_trim", (ctypes.c_size_t,))) is not None:
        trim(0)
