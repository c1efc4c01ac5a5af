"""Per-PACS bound on connections, shared beyond this process when a gate is installed (E5).

Every DIMSE association we open to a PACS (C-ECHO, C-FIND, C-GET, C-MOVE) and every DICOMweb
request we have in flight holds one slot of the PACS's *gate* from before the connection is
opened until after it is closed. A gate is a plain callable: ``gate()`` blocks until one more
connection may be opened and returns ``release``, to be called once that connection is
closed. The stage logic knows nothing else: the flow installs a gate backed by a Prefect
global concurrency limit (:mod:`pacs2bids.tasks.pacs_limit`), so the bound holds across every
run and worker sharing that Prefect server. Without a gate (``pacs2bids check``, ``deid
--dry-run``, the library used directly) only the per-process bound of
:class:`pacs2bids.pacs.pool.AssociationPool` applies.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from ..config import DicomwebSettings, DimseSettings, PacsSettings

Release = Callable[[], None]
Gate = Callable[[], Release]

_GATES: dict[str, Gate] = {}
_LOCK = threading.Lock()


def peer_key(settings: DimseSettings | DicomwebSettings) -> str:
    """The address a gate is registered under: ``ae@host:port`` for DIMSE, the URL for DICOMweb."""
    if isinstance(settings, DimseSettings):
        return f"dimse:{settings.ae_title}@{settings.host}:{settings.port}"
    return f"dicomweb:{settings.url}"


def set_gate(pacs: PacsSettings, gate: Gate | None) -> None:
    """Install ``gate`` (or remove it, with ``None``) for every transport of ``pacs``: both
    transports of one PACS share one bound. Install it before the first connection opens."""
    with _LOCK:
        for settings in (pacs.dimse, pacs.dicomweb):
            if settings is None:
                continue
            if gate is None:
                _GATES.pop(peer_key(settings), None)
            else:
                _GATES[peer_key(settings)] = gate


def gate_for(settings: DimseSettings | DicomwebSettings) -> Gate | None:
    with _LOCK:
        return _GATES.get(peer_key(settings))


@contextmanager
def holding(settings: DimseSettings | DicomwebSettings) -> Iterator[None]:
    """Hold one slot of the PACS's gate (if any) for the duration of the block."""
    gate = gate_for(settings)
    release = gate() if gate is not None else None
    try:
        yield
    finally:
        if release is not None:
            release()
