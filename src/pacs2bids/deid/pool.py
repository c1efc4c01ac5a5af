"""Worker processes for pseudonymisation, so that every core works (issue 12).

Threads share one interpreter lock: the per-file work of :mod:`pacs2bids.deid.series` in threads
uses one core. :func:`map_ordered` runs a function over batches of work in a process pool shared
by the whole process (created lazily, once per size, and shut down at exit) and yields the results
in the order of the batches, so that the caller folds them as if it had run them one after the
other. The pool's processes start in a ``forkserver`` context, never by ``fork``: Prefect and
pynetdicom threads live in the parent, and a forked child would inherit their locks mid-flight.

At most ``window`` batches of one caller are in flight (submitted and not yet folded): memory
does not grow with the number of batches. With one worker, the function runs in the calling
thread, in order: the same code path without processes.

Log records a worker emits (warnings of the per-file work) are sent back with the batch's result
and handled by the parent's logger of the same name, so that they reach the run's log.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

ENV = "PACS2BIDS_DEID_WORKERS"
_POOLS: dict[int, ProcessPoolExecutor] = {}
_QUEUES: dict[int, "_Queue"] = {}  # id(pool) -> its queue of batches by priority
_LOCK = threading.Lock()
_RECORDS: list[dict] = []  # in a worker process: the log records of the batch it runs


def worker_count(setting: int | None = None) -> int:
    """How many processes pseudonymise at once: ``setting`` (the spec's
    ``pseudonymization.workers``), else ``PACS2BIDS_DEID_WORKERS``, else the machine's cores.
    Raises :class:`ValueError` naming the variable when it is not a whole number >= 1."""
    if setting is not None:
        return max(1, int(setting))
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return max(1, os.cpu_count() or 1)
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={raw!r} is not a whole number >= 1: set it to the number of worker processes "
                         "(1 pseudonymises in the run's own process)")
    return n


class _Capture(logging.Handler):
    """In a worker: keeps the records of the running batch, to be sent back with its result."""

    def emit(self, record: logging.LogRecord) -> None:
        _RECORDS.append({"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                         "msg": record.getMessage(), "pathname": record.pathname, "lineno": record.lineno,
                         "funcName": record.funcName, "module": record.module, "created": record.created,
                         "process": record.process, "processName": record.processName})


def _init_worker() -> None:
    root = logging.getLogger()
    root.handlers[:] = [_Capture()]
    root.setLevel(logging.WARNING)


def executor(n: int) -> ProcessPoolExecutor:
    """The process pool of ``n`` workers shared by this process (created on first use)."""
    with _LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["pacs2bids.deid.series"])
            pool = _POOLS[n] = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker)
    return pool


@atexit.register
def shutdown() -> None:
    """Stop the shared pools (their workers exit)."""
    with _LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
        _QUEUES.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _call(fn: Callable, args: tuple) -> tuple[object, list[dict]]:
    """Run in a worker: ``fn(*args)`` and the log records it emitted."""
    del _RECORDS[:]
    try:
        return fn(*args), list(_RECORDS)
    finally:
        del _RECORDS[:]


def _relog(records: list[dict]) -> None:
    """Hand a worker's records to the parent's loggers of the same names."""
    for rec in records:
        logger = logging.getLogger(rec["name"])
        if logger.isEnabledFor(rec["levelno"]):
            logger.handle(logging.makeLogRecord({**rec, "args": None, "exc_info": None}))


class _Queue:
    """The batches waiting for one shared pool, smallest ``priority`` first (then first come):
    at most ``workers + 1`` are handed to the pool at a time (what it feeds its workers anyway), the
    next one as each finishes. The pool's own queue is first come, first served: a 7-file series
    of a small study waited there behind every batch a 1,700-file study had sent before it (issue 12)."""

    def __init__(self, pool: ProcessPoolExecutor, workers: int):
        self.pool, self.limit = pool, workers + 1
        self.heap: list = []
        self.running = 0
        self.seq = itertools.count()
        self.lock = threading.Lock()

    def submit(self, priority: int, fn: Callable, batch: tuple) -> Future:
        outer: Future = Future()
        with self.lock:
            heapq.heappush(self.heap, (priority, next(self.seq), outer, fn, batch))
        self._pump()
        return outer

    def _pump(self) -> None:
        while True:
            with self.lock:
                if self.running >= self.limit or not self.heap:
                    return
                _, _, outer, fn, batch = heapq.heappop(self.heap)
                if not outer.set_running_or_notify_cancel():  # cancelled while it waited
                    continue
                self.running += 1
            try:
                inner = self.pool.submit(_call, fn, batch)
            except BaseException as exc:  # a broken or shut-down pool: the caller sees it at its result
                self._finish(outer, None, exc)
            else:
                inner.add_done_callback(lambda f, outer=outer: self._finish(outer, f, None))

    def _finish(self, outer: Future, inner: Future | None, exc: BaseException | None) -> None:
        with self.lock:
            self.running -= 1
        if inner is not None:
            exc = CancelledError() if inner.cancelled() else inner.exception()
        if exc is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(inner.result())
        self._pump()


def _queue(pool: ProcessPoolExecutor, workers: int) -> _Queue:
    with _LOCK:
        queue = _QUEUES.get(id(pool))
        if queue is None or queue.pool is not pool:
            queue = _QUEUES[id(pool)] = _Queue(pool, workers)
    return queue


def map_ordered(fn: Callable, batches: Iterable[tuple], workers: int, window: int | None = None,
                priority: int = 0) -> Iterator:
    """``fn(*batch)`` for each batch, yielded in the batches' order.

    ``workers > 1``: in the shared process pool, at most ``window`` (default ``2 * workers``)
    batches in flight; ``fn`` and its arguments must pickle. Batches of every caller wait for the
    pool's workers in one queue, lowest ``priority`` first (a series passes its number of files:
    small series are not held behind a large one's batches), in order of submission between equals.
    ``workers == 1``: in this thread.
    A failure of ``fn`` is raised when its result is reached; the batches not yet run are cancelled.
    A worker that dies breaks the pool (:class:`BrokenProcessPool` is raised): it is replaced at the
    next call, so one lost series does not fail the rest of the run.
    """
    if workers <= 1:
        for batch in batches:
            yield fn(*batch)
        return
    pool, todo, pending = executor(workers), iter(batches), deque()
    queue, window = _queue(pool, workers), window or 2 * workers
    try:
        for batch in todo:
            pending.append(queue.submit(priority, fn, batch))
            if len(pending) >= window:
                break
        while pending:
            try:
                result, records = pending.popleft().result()
            except BrokenProcessPool:  # a worker died (killed, out of memory): the next series gets a new pool
                with _LOCK:
                    if _POOLS.get(workers) is pool:
                        del _POOLS[workers]
                raise
            _relog(records)
            for batch in todo:  # one in, one out
                pending.append(queue.submit(priority, fn, batch))
                break
            yield result
    finally:
        for fut in pending:
            fut.cancel()
