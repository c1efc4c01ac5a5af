"""DICOMweb with a PACS: QIDO-RS through dicomweb-client, WADO-RS streamed to disk.

QIDO-RS (PS3.18 10.6) pages with ``limit``/``offset`` until an empty page, so a server-side
result cap never hides matches. WADO-RS (PS3.18 10.4) asks for
``multipart/related; type="application/dicom"`` and writes each part to a temporary file as
it streams, byte for byte as the server sent it: no instance is held whole in memory; each part's
SHA-256 and size are taken as it is written (:class:`Part`), so nobody reads it again for them.
Credentials come from the environment variables the spec names. When a gate is installed for
the PACS (:mod:`pacs2bids.pacs.gate`), every request holds one of its slots while in flight, and
asks the server to close its connection with it: no idle keep-alive connection outlives its slot.
"""

from __future__ import annotations

import email.message
import hashlib
import logging
import os
import queue
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from ..config import DicomwebSettings
from ..errors import PacsError
from . import gate

log = logging.getLogger(__name__)

PAGE = 500
HEAD = 1 << 16  # bytes of each part kept in memory for the sink's check (pacs2bids.sink._HEAD_BYTES)
MEMORY_PART = 1 << 20  # a part up to this size is also handed over whole in memory (at most 64 read ahead)
_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_ACCEPT_PLAIN = 'multipart/related; type="application/dicom"'


@dataclass(frozen=True)
class Part:
    """One instance of a WADO-RS answer, whole in a temporary file, and its size. Its SHA-256
    (:attr:`sha256`) was taken from the bytes as they were streamed to the file, or, for a part
    held whole in ``data``, is taken from them by whoever asks, once: the thread that files it."""

    path: Path
    streamed_sha256: str | None
    size: int
    head: bytes = b""  # its first HEAD bytes, when not held whole in data: the sink checks them in memory
    data: bytes | None = None  # all of it, when at most MEMORY_PART: the sink checks it without opening the file

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of the part's bytes. For a part held in memory it is computed here, in
        the caller's thread, not by the reader, which is the busier of the two: receiving,
        splitting, creating and writing every file (hashlib releases the interpreter lock, so
        the hash runs beside the reader's next parts)."""
        if self.streamed_sha256 is None:
            object.__setattr__(self, "streamed_sha256", hashlib.sha256(self.data).hexdigest())
        return self.streamed_sha256


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
        self.client = DICOMwebClient(settings.url, session=self.session, timeout=settings.timeout)
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


_DONE = object()


def _read_ahead(parts: Iterator[Part], response: requests.Response, depth: int = 64) -> Iterator[Part]:
    """``parts``, read in a thread of its own up to ``depth`` parts ahead: receiving, splitting,
    creating, writing and hashing each file (calls that mostly release the interpreter lock, and
    wait on the server and the disk) overlap with the caller's filing of the parts before. The
    reader's error is raised here, after the parts that came before it. When the caller stops
    early, the answer is closed and the files not handed over are deleted."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for part in parts:
                q.put(part)
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the caller, in its thread
            q.put(exc)

    reader = threading.Thread(target=read, name="wado-rs-reader", daemon=True)
    reader.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if reader.is_alive():
            response.close()  # a reader blocked on the socket wakes up with an error
        while reader.is_alive() or not q.empty():
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, Part):
                item.path.unlink(missing_ok=True)
        reader.join()


def _boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/related`` answer (RFC 2046 5.1.1, quoted or not; other
    parameters such as ``type`` and ``transfer-syntax`` in any order, PS3.18 8.7.3.5). Raises
    :class:`PacsError` naming what the server sent when it is not a multipart answer of DICOM parts."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    kind = header.get_content_type() if content_type.strip() else "an answer without Content-Type"
    if kind != "multipart/related":
        raise PacsError(
            f"WADO-RS answer is {kind}, not multipart/related: the server does not serve WADO-RS at this URL, or "
            "refused the Accept header; check the DICOMweb URL in the spec (its root, where /studies is)"
        )
    part_type = header.get_param("type")
    if isinstance(part_type, str) and part_type.lower() != "application/dicom":
        raise PacsError(f"WADO-RS answer holds {part_type} parts, not application/dicom; check the server's WADO-RS")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise PacsError("WADO-RS answer is multipart/related without a boundary parameter: it cannot be split "
                        "into instances; the server's answer is malformed")
    return boundary.encode()


class _PartWriter:
    """A part's temporary file, created once (``os.open``, no Python file object), hashed and
    counted as it is written. Its first bytes are held in memory (:class:`Part`), all of them
    while they fit in ``MEMORY_PART``: each part is then written with one ``os.write`` and
    hashed in one call (hashlib releases the interpreter lock on such buffers)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        self.hash, self.size, self.held = None, 0, []  # held: the bytes not written yet; hash: once streamed
        self.head = b""

    def add(self, data: memoryview) -> None:
        """Take the next bytes of the part: a view of the reader's chunk (immutable bytes), copied
        once, when the part is closed (held) or joined (too large to hold), or not at all (streamed)."""
        self.size += len(data)
        if self.held is not None:
            self.held.append(data)
            if self.size <= MEMORY_PART:
                return
            data = self.held[0] if len(self.held) == 1 else b"".join(self.held)
            self.held, self.head = None, b""  # too large to hold: streamed from now on
        if len(self.head) < HEAD:
            self.head += bytes(data[:HEAD - len(self.head)])
        self._write(data)

    def _write(self, data: bytes, hashed: bool = True) -> None:
        if hashed:
            if self.hash is None:
                self.hash = hashlib.sha256()
            self.hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> Part:
        data = None
        if self.held is not None:
            data = bytes(self.held[0]) if len(self.held) == 1 else b"".join(self.held)
            self._write(data, hashed=False)  # its head is in data: not copied; hashed by the filer (Part.sha256)
        os.close(self.fd)
        digest = None if data is not None else (self.hash or hashlib.sha256()).hexdigest()
        return Part(Path(self.path), digest, self.size, self.head, data)

    def discard(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def _declared_length(headers: bytes) -> int:
    """The Content-Length a part's headers declare (Orthanc sends it), or -1. Used only where the
    delimiter is found right after that many bytes, in the bytes at hand; otherwise the body is
    searched for the delimiter (RFC 2046 needs no Content-Length)."""
    k = headers.lower().find(b"content-length:")
    if k < 0:
        return -1
    value = headers[k + 15:].split(b"\r\n", 1)[0].strip()
    return int(value) if value.isdigit() else -1


def _held_back(buf: bytes, at: int, delim: bytes) -> int:
    """Where the bytes at the end of ``buf`` that may begin ``delim`` start (``len(buf)`` when none
    can), given that ``delim`` is not in ``buf[at:]``: only a suffix that is a prefix of ``delim``
    is held back for the next chunk, so that the next chunk is mostly taken as it is, not copied
    after them. ``delim`` is CR LF "--" boundary; a boundary has no CR (RFC 2046 5.1.1), so such a
    suffix starts at the last CR; otherwise (a boundary with a CR) its last len(delim) - 1 bytes."""
    start = max(at, len(buf) - len(delim) + 1)
    if b"\r" in delim[1:]:
        return start
    k = buf.rfind(b"\r", start)
    return k if k >= 0 and delim.startswith(buf[k:]) else len(buf)


def _multipart_parts(response: requests.Response, incoming: Path, chunk: int = 1 << 20) -> Iterator[Part]:
    """Split a multipart/related body (RFC 2046 5.1) into files while it streams; each
    :class:`Part` carries the SHA-256 and size of its file, taken as it was written, and its
    bytes when they fit in ``MEMORY_PART``.

    Raises :class:`PacsError` (transient: a retry may get it whole) when the body ends before
    its close delimiter ``--boundary--``, in an instance or between two: parts already
    yielded are whole, what was cut is not kept."""
    boundary = _boundary(response.headers.get("Content-Type", ""))
    delim = b"\r\n--" + boundary
    prefix = os.path.join(incoming, f"{uuid.uuid4().hex[:12]}-")  # one name per part, no mkstemp per file
    count, length = 0, -1
    buf, at = b"", 0  # unread bytes: buf[at:] (an index, not slices: a chunk holds many small parts)
    state = "preamble"
    out: _PartWriter | None = None
    for data in response.iter_content(chunk):
        buf, at = (buf[at:] + data if at < len(buf) else data), 0  # mostly nothing left over: no copy
        view = memoryview(buf)
        while True:
            if state == "preamble":
                i = buf.find(b"--" + boundary, at)
                if i < 0:
                    at = max(at, len(buf) - len(delim))
                    break
                at = i + len(boundary) + 2
                state = "headers"
            elif state == "headers":
                if len(buf) - at >= 2 and buf[at:at + 2] == b"--":
                    return
                i = buf.find(b"\r\n\r\n", at)
                if i < 0:
                    break
                length, at = _declared_length(buf[at:i]), i + 4
                count += 1
                out = _PartWriter(f"{prefix}{count}.part")
                state = "body"
            else:  # where the part's Content-Length puts its delimiter, when it is there: no scan of its bytes
                i = at + length if length >= 0 and out.size == 0 and buf.startswith(delim, at + length) else -1
                if i < 0:
                    i = buf.find(delim, at)
                if i < 0:
                    end = _held_back(buf, at, delim)  # the delimiter may begin in these last bytes
                    if end > at:
                        out.add(view[at:end])
                        at = end
                    break
                out.add(view[at:i])
                part, out = out.close(), None
                at = i + len(delim)
                state = "headers"
                yield part
    if out is not None:
        out.discard()
        raise PacsError("WADO-RS answer ended in the middle of an instance, before its closing boundary: the "
                        "connection was cut; a retry fetches what is missing", transient=True)
    if state == "preamble":
        raise PacsError("WADO-RS answer ended before its first boundary: no instance in it (the server sent an "
                        "empty or truncated multipart body)", transient=True)
    raise PacsError("WADO-RS answer ended without its closing boundary (--boundary--): the connection was cut "
                    "between two instances; a retry fetches what is missing", transient=True)
