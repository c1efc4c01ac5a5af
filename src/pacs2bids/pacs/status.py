"""DIMSE statuses: the one place they are translated (PS3.4 Annex C.4, PS3.7 Annex C).

Meanings and categories come from pynetdicom's per-service tables (:mod:`pynetdicom.status`);
what is ours is the judgement of what a retry may fix (:attr:`StatusInfo.transient`) and the
messages of :func:`raise_for_status`, which name the peer and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom import status as pstatus

from ..config import DimseSettings
from ..errors import PacsError

# Per-service tables, as pynetdicom keeps them; GENERAL_STATUS holds the PS3.7 C codes.
_TABLES = {
    "echo": pstatus.VERIFICATION_SERVICE_CLASS_STATUS,
    "find": pstatus.QR_FIND_SERVICE_CLASS_STATUS,
    "get": pstatus.QR_GET_SERVICE_CLASS_STATUS,
    "move": pstatus.QR_MOVE_SERVICE_CLASS_STATUS,
}
# Where our words say more than the standard's
_CLEARER = {
    0xFE00: "cancelled (for C-FIND: the PACS stopped returning matches, e.g. at its result limit)",
    0xA801: "refused: move destination unknown",
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


def _meaning(code: int, service: str | None) -> str:
    if code in _CLEARER:
        return _CLEARER[code]
    # the service's own table first; a code it lacks (a PACS answering 0xA700 to a C-MOVE) is
    # read in the other Q/R tables, then the general ones (PS3.7 C)
    tables = sorted(_TABLES, key=lambda name: name != service)
    for table in (*(_TABLES[t] for t in tables), pstatus.GENERAL_STATUS):
        if code in table:
            category, text = table[code]
            return (text or category).lower()
    return f"status 0x{code:04X}"


def classify(code: int | None, service: str | None = None) -> StatusInfo:
    """Translate a DIMSE status code of ``service`` (echo, find, get, move; None: any of them).

    ``None`` means no answer came (timeout or broken association): a transient failure.
    Out of resources (0xA7xx) and the processing-failure range 0xC000-0xCFFF are transient;
    everything else that fails (0xA801 move destination unknown, 0xA900, 0x0122 ...) is not,
    so it fails at once instead of being retried.
    """
    if code is None:
        return StatusInfo(-1, "failure", "no answer (timeout or association lost)", True)
    category = pstatus.code_to_category(code).lower()
    if category == "unknown":
        category = "failure"
    transient = category == "failure" and ((0xA700 <= code <= 0xA7FF) or (0xC000 <= code <= 0xCFFF))
    return StatusInfo(code, category, _meaning(code, service), transient)


def peer(s: DimseSettings) -> str:
    """How messages name the PACS and us."""
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
            f"{operation}: {peer(s)} answered 0xA801 'move destination unknown': it does not know "
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
        f"{operation}: {peer(s)} answered {info.meaning} (0x{info.code & 0xFFFF:04X}); {hint}",
        transient=info.transient,
        status=None if info.code < 0 else info.code,
    )
