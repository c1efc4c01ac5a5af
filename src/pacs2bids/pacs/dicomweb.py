"""DICOMweb with a PACS: QIDO-RS through dicomweb-client, WADO-RS streamed to disk.

QIDO-RS (PS3.18 10.6) pages with ``limit``/``offset`` until an empty page, so a server-side
result cap never hides matches. WADO-RS (PS3.18 10.4) asks for
``multipart/related; type="application/dicom"`` and writes each part to a temporary file as
it streams, byte for byte as the server sent it: no instance is held whole in memory; each part's
SHA-256 and size are taken as it is written (:class:`Part`, :mod:`pacs2bids.pacs.multipart`), so nobody reads
it again for them.
Credentials come from the environment variables the spec names. When a gate is installed for
the PACS (:mod:`pacs2bids.pacs.gate`), every request holds one of its slots while in flight, and
asks the server to close its connection with it: no idle keep-alive connection outlives its slot.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from ..config import DicomwebSettings
from ..errors import PacsError
from . import gate
from .multipart import Part, _multipart_parts, _read_ahead

log = logging.getLogger(__name__)

PAGE = 500
_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_ACCEPT_PLAIN = 'multipart/related; type="application/dicom"'
# What a QIDO-RS query value keeps as it is: RFC 3986's query characters, less those that would
# split or change the query (& = + # ; %) and the space. '*' and '?' are DICOM's wildcards and ','
# separates a UID list (PS3.18 8.3.4): encoded, some servers take them literally.
QUERY_SAFE = "*?,-._~:/@!$'()"


def query_string(params: dict[str, Any] | None) -> str:
    """``?key=value&...`` for a QIDO-RS request, a list value as repeated keys (``includefield``);
    each value percent-encoded only where it must be (:data:`QUERY_SAFE`)."""
    if not params:
        return ""
    pairs = [(k, v) for k, vs in params.items() for v in (vs if isinstance(vs, (list, tuple, set)) else [vs])]
    return "?" + "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe=QUERY_SAFE)}" for k, v in pairs)


def wildcard_form(value: str) -> str | None:
    """``value`` with each run of characters a query must percent-encode replaced by ``*``, for a
    server that does not decode them (Orthanc's DICOMweb plugin 1.7 compares ``IRC%20A`` to the
    stored ``IRC A``); None when nothing in it is encoded, or it keeps fewer than 3 characters to
    match on (the search would be nearly universal). Its answer is a superset: match it exactly."""
    encoded = quote(value, safe=QUERY_SAFE)
    if encoded == value:
        return None
    pattern = re.sub(r"\*+", "*", "".join(c if quote(c, safe=QUERY_SAFE) == c else "*" for c in value))
    return pattern if len(pattern.replace("*", "").replace("?", "")) >= 3 else None


class _Client(DICOMwebClient):
    """dicomweb-client's QIDO-RS, with the query string from :func:`query_string`: it would encode
    every value with ``quote_plus``, so that ``*``, ``?`` and ``,`` reach the server as ``%2A``,
    ``%3F``, ``%2C``, which a server that does not decode its query (Orthanc's DICOMweb plugin
    1.7) takes literally: a wildcard search then matches nothing."""

    def _http_get(self, url: str, params: dict | None = None, headers: dict | None = None, stream: bool = False):
        return super()._http_get(url + query_string(params), None, headers, stream)


def make_session(settings: DicomwebSettings, environ: dict | None = None) -> requests.Session:
    """A requests session with basic auth from ``username_env``/``password_env`` if set.
    Raises :class:`PacsError` if a named variable is missing."""
    environ = os.environ if environ is None else environ
    session = requests.Session()
    if settings.username_env or settings.password_env:
        missing = [v for v in (settings.username_env, settings.password_env) if v and v not in environ]
        if missing:
            raise PacsError(f"DICOMweb {settings.url}: environment variable(s) {', '.join(missing)} not set; export them")
        session.auth = (environ.get(settings.username_env or "", ""), environ.get(settings.password_env or "", ""))
    if settings.ca_bundle is not None:
        if not settings.ca_bundle.is_file():
            raise PacsError(f"DICOMweb {settings.url}: ca_bundle {settings.ca_bundle} is not a file; give the PEM "
                            "file of the CA that signed the PACS's certificate")
        session.mount("https://", _CABundle(str(settings.ca_bundle)))
    return session


class _CABundle(requests.adapters.HTTPAdapter):
    """Checks every https answer against one CA bundle. ``session.verify`` alone is not enough:
    requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment override it."""

    def __init__(self, ca_bundle: str):
        self.ca_bundle = ca_bundle
        super().__init__()

    def send(self, request, **kwargs):
        kwargs["verify"] = self.ca_bundle
        return super().send(request, **kwargs)


class WebPacs:
    """One DICOMweb peer: QIDO-RS searches and WADO-RS retrievals, with the spec's timeout."""

    def __init__(self, settings: DicomwebSettings, session: requests.Session | None = None):
        self.settings = settings
        self.session = session or make_session(settings)
        self.client = _Client(settings.url, session=self.session, timeout=settings.timeout)
        # the stage retries transient failures (pacs2bids.pacs.retry); dicomweb-client would
        # otherwise retry 408/429/503/504 itself, up to 5 times, inside each of ours
        self.client.set_http_retry_params(retry=False)
        # Learnt result cap: a short page followed by a non-empty one means the server cuts
        # every answer at this size, and offsets are not to be trusted (Orthanc with
        # LimitFindResults). The caller then splits its question.
        self.cap: int | None = None
        self._one_slot_thread: int | None = None  # the thread inside :meth:`one_slot`

    # -- errors -----------------------------------------------------------------------
    def _error(self, what: str, exc: Exception) -> PacsError:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return PacsError(
                f"DICOMweb {self.settings.url}: {what} refused (HTTP {status}); check the user name and password "
                f"in {self.settings.username_env} / {self.settings.password_env} and the account's rights",
                status=status,
            )
        transient = status is None or status in (408, 429) or status >= 500
        detail = f"HTTP {status}" if status else type(exc).__name__
        return PacsError(
            f"DICOMweb {self.settings.url}: {what} failed ({detail}); check that the server is running and the "
            f"URL is its DICOMweb root (QIDO-RS at <url>/studies)",
            transient=transient,
            status=status,
        )

    # -- QIDO-RS ----------------------------------------------------------------------
    def search(self, level: str, filters: dict, fields: list[str], study_uid: str | None = None,
               series_uid: str | None = None) -> list[Dataset]:
        """Every match of a QIDO-RS search at ``level`` (studies, series, instances), paged."""
        out: list[Dataset] = []
        offset = 0
        short = None
        while True:
            try:
                with self._slot():
                    page = self._page(level, filters, fields, study_uid, series_uid, offset)
            except (requests.RequestException, OSError) as exc:
                raise self._error(f"QIDO-RS search of {level}", exc) from None
            if not page:
                return out
            if short is not None:
                self.cap = min(self.cap or short, short)
            if len(page) < PAGE:
                short = len(page)
            out.extend(Dataset.from_json(item) for item in page)
            offset += len(page)

    def _page(self, level, filters, fields, study_uid, series_uid, offset) -> list[dict]:
        if level == "studies":
            return self.client.search_for_studies(search_filters=filters, fields=fields, limit=PAGE, offset=offset)
        if level == "series":
            return self.client.search_for_series(
                study_instance_uid=study_uid, search_filters=filters, fields=fields, limit=PAGE, offset=offset
            )
        return self.client.search_for_instances(
            study_instance_uid=study_uid, series_instance_uid=series_uid, search_filters=filters,
            fields=fields, limit=PAGE, offset=offset,
        )

    @contextmanager
    def _slot(self) -> Iterator[None]:
        """Hold a slot of the PACS's gate, if any, for one request; its connection closes with it.
        Inside :meth:`one_slot` on the same thread, the slot held there serves."""
        if gate.gate_for(self.settings) is None or self._one_slot_thread == threading.get_ident():
            yield
            return
        self.session.headers["Connection"] = "close"
        with gate.holding(self.settings):
            try:
                yield
            finally:
                for adapter in self.session.adapters.values():
                    adapter.close()  # whatever the server did with the header

    @contextmanager
    def one_slot(self) -> Iterator[None]:
        """Hold one slot of the PACS's gate (if any) for a sequence of requests made one after
        the other by this thread (the query's searches), on one kept-alive connection, closed
        on leaving. Taking a slot costs a round trip to Prefect's API, more than a search."""
        if gate.gate_for(self.settings) is None or self._one_slot_thread is not None:
            yield
            return
        with gate.holding(self.settings):
            self._one_slot_thread = threading.get_ident()
            try:
                yield
            finally:
                self._one_slot_thread = None
                for adapter in self.session.adapters.values():
                    adapter.close()

    # -- WADO-RS ----------------------------------------------------------------------
    def retrieve(self, study_uid: str, series_uid: str | None, sop_uid: str | None, incoming: Path,
                 on_part: Callable[[Part], None]) -> int:
        """Stream a series (or one instance; ``series_uid`` None: the whole study) into temporary
        files in ``incoming``, calling ``on_part(part)`` for each as soon as it is complete.
        Returns the number of parts."""
        url = f"{self.settings.url}/studies/{study_uid}"
        if series_uid:
            url += f"/series/{series_uid}"
        if sop_uid:
            url += f"/instances/{sop_uid}"
        try:
            with self._slot():
                return self._retrieve(url, incoming, on_part)
        except (requests.RequestException, OSError) as exc:
            raise self._error("WADO-RS retrieval", exc) from None

    def _retrieve(self, url: str, incoming: Path, on_part: Callable[[Part], None]) -> int:
        r = self.session.get(url, headers={"Accept": _ACCEPT}, stream=True, timeout=self.settings.timeout)
        if r.status_code in (400, 406):  # server does not take transfer-syntax=*
            r.close()
            r = self.session.get(url, headers={"Accept": _ACCEPT_PLAIN}, stream=True, timeout=self.settings.timeout)
        r.raise_for_status()
        with r:
            n = 0
            for part in _read_ahead(_multipart_parts(r, incoming), r):
                n += 1
                on_part(part)
            return n
