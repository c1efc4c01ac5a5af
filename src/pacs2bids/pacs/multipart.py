"""A WADO-RS answer (``multipart/related`` of DICOM parts, RFC 2046 5.1, PS3.18 8.7.3.5) split
into its parts as it streams (:class:`Part`): a part up to ``MEMORY_PART`` is handed over in
memory, with no file (its receiver writes it once, where it belongs); a larger one is written
byte for byte to a temporary file as it streams, its size and SHA-256 taken on the way. Parts are
read ahead in a thread of their own (:func:`_read_ahead`). Used by :mod:`pacs2bids.pacs.dicomweb`."""

from __future__ import annotations

import email.message
import hashlib
import os
import queue
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

from ..errors import PacsError

HEAD = 1 << 16  # bytes of each part kept in memory for the sink's check (pacs2bids.sink._HEAD_BYTES)
MEMORY_PART = 1 << 20  # a part up to this size is also handed over whole in memory
AHEAD_BYTES = 4 << 20  # the bytes of parts read ahead and held in memory, per answer (one part more if larger)


@dataclass(frozen=True)
class Part:
    """One instance of a WADO-RS answer and its size: whole in ``data`` (``path`` None: no file
    was made for it; up to ``MEMORY_PART``), or whole in the temporary file ``path`` (a larger
    one). Its SHA-256 (:attr:`sha256`) was taken from the bytes as they were streamed to the
    file, or, for a part held in ``data``, is taken from them by whoever asks, once: the thread
    that files it."""

    path: Path | None
    streamed_sha256: str | None
    size: int
    head: bytes = b""  # its first HEAD bytes, when not held whole in data: the sink checks them in memory
    data: bytes | None = None  # all of it, when at most MEMORY_PART: checked and written by the receiver

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of the part's bytes. For a part held in memory it is computed here, in
        the caller's thread, not by the reader, which is the busier of the two: receiving,
        splitting, creating and writing every file (hashlib releases the interpreter lock, so
        the hash runs beside the reader's next parts)."""
        if self.streamed_sha256 is None:
            object.__setattr__(self, "streamed_sha256", hashlib.sha256(self.data).hexdigest())
        return self.streamed_sha256


_DONE = object()


def _held(item) -> int:
    """The bytes a part read ahead holds in memory: all of it, or its head (the rest is in its file)."""
    return len(item.data if item.data is not None else item.head) if isinstance(item, Part) else 0


def _read_ahead(parts: Iterator[Part], response: requests.Response, depth: int = 64,
                budget: int | None = None) -> Iterator[Part]:
    """``parts``, read in a thread of its own up to ``depth`` parts and ``budget`` bytes held in
    memory ahead (:data:`AHEAD_BYTES`; a part larger than that alone): receiving and splitting
    the answer (and writing the parts too large to hold) overlap with the caller's checking and
    filing of the parts before, and what waits is bounded in bytes whatever the parts' size
    (64 CT slices of 512 kB would be 32 MB per answer). The reader's error is raised here, after
    the parts that came before it. When the caller stops early, the answer is closed and the
    files not handed over are deleted."""
    budget = AHEAD_BYTES if budget is None else budget
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    room = threading.Condition()
    held = 0

    def read() -> None:
        nonlocal held
        try:
            for part in parts:
                n = _held(part)
                with room:
                    room.wait_for(lambda: held == 0 or held + n <= budget or stop.is_set())
                    held += n
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
            with room:
                held -= _held(item)
                room.notify()
            yield item
    finally:
        stop.set()
        with room:
            room.notify()  # a reader waiting for room goes on, and sees the stop
        if reader.is_alive():
            response.close()  # a reader blocked on the socket wakes up with an error
        while reader.is_alive() or not q.empty():
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, Part) and item.path is not None:
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
    """One part as it streams. Its bytes are held in memory while they fit in ``MEMORY_PART``
    (:class:`Part` ``data``; no file: the receiver writes it once, in its series folder, and
    hashes it there: hashlib and ``os.write`` release the interpreter lock). Past that size a
    temporary file ``path`` is created (``os.open``, no Python file object) and the part
    streams into it, hashed and counted as it is written, its first ``HEAD`` bytes kept."""

    def __init__(self, path: str):
        self.path, self.fd = path, -1
        self.hash, self.size, self.held = None, 0, []  # held: the bytes while the part fits in memory
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
            self.held = None  # too large to hold: streamed to its file from now on
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            self.hash = hashlib.sha256()
        if len(self.head) < HEAD:
            self.head += bytes(data[:HEAD - len(self.head)])
        self.hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> Part:
        if self.held is not None:  # held whole: no file; hashed by whoever files it (Part.sha256)
            data = bytes(self.held[0]) if len(self.held) == 1 else b"".join(self.held)
            return Part(None, None, self.size, b"", data)
        os.close(self.fd)
        return Part(Path(self.path), self.hash.hexdigest(), self.size, self.head, None)

    def discard(self) -> None:
        if self.fd >= 0:
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
    """Split a multipart/related body (RFC 2046 5.1) into :class:`Part` s while it streams: the
    bytes of each one that fits in ``MEMORY_PART``, a temporary file in ``incoming`` (with its
    SHA-256, taken as it was written) for each larger one.

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
