"""Our storage SCP, the C-MOVE destination, and the C-STORE handler shared with C-GET.

Received instances are never decoded in memory: pynetdicom writes each to a temporary file
as it arrives (``STORE_RECV_CHUNKED_DATASET``, set in :mod:`pacs2bids.pacs`) and the handler
hands that file to a :class:`Receiver` (see :class:`pacs2bids.sink.SeriesSink`).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

from pydicom import dcmread
from pynetdicom import AE, build_context, evt

from ..config import DimseSettings
from ..errors import PacsError
from .tls import server_context
from ..sopclasses import DEFAULT_STORAGE_CLASSES
from .contexts import COMPRESSED, ECHO, UNCOMPRESSED

log = logging.getLogger(__name__)


class Receiver(Protocol):
    """Takes one received instance: ``path`` is a temporary Part 10 file the receiver must move
    away (or leave, to have it deleted); ``sha256`` and ``size``, when given, are the file's, taken
    by its writer; returns the DIMSE status to answer (0x0000 stored)."""

    def __call__(self, path: Path, sop_class_uid: str | None = None, sop_instance_uid: str | None = None, *,
                 sha256: str | None = None, size: int | None = None, head: bytes | None = None) -> int: ...


def store_handler(get_receiver: Callable[[object], Receiver | None]):
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


_REGISTER_LOCK = threading.Lock()


def register_storage_class(uid: str) -> None:
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

    def __init__(self, host: str, port: int, ae_title: str, timeout: float, max_associations: int = 4,
                 ssl_context=None):
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
            (host, port), block=False, ssl_context=ssl_context,  # DICOM TLS (pacs.tls): the PACS must present its certificate
            evt_handlers=[(evt.EVT_C_STORE, store_handler(self._route)), (evt.EVT_ESTABLISHED, self._connected)],
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
                register_storage_class(uid)
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
    key = (settings.storage_host, settings.storage_port, aet, settings.tls)
    with _SERVERS_LOCK:
        server = _SERVERS.get(key)
        if server is None:
            context = server_context(settings.tls) if settings.tls is not None else None
            try:
                server = StorageServer(settings.storage_host, settings.storage_port, aet, settings.timeout,
                                       settings.storage_max_associations, context)
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
