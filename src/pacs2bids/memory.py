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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def arrow_system_pool() -> None:
    """pyarrow's default pool becomes the system allocator (idempotent), unless the environment chose one."""
    if os.environ.get(POOL_ENV):
        return
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def give_back() -> None:
    """Return the memory the allocators hold free to the system (pyarrow's pool, then glibc's arenas)."""
    if "pyarrow" in sys.modules:  # not imported: nothing of it to give back
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    if (trim := _malloc_trim()) is not None:
        trim(0)
