"""Watching a run from outside, for the tests and benchmarks (issue 14: the per-PACS limit, the workers' pools).

:class:`Sampling` runs a sampler's ``sample()`` every ``interval`` seconds in a daemon thread for the
length of a ``with`` block; :func:`tcp_table` lists the machine's established TCP connections; :func:`slots_held` reads how many slots of a Prefect global concurrency
limit a finished run still holds.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

ESTABLISHED = "01"  # the state column of /proc/net/tcp


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


def tcp_table() -> dict[int, tuple[int, int]]:
    """ESTABLISHED TCP sockets: inode -> (local port, remote port), from /proc/net/tcp and tcp6 (Linux;
    empty elsewhere). A PACS's connections are those whose local port is its port."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            text = Path(table).read_text()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            f = line.split()
            if len(f) > 9 and f[3] == ESTABLISHED:
                found[int(f[9])] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16))
    return found
