"""Logs that carry no original identifier: one set-up for the CLI and for the flow (P8).

Libraries pacs2bids uses log what they handle: dicomweb-client writes ``search for series of
study "1.3.12..."`` at INFO, pynetdicom logs whole query identifiers at DEBUG (and, unless told
otherwise, at INFO), requests/urllib3/httpx log URLs that hold study and series UIDs. A run
under the CLI prints the root logger to stderr; a run under a Prefect worker sends the loggers
named in ``PREFECT_LOGGING_EXTRA_LOGGERS`` to the Prefect API as well. So, for the whole process:

- every third-party logger that may print identifiers (:data:`THIRD_PARTY_LOGGERS`, and any
  logger below one of them whose level was set lower, for example by
  ``PREFECT_LOGGING_LOGGERS_<NAME>_LEVEL``) is set to WARNING;
- pynetdicom's identifier logging is turned off;
- every log record, whatever its logger (pacs2bids's own, Prefect's run loggers, a library's
  warning), has its UID-like tokens (digits and dots, five components or more: an original
  UID; the pseudonymised ``2.25.<n>`` UIDs have three) replaced by ``<uid>`` in its message and
  its exception text before any handler sees it.

:func:`quiet_third_party_loggers` is idempotent and cheap: the CLI calls it after setting up
its handlers, the flow at its start (it may run without the CLI).
"""

from __future__ import annotations

import logging
import re

#: Loggers of libraries that may print identifiers (UIDs in URLs and queries, patient data in
#: DIMSE identifiers, file names of the clinical copy).
THIRD_PARTY_LOGGERS = (
    "dicomweb_client",
    "pynetdicom",
    "pydicom",
    "urllib3",
    "requests",
    "httpx",
    "httpcore",
    "heudiconv",
    "nipype",
    "dcmstack",
    "nibabel",
    "PIL",
    "pytesseract",
    # secondary storage: botocore logs each request's headers (the access key id) at DEBUG
    "botocore",
    "aiobotocore",
    "boto3",
    "s3transfer",
    "s3fs",
    "fsspec",
    "paramiko",
)
LEVEL = logging.WARNING

_UID = re.compile(r"(?<![0-9.])[0-9]{1,10}(?:\.[0-9]{1,40}){4,}(?![0-9])")
_MARK = "_pacs2bids_redacting"


def redact(text: str) -> str:
    """``text`` with every UID-like token replaced by ``<uid>``."""
    return _UID.sub("<uid>", text) if text and "." in text else text


def quiet_third_party_loggers(level: int = LEVEL) -> None:
    """Set every third-party logger that may print identifiers to ``level`` (WARNING) or
    above, turn off pynetdicom's identifier logging, and install the record redaction (see
    module docstring). Safe to call many times."""
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < level:
            logger.setLevel(level)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        if any(name.startswith(p + ".") for p in THIRD_PARTY_LOGGERS) and logger.level not in (logging.NOTSET,) and logger.level < level:
            logger.setLevel(level)
    try:
        from pynetdicom import _config

        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
    except ImportError:  # pragma: no cover - a dependency
        pass
    _install_record_redaction()


def _install_record_redaction() -> None:
    factory = logging.getLogRecordFactory()
    if getattr(factory, _MARK, False):
        return

    def make_record(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it to logging's own error report
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if redact(text) != text:
                record.exc_text = redact(text)
                record.exc_info = None  # handlers print exc_text; the traceback objects are not rendered again
        return record

    setattr(make_record, _MARK, True)
    logging.setLogRecordFactory(make_record)
