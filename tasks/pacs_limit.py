"""The per-PACS bound on connections across runs and workers: a Prefect global concurrency limit
(named by :func:`pacs_limit_name`), held by every association or DICOMweb request this process
opens to the PACS once the flow calls :func:`use_pacs_limit` (through :mod:`pacs2bids.pacs.gate`)."""

import contextvars
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

from prefect.logging import get_run_logger

from pacs2bids.config import ProjectSpec
from pacs2bids.pacs import gate

LEASE_SECONDS = 60.0  # a slot held by a process that died is freed after this long (Prefect's minimum)
WAIT_LOG_SECONDS = 30.0  # a connection waiting for a slot says so this often
POLL_SECONDS = 0.2  # a connection refused a slot asks again at least this often


def _log():
    """Prefect's run logger (the UI, the console), else a ``prefect.*`` logger: never the
    ``pacs2bids`` logger, whose lines go into the dataset's run log, where words like "limit"
    or "slot" could equal a patient's name and stop the run at the leak scan."""
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("prefect.pacs2bids.slots")


def _ephemeral() -> bool:
    """True when no Prefect server is configured: each run starts its own in-process API on the
    local database, which neither keeps leases across processes nor revokes expired ones."""
    from prefect.settings import get_current_settings

    return not get_current_settings().api.url


_EPHEMERAL_LOCKS: dict[str, int] = {}


def reclaim_dead_runs_slots(name: str) -> int | None:
    """Ephemeral mode only: give back the slots of ``name`` that runs killed earlier kept.

    Every run on the local Prefect database holds a shared ``flock`` on a file in PREFECT_HOME
    for its life (the kernel drops it when the process dies). A run that can take it
    exclusively is alone, so every slot still counted was taken by a run that is gone: the count
    is reset to 0. Returns the number of slots given back, or None when another run is alive
    (its slots are real) or a server is configured (its leases expire by themselves)."""
    import fcntl

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.settings import get_current_settings

    if not _ephemeral():
        return None
    home = Path(get_current_settings().home)
    home.mkdir(parents=True, exist_ok=True)
    fd = _EPHEMERAL_LOCKS.get(name)
    if fd is None:
        fd = os.open(home / f"pacs2bids-{re.sub(r'[^A-Za-z0-9.@_-]+', '_', name)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        _EPHEMERAL_LOCKS[name] = fd
    freed = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass
    else:
        with get_client(sync_client=True) as client:
            held = client.read_global_concurrency_limit_by_name(name).active_slots
            if held:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
                _log().warning("PACS limit %s: %d slot(s) kept by runs that were killed were given back", name, held)
            freed = held
    fcntl.flock(fd, fcntl.LOCK_SH)  # held until this process ends
    return freed


def pacs_limit_name(spec: ProjectSpec) -> str:
    """The Prefect global concurrency limit shared by every run and worker using this PACS."""
    if spec.pacs.chosen == "dimse":
        d = spec.pacs.dimse
        return f"pacs2bids-pacs-{d.ae_title}@{d.host}:{d.port}"
    # limit names may not hold / % & < >
    return "pacs2bids-pacs-" + re.sub(r"[/%&<>]+", "_", spec.pacs.dicomweb.url.split("://", 1)[1])


def ensure_pacs_limit(spec: ProjectSpec) -> str:
    """Create (or update) the PACS's global concurrency limit to ``pacs.max_associations``;
    returns its name. Runs that configure different values for one PACS: the last one started wins."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = pacs_limit_name(spec)
    limit = spec.pacs.max_associations
    with get_client(sync_client=True) as client:
        for _ in range(2):  # another run may create it between our read and our create
            try:
                current = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True))
                    return name
                except ObjectAlreadyExists:
                    continue
            if current.limit != limit or not current.active:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
            return name
    return name


class PrefectGate:
    """A :data:`pacs2bids.pacs.gate.Gate` backed by a Prefect global concurrency limit.

    Each slot is a lease of the limit taken, renewed and given back over one client this gate
    keeps (Prefect's API, not its ``concurrency`` context): a slot taken by one thread can be given
    back by another (an association is opened by the thread that needs it and may be released by
    the pool's reaper), nothing is recorded on the task run that took it, and one thread renews
    every lease the gate holds. A refused connection asks again after the server's
    ``Retry-After``, at most :data:`POLL_SECONDS`: every waiter, of this process or another, asks
    on its own at the same pace, so a slot given back is taken within about that long by whoever
    asks first (Prefect's ``concurrency`` queued a process's waiters behind each other's sleeps,
    and its release waited for its lease thread: seconds per small study, issue 12).
    """

    def __init__(self, name: str, lease_seconds: float = LEASE_SECONDS, wait_log_seconds: float = WAIT_LOG_SECONDS,
                 poll_seconds: float = POLL_SECONDS):
        self.name, self.lease_seconds, self.wait_log_seconds = name, lease_seconds, wait_log_seconds
        self.poll_seconds = poll_seconds
        self._client = None
        self._lock = threading.Lock()  # one request at a time on the shared client
        self._leases: set = set()  # the leases held, renewed by the renewer thread
        self._renewer: threading.Thread | None = None

    def _call(self, method: str, *args):
        from prefect.client.orchestration import get_client

        with self._lock:
            if self._client is None:
                # an empty context, not the caller's: nothing recorded on the task run that opened it
                client = contextvars.Context().run(get_client, sync_client=True)
                client.__enter__()
                self._client = client
            return getattr(self._client, method)(*args)

    def _say_waiting(self, waited: float) -> None:
        """One line saying what this connection waits for: which limit, how many slots are held."""
        try:
            limit = self._call("read_global_concurrency_limit_by_name", self.name)
            held = f"{limit.active_slots} of {limit.limit} slots held"
        except Exception as exc:  # a side output: never worth failing the wait for
            held = f"slots unknown ({type(exc).__name__})"
        _log().warning("waiting %.0f s for a slot of the PACS limit %s: %s by other connections or runs (a killed "
                    "run's slots come back when their %.0f s lease expires)", waited, self.name, held,
                    self.lease_seconds)

    def _acquire(self) -> str:
        """Take one slot (waiting as long as it takes); returns its lease's id."""
        import httpx

        started = time.monotonic()
        next_log = started + self.wait_log_seconds
        while True:
            try:
                response = self._call("increment_concurrency_slots_with_lease", [self.name], 1, "concurrency",
                                      self.lease_seconds)
                break
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:  # 423 Locked: every slot is held
                    raise
                retry = float(exc.response.headers.get("Retry-After") or self.poll_seconds)
            now = time.monotonic()
            if now >= next_log:
                self._say_waiting(now - started)
                next_log = now + self.wait_log_seconds
            time.sleep(min(retry, self.poll_seconds))
        body = response.json()
        if not body.get("limits"):
            from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

            raise ConcurrencySlotAcquisitionError(
                f"the PACS limit {self.name} does not exist on the Prefect server: it is created when the run "
                "starts (pacs2bids.tasks.pacs_limit.use_pacs_limit)")
        return body["lease_id"]

    def _renew(self) -> None:
        """The gate's renewer: every third of the lease, each lease held is renewed (a failure is
        logged; the slot then frees itself when its lease expires, as a killed run's would)."""
        while True:
            time.sleep(self.lease_seconds / 3)
            with self._lock:
                leases = list(self._leases)
            for lease_id in leases:
                try:
                    self._call("renew_concurrency_lease", lease_id, self.lease_seconds)
                except Exception as exc:
                    _log().warning("the lease of a slot of the PACS limit %s could not be renewed (%s)", self.name,
                                   type(exc).__name__)

    def __call__(self) -> Callable[[], None]:
        lease_id = self._acquire()
        with self._lock:
            self._leases.add(lease_id)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew, daemon=True, name="pacs2bids-pacs-leases")
                self._renewer.start()

        def release() -> None:
            with self._lock:
                if lease_id not in self._leases:
                    return  # given back already
                self._leases.discard(lease_id)
            try:
                self._call("release_concurrency_slots_with_lease", lease_id)
            except Exception as exc:  # the slot frees itself when its lease expires
                _log().warning("a slot of the PACS limit %s could not be given back (%s): it frees itself within "
                               "%.0f s", self.name, type(exc).__name__, self.lease_seconds)

        return release


def use_pacs_limit(spec: ProjectSpec) -> str:
    """Create or update the PACS's global concurrency limit, and make every connection this
    process opens to the PACS hold one of its slots. Returns the limit's name."""
    name = ensure_pacs_limit(spec)
    reclaim_dead_runs_slots(name)
    gate.set_gate(spec.pacs, PrefectGate(name))
    return name
