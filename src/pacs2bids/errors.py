"""Exceptions raised by pacs2bids.

Each exception's docstring says what to do about it. The data path raises; only side
outputs (reports, metrics) may log and continue. DIMSE outcomes are data, translated in
:mod:`pacs2bids.pacs.status`; an exception is raised only when a stage cannot go on.
"""

from __future__ import annotations


class Pacs2BidsError(Exception):
    """Base class of every error pacs2bids raises on purpose."""


class SpecError(Pacs2BidsError):
    """The project spec is invalid. Fix the key named in the message and run again;
    nothing has been queried, retrieved or written."""


class PacsError(Pacs2BidsError):
    """The PACS could not be reached or refused a request.

    Check the host, port and AE titles named in the message, that the PACS knows our
    calling AE title (and, for C-MOVE, our storage AE title, host and port), and any
    firewall between the two. ``transient`` says whether a retry may succeed.
    """

    def __init__(self, message: str, *, transient: bool = False, status: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.status = status


class PseudonymisationError(Pacs2BidsError):
    """A file could not be pseudonymised safely. It is quarantined and never published;
    review it, then release or drop it."""


class LeakDetected(Pacs2BidsError):
    """An identifying value was found in an output. The run fails closed and nothing is
    published; the message names the file and field. Fix the profile (or report a bug)."""


class ConversionError(Pacs2BidsError):
    """heudiconv or dcm2niix failed. The message ends with the tool's stderr tail."""


class ValidationFailed(Pacs2BidsError):
    """bids-validator reported errors. Nothing is published; the message lists them."""


class PublishError(Pacs2BidsError):
    """The dataset could not be moved into ``output``. The previous dataset, if any, is
    left as it was; check permissions and free space at the destination."""


class RunFailed(Pacs2BidsError):
    """The run stopped before publishing; ``summary`` says why. ``output`` is unchanged."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class NothingToPublish(Pacs2BidsError):
    """No image was converted. Check the inclusion list and filters, and the reasons the summary
    gives for each series left out."""
