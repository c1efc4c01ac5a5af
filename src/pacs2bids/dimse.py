"""DIMSE with a PACS: statuses, a bounded association pool, C-ECHO, C-FIND, C-GET, C-MOVE.

The one place where DIMSE statuses are translated (PS3.4 Annex C.4, PS3.7 Annex C): every
answer becomes a :class:`StatusInfo` (category, meaning, whether a retry may help), and
:func:`raise_for_status` turns failures into :class:`~pacs2bids.errors.PacsError` messages
that name the peer and the fix.

Associations are reused: :class:`AssociationPool` keeps at most ``max_associations`` open to
one PACS, shared by every caller in the process (:func:`pool_for`); when a gate is installed
for the PACS (:mod:`pacs2bids.limits`), each open association also holds one of its slots, so
the bound holds across processes. Every network call has the spec's ``timeout``.

Received instances (C-GET sub-operations on our association, or C-MOVE sub-operations on the
storage SCP this module starts) are never decoded in memory: pynetdicom writes each to a
temporary file as it arrives (``STORE_RECV_CHUNKED_DATASET``) and the handler hands that file
to a :class:`Receiver` (see :mod:`pacs2bids.retrieve`).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom import sop_class as sc
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import code_to_category

from . import limits
from .config import DimseSettings
from .errors import PacsError

log = logging.getLogger(__name__)

# Patient identifiers must never reach the logs (STYLE.md): pynetdicom logs query and
# response identifiers by default.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# Received C-STORE data sets are written to a temporary file as they arrive, never held
# whole in memory; the handler then moves that file into place.
_config.STORE_RECV_CHUNKED_DATASET = True

FIND = sc.StudyRootQueryRetrieveInformationModelFind
GET = sc.StudyRootQueryRetrieveInformationModelGet
MOVE = sc.StudyRootQueryRetrieveInformationModelMove
ECHO = sc.Verification

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
# Offered in separate presentation contexts (one transfer syntax is accepted per context,
# PS3.8 9.3.2.2) so a compressed instance arrives as stored, without the PACS transcoding it.
COMPRESSED = [
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEG2000,
    JPEGLSNearLossless,
]

# Storage SOP classes offered on every C-GET association (PS3.4 Annex B.5); the ones in
# IMAGE_CLASSES also get the compressed transfer syntaxes.
IMAGE_CLASSES = [
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.UltrasoundImageStorage,
    sc.UltrasoundMultiFrameImageStorage,
    sc.SecondaryCaptureImageStorage,
]
OTHER_CLASSES = [
    sc.MRSpectroscopyStorage,
    sc.EnhancedMRColorImageStorage,
    sc.LegacyConvertedEnhancedMRImageStorage,
    sc.LegacyConvertedEnhancedCTImageStorage,
    sc.PositronEmissionTomographyImageStorage,
    sc.EnhancedPETImageStorage,
    sc.XRayAngiographicImageStorage,
    sc.ComputedRadiographyImageStorage,
    sc.DigitalXRayImageStorageForPresentation,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameSingleBitSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.RawDataStorage,
    sc.BasicTextSRStorage,
    sc.EnhancedSRStorage,
    sc.ComprehensiveSRStorage,
    sc.KeyObjectSelectionDocumentStorage,
    sc.GrayscaleSoftcopyPresentationStateStorage,
    sc.EncapsulatedPDFStorage,
    sc.SegmentationStorage,
    sc.NuclearMedicineImageStorage,
]
DEFAULT_STORAGE_CLASSES = frozenset(str(u) for u in IMAGE_CLASSES + OTHER_CLASSES)
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255


# ---------------------------------------------------------------------------------------
# Statuses: the one place they are translated
# ---------------------------------------------------------------------------------------
_MEANINGS = {
    0x0000: "success",
    0xFF00: "pending",
    0xFF01: "pending (optional keys not supported)",
    0xFE00: "cancelled (for C-FIND: the PACS stopped returning matches, e.g. at its result limit)",
    0x0001: "warning: requested optional attributes are not supported",
    0xB000: "warning: some sub-operations failed",
    0xA700: "refused: out of resources",
    0xA701: "refused: out of resources, unable to calculate the number of matches",
    0xA702: "refused: out of resources, unable to perform sub-operations",
    0xA801: "refused: move destination unknown",
    0xA900: "identifier does not match the SOP class",
    0x0122: "SOP class not supported",
    0x0124: "refused: not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
}


@dataclass(frozen=True)
class StatusInfo:
    """A DIMSE status translated: ``category`` is success, pending, cancel, warning or failure."""

    code: int
    category: str
    meaning: str
    transient: bool

    @property
    def ok(self) -> bool:
        return self.category in ("success", "warning", "pending")


def classify(code: int | None) -> StatusInfo:
    """Translate a DIMSE status code (PS3.7 C.1-C.5, PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).

    ``None`` means no answer came (timeout or broken association): a transient failure.
    Out of resources (0xA7xx) and the processing-failure range 0xC000-0xCFFF are transient;
    everything else that fails (0xA801 move destination unknown, 0xA900, 0x0122 ...) is not,
    so it fails at once instead of being retried.
    """
    if code is None:
        return StatusInfo(-1, "failure", "no answer (timeout or association lost)", True)
    category = code_to_category(code).lower()
    if category == "unknown":
        category = "failure"
    if 0xC000 <= code <= 0xCFFF:
        meaning = "unable to process"
    else:
        meaning = _MEANINGS.get(code, f"status 0x{code:04X}")
    transient = category == "failure" and ((0xA700 <= code <= 0xA7FF) or (0xC000 <= code <= 0xCFFF))
    return StatusInfo(code, category, meaning, transient)


def _peer(s: DimseSettings) -> str:
    return f"PACS {s.ae_title}@{s.host}:{s.port} (we call as {s.calling_ae_title})"


class MoveDestinationUnknown(PacsError):
    """The PACS does not know (or cannot reach) our C-MOVE destination: declare our storage
    AE title, host and port among its modalities. Never worth a retry."""


def raise_for_status(info: StatusInfo, settings: DimseSettings, operation: str) -> None:
    """Raise :class:`PacsError` if ``info`` is a failure (or cancel), with the fix spelled out."""
    if info.category not in ("failure", "cancel"):
        return
    s = settings
    if info.code == 0xA801:
        dest = s.move_destination or s.calling_ae_title
        msg = (
            f"{operation}: {_peer(s)} answered 0xA801 'move destination unknown': it does not know "
            f"the AE title {dest!r}. Declare it among the PACS's DICOM modalities (Orthanc: "
            f"DicomModalities) as AE title {dest!r}, host {s.storage_host}, port {s.storage_port or '<storage_port>'}"
            f" (set pacs.dimse.storage_port to a fixed port), or use retrieve: c-get."
        )
        raise MoveDestinationUnknown(msg, transient=False, status=info.code)
    hint = {
        0x0124: "ask the PACS administrator to allow our calling AE title to query and retrieve",
        0x0122: "the PACS does not offer this service; try the other retrieve method or DICOMweb",
        0xA900: "this is a bug in pacs2bids's query keys; report it",
    }.get(info.code, "retry later; if it persists, check the PACS's logs" if info.transient else "check the PACS's logs")
    raise PacsError(
        f"{operation}: {_peer(s)} answered {info.meaning} (0x{info.code & 0xFFFF:04X}); {hint}",
        transient=info.transient,
        status=None if info.code < 0 else info.code,
    )


# ---------------------------------------------------------------------------------------
# Receiving instances
# ---------------------------------------------------------------------------------------
class Receiver(Protocol):
    """Takes one received instance: ``path`` is a temporary Part 10 file the receiver must move
    away (or leave, to have it deleted); returns the DIMSE status to answer (0x0000 stored)."""

    def __call__(self, path: Path, sop_class_uid: str, sop_instance_uid: str) -> int: ...


def _store_handler(get_receiver: Callable[[object], Receiver | None]):
    def handle(event) -> int:
        receiver = get_receiver(event)
        req = event.request
        if receiver is None:
            log.warning("an instance arrived that no retrieval expects; refused")
            return 0xC001  # PS3.4 B.2.3: error, cannot understand
        try:
            return receiver(Path(event.dataset_path), str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID))
        except Exception:  # the handler must answer; the receiver records the failure
            log.exception("storing a received instance failed")
            return 0xC002

    return handle


def storage_contexts(extra_classes: frozenset[str] = frozenset()) -> list:
    """Presentation contexts for receiving instances (C-GET), at most 124 (128 per association,
    PS3.8 9.3.2.2, less the four Q/R and Verification ones).

    ``extra_classes`` (SOP classes the instance-level query announced beyond the defaults,
    private ones included) come right after the image classes, so the cap never drops them
    before the defaults; compressed syntaxes get the room that is left."""
    extra = sorted(set(extra_classes) - DEFAULT_STORAGE_CLASSES)
    contexts = [build_context(uid, UNCOMPRESSED) for uid in list(IMAGE_CLASSES) + extra]
    for uid in sorted(DEFAULT_STORAGE_CLASSES - {str(u) for u in IMAGE_CLASSES}):
        contexts.append(build_context(uid, UNCOMPRESSED))
    # the acceptor picks one syntax per context: big endian, deflate and every compressed
    # syntax get their own context for image classes, so no instance needs transcoding
    for uid in list(IMAGE_CLASSES) + extra:
        for ts in UNCOMPRESSED[1:] + COMPRESSED:
            contexts.append(build_context(uid, [ts]))
    return contexts[: _MAX_CONTEXTS - 4]


def _accept_ignored_scp_roles(assoc) -> None:
    """Let the PACS send C-STOREs on storage contexts it accepted while ignoring our SCP/SCU role
    proposal. Strictly (PS3.7 D.3.3.4) an unanswered role item leaves the default roles, and
    pynetdicom then refuses those C-STOREs with 0x0122; Orthanc accepts unknown (private) SOP
    classes that way and sends on them anyway, so its private instances would never arrive
    by C-GET. We proposed the SCP role for every storage context we offered, so taking it is
    what we asked for; an explicit refusal of the role is respected. (pynetdicom has no public
    setter: ``_as_scp`` is pinned by constraints.txt and tests/test_retrieve.py fails if it stops
    working.)"""
    answered = {str(uid) for uid in assoc.acceptor.role_selection}
    for cx in assoc.accepted_contexts:
        uid = str(cx.abstract_syntax)
        if cx.as_scp is False and uid not in answered and uid not in (ECHO, FIND, GET, MOVE):
            cx._as_scp = True


# ---------------------------------------------------------------------------------------
# Association pool
# ---------------------------------------------------------------------------------------
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
    When a gate is installed for the PACS (:func:`pacs2bids.limits.set_gate`), every open
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

    # -- opening ----------------------------------------------------------------------
    def _open(self, classes: frozenset[str]) -> _Slot:
        """Take a slot of the PACS's gate (if any), then open an association; the slot is
        given back if the association cannot be had."""
        gate = limits.gate_for(self.settings)
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
        ae.acse_timeout = s.timeout
        ae.dimse_timeout = s.timeout
        ae.network_timeout = s.timeout
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
            (evt.EVT_C_STORE, _store_handler(lambda event: slot.receiver)),
            (evt.EVT_ACSE_RECV, on_acse),
        ]
        try:
            assoc = ae.associate(s.host, s.port, contexts=contexts, ae_title=s.ae_title, ext_neg=roles,
                                 evt_handlers=handlers)
        except OSError as exc:  # socket.gaierror: the host name does not resolve
            raise PacsError(
                f"cannot open an association with {_peer(s)}: {_socket_reason(exc)}. Check pacs.dimse.host "
                f"({s.host!r}) for spelling, and that this machine's DNS (or /etc/hosts) knows it.",
                transient=False,
            ) from None
        if not assoc.is_established:
            _wait_closed(assoc)
            where = f"{_peer(s)}"
            if rejection:
                raise PacsError(
                    f"association rejected by {where}: {rejection['result']}, source {rejection['source']}, "
                    f"reason {rejection['reason']!r}. Check that the PACS's AE title is {s.ae_title!r} and that it "
                    f"knows our calling AE title {s.calling_ae_title!r} (and our host) among its modalities.",
                    transient=rejection["transient"],
                )
            raise PacsError(
                f"cannot open an association with {where}: no answer or connection refused within "
                f"{s.timeout:.0f} s. Check that the PACS is running, that host {s.host} and port {s.port} are "
                f"right, and that no firewall blocks the port.",
                transient=True,
            )
        _accept_ignored_scp_roles(assoc)
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
                                   or limits.gate_for(self.settings) is not None):
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


# ---------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------
@dataclass
class FindResult:
    matches: list[Dataset] = field(default_factory=list)
    truncated: bool = False  # the PACS stopped early (result limit): split the query


@dataclass
class RetrieveResult:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: StatusInfo | None = None


def _with_retry_on_lost_association(pool: AssociationPool, op: Callable, **kw):
    """Run ``op(assoc)`` once; if a pooled association turned out dead (no answer at all),
    try once more on a fresh one."""
    for attempt in (1, 2):
        with pool.session(**kw) as assoc:
            started = time.monotonic()
            try:
                return op(assoc)
            except _LostAssociation:
                assoc.abort()
                if time.monotonic() - started >= 0.9 * pool.settings.timeout:
                    # it was alive but silent: asking again at once would only double the load
                    raise PacsError(
                        f"{_peer(pool.settings)} did not answer within {pool.settings.timeout:.0f} s (timeout). "
                        "A study on near-line storage (tape, cold archive) can take longer: raise "
                        "pacs.dimse.timeout, or let the retries and the dead-letter list take it",
                        transient=True,
                    ) from None
                if attempt == 2:
                    raise PacsError(
                        f"{_peer(pool.settings)} closed the association or did not answer within "
                        f"{pool.settings.timeout:.0f} s; check that it is running and not overloaded",
                        transient=True,
                    ) from None


def _socket_reason(exc: OSError) -> str:
    import socket

    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror or exc})"
    return exc.strerror or str(exc)


class _LostAssociation(Exception):
    pass


def echo(settings: DimseSettings) -> StatusInfo:
    """C-ECHO (PS3.7 9.1.5). Raises :class:`PacsError` if the PACS cannot be reached."""
    pool = pool_for(settings)

    def op(assoc):
        status = assoc.send_c_echo()
        if not status:
            raise _LostAssociation()
        return classify(status.Status)

    info = _with_retry_on_lost_association(pool, op)
    raise_for_status(info, settings, "C-ECHO")
    return info


def find(settings: DimseSettings, identifier: Dataset) -> FindResult:
    """C-FIND, Study Root (PS3.4 C.4.1). Returns every match and whether the PACS stopped
    early (Cancel 0xFE00 after matches, as Orthanc does at ``LimitFindResults``).
    Raises :class:`PacsError` on failure statuses."""
    pool = pool_for(settings)

    def op(assoc):
        result = FindResult()
        final = None
        for status, ident in assoc.send_c_find(identifier, FIND):
            if not status:
                raise _LostAssociation()
            info = classify(status.Status)
            if info.category == "pending":
                if ident is not None:
                    result.matches.append(ident)
            else:
                final = info
        if final is None:
            raise _LostAssociation()
        if final.category == "cancel":
            result.truncated = True
        else:
            raise_for_status(final, settings, f"C-FIND at {identifier.QueryRetrieveLevel} level")
        return result

    return _with_retry_on_lost_association(pool, op)


def _retrieve(assoc, gen, settings: DimseSettings, operation: str, peer_reached_us: bool = False) -> RetrieveResult:
    result = RetrieveResult()
    last = None
    for status, _ident in gen:
        if not status:
            raise _LostAssociation()
        last = status
    if last is None:
        raise _LostAssociation()
    info = classify(last.Status)
    result.status = info
    result.completed = int(getattr(last, "NumberOfCompletedSuboperations", 0) or 0)
    result.failed = int(getattr(last, "NumberOfFailedSuboperations", 0) or 0)
    result.warning = int(getattr(last, "NumberOfWarningSuboperations", 0) or 0)
    if info.category == "failure" and not (info.code in (0xA702,) or result.completed):
        if (operation == "C-MOVE" and 0xC000 <= info.code <= 0xCFFF and not (result.failed or result.warning)
                and not peer_reached_us):
            # Orthanc (and other PACS) answer 0xC000 with no sub-operation, instead of 0xA801,
            # when they do not know the destination: a retry cannot help. Once the PACS has
            # connected to our storage SCP it knows us, and the failure is something else.
            # Orthanc gives the same answer when it knows the destination but cannot connect to
            # it (wrong host or port in its entry, firewall): both causes are named
            dest = settings.move_destination or settings.calling_ae_title
            where = f"{settings.storage_host}:{settings.storage_port or '<storage_port>'}"
            raise MoveDestinationUnknown(
                f"C-MOVE: {_peer(settings)} answered {info.meaning} (0x{info.code:04X}) before sending anything, "
                f"and our storage SCP at {where} received no connection: either the PACS does not know the "
                f"move destination {dest!r} (what other PACS answer as 0xA801 'move destination unknown'), or it "
                f"knows it but could not connect to the host and port it has for it. Declare (or correct) it among the PACS's DICOM modalities (Orthanc: DicomModalities) as AE "
                f"title {dest!r}, host {settings.storage_host}, port {settings.storage_port or '<storage_port>'} "
                f"(set pacs.dimse.storage_port to a fixed port), check that no firewall blocks that port, or use "
                f"retrieve: c-get. `pacs2bids check` tells the two causes apart where the PACS allows it.",
                transient=False,
                status=info.code,
            )
        raise_for_status(info, settings, operation)
    return result


def get(settings: DimseSettings, identifier: Dataset, receiver: Receiver, classes: frozenset[str] = frozenset()) -> RetrieveResult:
    """C-GET, Study Root (PS3.4 C.4.3): instances arrive on the same association and go to
    ``receiver``. A failure with partial results is returned (the caller counts what is
    missing); a failure with nothing done raises :class:`PacsError`."""
    pool = pool_for(settings)
    return _with_retry_on_lost_association(
        pool,
        lambda assoc: _retrieve(assoc, assoc.send_c_get(identifier, GET), settings, "C-GET"),
        classes=classes,
        receiver=receiver,
    )


def move(settings: DimseSettings, identifier: Dataset, destination: str,
         server: "StorageServer | None" = None) -> RetrieveResult:
    """C-MOVE, Study Root (PS3.4 C.4.2) to ``destination`` (our storage SCP's AE title).
    0xA801 (destination unknown), or a processing failure before any sub-operation while
    the PACS has never connected to ``server``, raises at once with the fix, never retried."""
    pool = pool_for(settings)
    return _with_retry_on_lost_association(
        pool,
        lambda assoc: _retrieve(
            assoc, assoc.send_c_move(identifier, destination, MOVE), settings, "C-MOVE",
            peer_reached_us=bool(server and server.connections),
        ),
    )


# ---------------------------------------------------------------------------------------
# Storage SCP for C-MOVE
# ---------------------------------------------------------------------------------------
_REGISTER_LOCK = threading.Lock()


def _register_storage_class(uid: str) -> None:
    """Make pynetdicom's acceptor treat ``uid`` (a private or newer SOP class) as a Storage SOP
    class: it dispatches each request by SOP class, and aborts the association for one it does
    not know. Registered only for classes a query announced, not for everything
    (``_config.UNRESTRICTED_STORAGE_SERVICE`` would accept any)."""
    from pynetdicom.service_class import ServiceClass, StorageServiceClass
    from pynetdicom.sop_class import register_uid, uid_to_service_class

    with _REGISTER_LOCK:
        if uid_to_service_class(uid) is ServiceClass:  # unknown to pynetdicom; never re-map a known one
            register_uid(uid, "Pacs2bidsStorage_" + uid.replace(".", "_"), StorageServiceClass)


class StorageServer:
    """Our storage SCP, shared by every C-MOVE of the process on one (host, port, AE title).

    Instances are routed by SeriesInstanceUID to the receiver that expects that series
    (:meth:`expect_series`); the receiver then checks each one. Started on first use, stopped when the last user leaves.
    """

    def __init__(self, host: str, port: int, ae_title: str, timeout: float, max_associations: int = 4):
        self.host, self.ae_title = host, ae_title
        self._routes: dict[str, Receiver] = {}
        self._lock = threading.Lock()
        self._users = 0
        ae = AE(ae_title=ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.maximum_pdu_size = 0
        ae.require_called_aet = True
        # E5 both ways: a PACS (or anything else on the network) cannot make us run more than
        # this many receiving threads; pynetdicom rejects one more with A-ASSOCIATE-RJ
        # (transient, service provider ACSE, local limit exceeded: PS3.8 9.3.4), read per association
        ae.maximum_associations = max_associations
        for uid in sorted(DEFAULT_STORAGE_CLASSES):
            ae.add_supported_context(uid, UNCOMPRESSED + COMPRESSED)
        ae.add_supported_context(ECHO)
        self._ae = ae
        self.connections = 0  # associations the PACS opened to us: it knows our AE
        self._server = ae.start_server(
            (host, port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, _store_handler(self._route)), (evt.EVT_ESTABLISHED, self._connected)],
        )
        self.port = self._server.server_address[1]

    def _connected(self, event) -> None:
        with self._lock:
            self.connections += 1

    def _route(self, event) -> Receiver | None:
        with self._lock:
            routes = dict(self._routes)
        if len(routes) <= 1:
            return next(iter(routes.values()), None)
        try:
            head = dcmread(event.dataset_path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            return routes.get(str(head.SeriesInstanceUID))
        except Exception:  # unreadable: nobody can claim it
            return None

    @property
    def maximum_associations(self) -> int:
        """Associations accepted at once; one more is rejected (read for each new association)."""
        return self._ae.maximum_associations

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._ae.maximum_associations = value

    def support(self, classes: frozenset[str]) -> None:
        """Accept storage of ``classes`` too (SOP classes an instance-level query announced,
        private ones included), from the next association on: pynetdicom's server copies its
        ``contexts`` for each association it accepts, so a running server can be extended.
        The acceptor's list has no 128 limit (that caps what one requestor proposes)."""
        with self._lock:
            known = {str(cx.abstract_syntax) for cx in self._server.contexts}
            fresh = sorted(set(classes) - known)
            for uid in fresh:
                _register_storage_class(uid)
            if fresh:
                self._server.contexts = [*self._server.contexts,
                                         *(build_context(uid, UNCOMPRESSED + COMPRESSED) for uid in fresh)]

    def expect_series(self, series_uid: str, receiver: Receiver) -> None:
        """Route instances of ``series_uid`` to ``receiver`` until :meth:`forget_series`."""
        with self._lock:
            self._routes[series_uid] = receiver

    def forget_series(self, series_uid: str) -> None:
        with self._lock:
            self._routes.pop(series_uid, None)

    def shutdown(self) -> None:
        self._server.shutdown()


_SERVERS: dict[tuple, StorageServer] = {}
_SERVERS_LOCK = threading.Lock()


@contextmanager
def storage_server(settings: DimseSettings) -> Iterator[StorageServer]:
    """The storage SCP C-MOVE sends to, on ``storage_host:storage_port`` with AE title
    ``move_destination or calling_ae_title``, accepting at most ``storage_max_associations``
    associations at once. Raises :class:`PacsError` if the port is taken."""
    aet = settings.move_destination or settings.calling_ae_title
    key = (settings.storage_host, settings.storage_port, aet)
    with _SERVERS_LOCK:
        server = _SERVERS.get(key)
        if server is None:
            try:
                server = StorageServer(settings.storage_host, settings.storage_port, aet, settings.timeout,
                                       settings.storage_max_associations)
            except OSError as exc:
                raise PacsError(
                    f"cannot start our storage SCP {aet} on {settings.storage_host}:{settings.storage_port}: "
                    f"{exc.strerror or exc}. Free that port or change pacs.dimse.storage_port."
                ) from None
            _SERVERS[key] = server
        else:  # shared by several specs: the strictest bound holds
            server.maximum_associations = min(server.maximum_associations, settings.storage_max_associations)
        server._users += 1
    try:
        yield server
    finally:
        with _SERVERS_LOCK:
            server._users -= 1
            if server._users == 0:
                server.shutdown()
                _SERVERS.pop(key, None)
