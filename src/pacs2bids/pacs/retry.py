"""One retry policy per kind of failure, each at one layer.

==========================================  ==========================  ======================================
failure kind                                the one layer that retries  how
==========================================  ==========================  ======================================
(a) a pooled association found dead before  the pool                    reopened once, on a fresh association
    any answer (the PACS closed an idle       (:mod:`.services`,          (a reconnection, not a retry of the
    one)                                      ``_reopen_if_dead``)        operation); a silent peer (no answer
                                                                          within the timeout) is not reopened
(b) transient PACS failures: busy or out    the stage (query, and the   :func:`with_retries`:
    of resources (0xA7xx, 0xCxxx, HTTP 408,   retrieval's series loop,    ``spec.retries.attempts`` more times,
    429, 5xx), refused or dropped             which resumes from the      back-off ``backoff_seconds`` doubling
    connection, timeout, instances still      ledger)                     at each retry
    missing after a retrieve
(c) anything else: misconfiguration, an     nobody                      raised at once, with the fix
    association rejected for good, 0xA801
    move destination unknown, HTTP 401/403
==========================================  ==========================  ======================================

Nothing below retries on its own: requests' adapters are mounted with ``max_retries`` 0 (its
default, ``Retry(0, read=False)``), and dicomweb-client's own HTTP retries (by default 5
attempts on 408, 429, 503, 504) are switched off in :class:`~.dicomweb.WebPacs`. Nothing above
either: the Prefect tasks over query and retrieval take no task retries (they would multiply
these). A :class:`~pacs2bids.errors.PacsError` says which kind it is by ``transient``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from ..config import RetrySettings
from ..errors import PacsError

T = TypeVar("T")


def with_retries(settings: RetrySettings, fn: Callable[[], T], what: str, log: logging.Logger,
                 *, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, run again after a transient :class:`PacsError` (kind b), at most
    ``settings.attempts`` more times, waiting ``backoff_seconds * 2**k`` before retry ``k + 1``.
    Any other error, and the last transient one, are raised. ``what`` names the operation in
    the log (never an identifier: "C-FIND for inclusion row 3", "series #5")."""
    for attempt in range(settings.attempts + 1):
        try:
            return fn()
        except PacsError as exc:
            if not exc.transient or attempt == settings.attempts:
                raise
            delay = settings.backoff_seconds * 2 ** attempt
            log.warning("%s: transient PACS failure (attempt %d of %d); retry in %.1f s",
                        what, attempt + 1, settings.attempts + 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises
