"""DIMSE services on pooled associations: C-ECHO, C-FIND, C-GET, C-MOVE (PS3.4 C.4, PS3.7 9.1).

Each service borrows an association from the PACS's pool (:func:`pacs2bids.pacs.pool.pool_for`);
a pooled association found dead before any answer is reopened once (:mod:`pacs2bids.pacs.retry`
says why that is the only retry at this layer). Statuses are translated by
:mod:`pacs2bids.pacs.status`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from pydicom.dataset import Dataset

from ..config import DimseSettings
from ..errors import PacsError
from .contexts import FIND, GET, MOVE
from .pool import AssociationPool, pool_for
from .scp import Receiver, StorageServer
from .status import MoveDestinationUnknown, StatusInfo, classify, peer, raise_for_status


@dataclass
class FindResult:
    matches: list[Dataset] = field(default_factory=list)
    truncated: bool = False  # the PACS stopped early (result limit): split the query
    warning: bool = False  # the PACS ended with a Warning status (its answer may be incomplete)


@dataclass
class RetrieveResult:
    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: StatusInfo | None = None


def _reopen_if_dead(pool: AssociationPool, op: Callable, **kw):
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
                        f"{peer(pool.settings)} did not answer within {pool.settings.timeout:.0f} s (timeout). "
                        "A study on near-line storage (tape, cold archive) can take longer: raise "
                        "pacs.dimse.timeout, or let the retries and the dead-letter list take it",
                        transient=True,
                    ) from None
                if attempt == 2:
                    raise PacsError(
                        f"{peer(pool.settings)} closed the association or did not answer within "
                        f"{pool.settings.timeout:.0f} s; check that it is running and not overloaded",
                        transient=True,
                    ) from None


class _LostAssociation(Exception):
    pass


def echo(settings: DimseSettings) -> StatusInfo:
    """C-ECHO (PS3.7 9.1.5). Raises :class:`PacsError` if the PACS cannot be reached."""
    pool = pool_for(settings)

    def op(assoc):
        status = assoc.send_c_echo()
        if not status:
            raise _LostAssociation()
        return classify(status.Status, "echo")

    info = _reopen_if_dead(pool, op)
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
            info = classify(status.Status, "find")
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
            result.warning = final.category == "warning"
            raise_for_status(final, settings, f"C-FIND at {identifier.QueryRetrieveLevel} level")
        return result

    return _reopen_if_dead(pool, op)


def _retrieve(assoc, gen, settings: DimseSettings, operation: str, peer_reached_us: bool = False) -> RetrieveResult:
    result = RetrieveResult()
    last = None
    for status, _ident in gen:
        if not status:
            raise _LostAssociation()
        last = status
    if last is None:
        raise _LostAssociation()
    info = classify(last.Status, operation[2:].lower())
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
                f"C-MOVE: {peer(settings)} answered {info.meaning} (0x{info.code:04X}) before sending anything, "
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
    return _reopen_if_dead(
        pool,
        lambda assoc: _retrieve(assoc, assoc.send_c_get(identifier, GET), settings, "C-GET"),
        classes=classes,
        receiver=receiver,
    )


def move(settings: DimseSettings, identifier: Dataset, destination: str,
         server: StorageServer | None = None) -> RetrieveResult:
    """C-MOVE, Study Root (PS3.4 C.4.2) to ``destination`` (our storage SCP's AE title).
    0xA801 (destination unknown), or a processing failure before any sub-operation while
    the PACS has never connected to ``server``, raises at once with the fix, never retried."""
    pool = pool_for(settings)
    return _reopen_if_dead(
        pool,
        lambda assoc: _retrieve(
            assoc, assoc.send_c_move(identifier, destination, MOVE), settings, "C-MOVE",
            peer_reached_us=bool(server and server.connections),
        ),
    )
