"""Python memory of one call, for the tests that bound it (issue 12, "memory stays flat")."""

from __future__ import annotations

import tracemalloc


def traced_peak(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), peak bytes)`` under :mod:`tracemalloc`, measured from the call's start."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn(*args, **kwargs)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak
