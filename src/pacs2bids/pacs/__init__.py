"""Talking to a PACS, in pynetdicom's layers, one module per job.

- :mod:`.status`: DIMSE statuses translated (on :mod:`pynetdicom.status`), errors that name the fix;
- :mod:`.contexts`: transfer syntaxes and presentation contexts;
- :mod:`.pool`: the bounded association pool and its reaper;
- :mod:`.services`: C-ECHO, C-FIND, C-GET, C-MOVE;
- :mod:`.scp`: our storage SCP (the C-MOVE destination);
- :mod:`.dicomweb`: QIDO-RS and WADO-RS, with the multipart reader;
- :mod:`.gate`: the per-PACS bound on connections, shared beyond this process;
- :mod:`.transport`: the one :class:`~.transport.Transport` query and retrieval use;
- :mod:`.retry`: which layer retries which failure.
"""

from pynetdicom import _config

# Patient identifiers must never reach the logs (STYLE.md): pynetdicom logs query and
# response identifiers by default.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# Received C-STORE data sets are written to a temporary file as they arrive, never held
# whole in memory; the handler then moves that file into place.
_config.STORE_RECV_CHUNKED_DATASET = True

from .pool import close_pools  # noqa: E402  (after the settings above)

__all__ = ["close_pools"]
