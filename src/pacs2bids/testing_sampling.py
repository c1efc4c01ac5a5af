"""Watching a run from outside, for the tests and benchmarks (issue 14: the per-PACS limit, the workers' pools).

:class:`Sampling` runs a sampler's ``sample()`` every ``interval`` seconds in a daemon thread for the
length of a ``with`` block; :func:`slots_held` reads how many slots of a Prefect global concurrency
limit a finished run still holds.
"""

from __future__ import annotations

import threading
import time


class Sampling:
    """Base of a sampler (a dataclass with an ``interval`` field): ``with sampler:`` calls
    :meth:`sample` every ``interval`` seconds in a daemon thread until the block ends."""

    interval: float

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def __enter__(self):
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self._thread.join(timeout=10)


def slots_held(name: str, wait: float = 15.0) -> int:
    """The slots of the Prefect global concurrency limit ``name`` still held, read until none is or
    ``wait`` seconds have passed (a slot given back by a worker's teardown takes a moment)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            held = client.read_global_concurrency_limit_by_name(name).active_slots
            if not held or time.monotonic() > deadline:
                return held
            time.sleep(0.5)
