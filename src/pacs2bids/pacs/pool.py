"""A bounded pool of DIMSE associations to one PACS, with a reaper for idle ones.

:class:`AssociationPool` keeps at most ``max_associations`` open to one PACS, shared by every
caller in the process (:func:`pool_for`); when a gate is installed for the PACS
(:mod:`pacs2bids.pacs.gate`), each open association also holds one of its slots, so the bound
holds across processes. Every network call has the spec's ``timeout``.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE

from ..config import DimseSettings
from ..errors import PacsError
from ..sopclasses import DEFAULT_STORAGE_CLASSES
from .gate import gate_for
from .contexts import ECHO, FIND, GET, MOVE, accept_ignored_scp_roles, storage_contexts
from .scp import Receiver, store_handler
from .status import peer
from .tls import client_context, diagnose

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    assoc: object
    classes: frozenset[str]
    last_used: float
    receiver: Receiver | None = None
    release_gate: Callable[[], None] | None = None  # gives back the PACS-wide slot this association holds


@dataclass
class PoolStats:
    opened: int = 0
    open_now: int = 0
    max_open: int = 0
    requests: int = 0


class AssociationPool:
    """At most ``settings.max_associations`` associations open at once to one PACS, reused.

    :meth:`session` lends an established association, waiting for one to be free as long as
    it takes (an association in use always comes back: every DIMSE call has a timeout).
    When a gate is installed for the PACS (:func:`pacs2bids.pacs.gate.set_gate`), every open
    association holds one of its slots, taken before the association is requested and given
    back once it is released, so that every process sharing the gate stays within its bound.
    Idle associations are released after ``idle_seconds`` by a background reaper (PACS close
    idle associations anyway, Orthanc after DicomScpTimeout, and an idle one holds a slot
    another run may be waiting for), and at once when a thread of this process is waiting for
    a slot. ``stats`` counts what was opened.
    """

    def __init__(self, settings: DimseSettings, *, idle_seconds: float = 5.0):
        self.settings = settings
        self.idle_seconds = idle_seconds
        self.stats = PoolStats()
        self._idle: list[_Slot] = []
        self._cond = threading.Condition()
        self._gate_waiters = 0  # threads of this process waiting for a PACS-wide slot
        self._reaper: threading.Thread | None = None
        self._tls_args = None  # built once, on the first association (pacs.dimse.tls)

    # -- opening ----------------------------------------------------------------------
    def _open(self, classes: frozenset[str]) -> _Slot:
        """Take a slot of the PACS's gate (if any), then open an association; the slot is
        given back if the association cannot be had."""
        gate = gate_for(self.settings)
        release_gate = None
        if gate is not None:
            with self._cond:
                self._gate_waiters += 1
            try:
                release_gate = gate()
            finally:
                with self._cond:
                    self._gate_waiters -= 1
        try:
            slot = self._associate(classes)
        except BaseException:
            if release_gate is not None:
                release_gate()
            raise
        slot.release_gate = release_gate
        return slot

    def _associate(self, classes: frozenset[str]) -> _Slot:
        s = self.settings
        ae = AE(ae_title=s.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.timeout
        ae.connection_timeout = min(s.timeout, 30.0)
        ae.maximum_pdu_size = 0  # no limit on what we receive
        contexts = [build_context(ECHO), build_context(FIND), build_context(GET), build_context(MOVE)]
        contexts += storage_contexts(classes - DEFAULT_STORAGE_CLASSES)
        offered = frozenset(str(c.abstract_syntax) for c in contexts[4:])
        if classes - offered:
            log.warning("%d announced SOP class(es) do not fit in one association's presentation contexts; "
                        "their instances will be reported missing", len(classes - offered))
        roles = [build_role(uid, scp_role=True) for uid in sorted(offered)]
        rejection: dict = {}

        def on_acse(event):
            p = event.primitive
            if isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02):
                rejection.update(result=p.result_str, source=p.source_str, reason=p.reason_str, transient=p.result == 2)

        slot = _Slot(None, offered, time.monotonic())
        handlers = [
            (evt.EVT_C_STORE, store_handler(lambda event: slot.receiver)),
            (evt.EVT_ACSE_RECV, on_acse),
        ]
        if s.tls is not None and self._tls_args is None:
            self._tls_args = client_context(s.tls, s.host)
        try:
            assoc = ae.associate(s.host, s.port, contexts=contexts, ae_title=s.ae_title, ext_neg=roles,
                                 evt_handlers=handlers, tls_args=self._tls_args)
        except OSError as exc:  # socket.gaierror: the host name does not resolve
            raise PacsError(
                f"cannot open an association with {peer(s)}: {_socket_reason(exc)}. Check pacs.dimse.host "
                f"({s.host!r}) for spelling, and that this machine's DNS (or /etc/hosts) knows it.",
                transient=False,
            ) from None
        if not assoc.is_established:
            _wait_closed(assoc)
            where = f"{peer(s)}"
            if rejection:
                raise PacsError(
                    f"association rejected by {where}: {rejection['result']}, source {rejection['source']}, "
                    f"reason {rejection['reason']!r}. Check that the PACS's AE title is {s.ae_title!r} and that it "
                    f"knows our calling AE title {s.calling_ae_title!r} (and our host) among its modalities.",
                    transient=rejection["transient"],
                )
            why, transient = diagnose(s.tls, s.host, s.port, min(s.timeout, 10.0)) if s.tls else ("", True)
            if why:
                raise PacsError(f"cannot open a TLS association with {where}: {why}", transient=transient)
            raise PacsError(
                f"cannot open an association with {where}: no answer or connection refused within "
                f"{s.timeout:.0f} s. Check that the PACS is running, that host {s.host} and port {s.port} are "
                f"right, and that no firewall blocks the port.",
                transient=True,
            )
        accept_ignored_scp_roles(assoc)
        slot.assoc = assoc
        self.stats.opened += 1
        return slot

    @contextmanager
    def session(self, classes: frozenset[str] = frozenset(), receiver: Receiver | None = None) -> Iterator[object]:
        """Lend an association offering storage of ``classes`` (beyond the defaults); received
        instances go to ``receiver``. Raises :class:`PacsError` if none can be opened."""
        slot: _Slot | None = None
        with self._cond:
            while True:
                now = time.monotonic()
                for stale in [x for x in self._idle if now - x.last_used > self.idle_seconds or not x.assoc.is_established]:
                    self._idle.remove(stale)
                    self._close(stale)
                fit = next((x for x in self._idle if classes <= x.classes), None)
                if fit is not None:
                    self._idle.remove(fit)
                    slot = fit
                    break
                if self._idle and (self.stats.open_now >= self.settings.max_associations
                                   or gate_for(self.settings) is not None):
                    # idle ones of the wrong kind: replace one (it holds a slot we need)
                    self._close(self._idle.pop(0))
                    continue
                if self.stats.open_now < self.settings.max_associations:
                    self.stats.open_now += 1  # reserve; released below on failure
                    break
                self._cond.wait()
            self.stats.max_open = max(self.stats.max_open, self.stats.open_now)
        if slot is None:
            try:
                slot = self._open(classes)
            except BaseException:
                with self._cond:
                    self.stats.open_now -= 1
                    self._cond.notify_all()
                raise
        slot.receiver = receiver
        self.stats.requests += 1
        try:
            yield slot.assoc
        finally:
            slot.receiver = None
            slot.last_used = time.monotonic()
            with self._cond:
                if slot.assoc.is_established and not self._gate_waiters:
                    self._idle.append(slot)
                    self._start_reaper()
                else:  # dead, or a thread here waits for a PACS-wide slot: give ours back
                    self._close(slot)
                self._cond.notify_all()

    def _start_reaper(self) -> None:
        # called with the lock held
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="pacs2bids-pool-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Release idle associations once they have been idle ``idle_seconds``; ends when none is idle."""
        with self._cond:
            while self._idle:
                now = time.monotonic()
                for stale in [x for x in self._idle if now - x.last_used >= self.idle_seconds]:
                    self._idle.remove(stale)
                    self._close(stale)
                if self._idle:
                    oldest = min(x.last_used for x in self._idle)
                    self._cond.wait(timeout=max(0.05, oldest + self.idle_seconds - now))
            self._cond.notify_all()
            if self._reaper is threading.current_thread():
                self._reaper = None

    def _close(self, slot: _Slot) -> None:
        # called with the lock held; the PACS-wide slot is given back only once the
        # connection is closed, so that the bound holds at every instant
        try:
            if slot.assoc.is_established:
                slot.assoc.release()
        except Exception:  # a dead peer: nothing more to do
            pass
        _wait_closed(slot.assoc)
        self.stats.open_now -= 1
        if slot.release_gate is not None:
            release, slot.release_gate = slot.release_gate, None
            try:
                release()
            except Exception:  # the slot's lease expires on its own
                log.warning("could not give back a PACS-wide association slot; its lease will expire", exc_info=True)

    def close(self) -> None:
        """Release every idle association."""
        with self._cond:
            while self._idle:
                self._close(self._idle.pop())
            self._cond.notify_all()


def _wait_closed(assoc, timeout: float = 10.0) -> None:
    """Wait until the association's connection is closed (its DUL thread has ended);
    abort it if it is still open after ``timeout`` seconds."""
    dul = getattr(assoc, "dul", None)
    if dul is None:
        return
    deadline = time.monotonic() + timeout
    while dul.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    if dul.is_alive():
        try:
            assoc.abort()
        except Exception:
            pass


_POOLS: dict[tuple, AssociationPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(settings: DimseSettings) -> AssociationPool:
    """The process-wide pool for this PACS (same host, port, AE titles and limits)."""
    key = (settings.host, settings.port, settings.ae_title, settings.calling_ae_title, settings.max_associations)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.settings != settings:
            pool = _POOLS[key] = AssociationPool(settings)
        return pool


def close_pools() -> None:
    """Release every pooled association (at the end of a run, or in tests)."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


def _socket_reason(exc: OSError) -> str:
    import socket

    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror or exc})"
    return exc.strerror or str(exc)

