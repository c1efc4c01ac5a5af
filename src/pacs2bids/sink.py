"""The receiving end of a retrieval: one :class:`SeriesSink` per series folder, and its ledger.

Every file is written under a temporary name and renamed into place, so what is on disk is
always whole; its name is a keyed hash of its SOPInstanceUID (:func:`keyed_name`), never the
UID. Each series folder keeps ``.ledger.json`` (file name -> sha256, size, transport): the
checksum of each file as received, before anything reads it, so the lineage can record (keyed)
which received file each published instance came from (:func:`read_ledger`). Payloads that are
not readable DICOM, or carry UIDs of another instance or series, go to the quarantine folder
with a ``.reason.txt``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import itertools
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.uid import UID

from .checksum import sha256_file
from .rawhead import HEAD_TAGS as _HEAD_TAGS
from .rawhead import walk_head as _walk_head

log = logging.getLogger(__name__)

LEDGER = ".ledger.json"

_HEAD_BYTES = 1 << 16
_PIXEL_DATA = struct.pack("<HH", 0x7FE0, 0x0010)
_SEQUENCE_END = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")


def _read_head(path: Path | None, data: bytes | None = None) -> tuple[Dataset, int, int]:
    """The head of a Part 10 file (its meta, then the data set up to SeriesInstanceUID, only the
    tags of ``_HEAD_TAGS``), where the head ends, and the file's size. Parsed from the first
    ``_HEAD_BYTES`` in memory (pydicom reads a buffer several times faster than a file); from
    the file when the head is longer. ``data``: the file's bytes, when it has no file yet."""
    stopped: list[bool] = []

    def past_head(tag, vr, length) -> bool:  # called for top-level elements only
        if int(tag) > 0x0020000E:
            stopped.append(True)
        return bool(stopped)

    with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
        size = os.fstat(f.fileno()).st_size if data is None else len(data)
        src: BinaryIO = io.BytesIO(f.read(_HEAD_BYTES))
        try:
            head = read_partial(src, stop_when=past_head, defer_size=1024, specific_tags=_HEAD_TAGS)
        except Exception:  # cut by the buffer's end, or not DICOM: the file decides
            if size <= _HEAD_BYTES:
                raise
        if not stopped and size > _HEAD_BYTES:
            f.seek(0)
            src = f
            head = read_partial(f, stop_when=past_head, defer_size=1024, specific_tags=_HEAD_TAGS)
        return head, src.tell() if stopped else size, size


def _pixels_close(syntax: UID | None, path: Path, stopped_at: int, size: int, data: bytes | None = None) -> bool:
    """True when the file ends with its Pixel Data, whole: the element's header, searched for
    backwards from the end (in memory, C speed, nothing parsed), says a length that ends exactly
    at the end of the file (native), or says undefined length and the file ends with a Sequence
    Delimitation Item (encapsulated, PS3.5 A.4). False when it cannot tell (no pixels, little
    endian not used, something after them, the pattern met inside the pixels): the whole check
    decides then. ``data``: the file's bytes, when its writer held them (the file is not opened)."""
    if syntax is None or not _plain_le(syntax) or size - stopped_at < 16:
        return False
    if data is not None:
        return _tail_closes(syntax, data, stopped_at, size)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return _tail_closes(syntax, mapped, stopped_at, size)


@functools.lru_cache(maxsize=64)
def _plain_le(syntax: UID) -> bool:
    return syntax.is_little_endian and not syntax.is_deflated


@functools.lru_cache(maxsize=64)
def _patterns(syntax: UID) -> tuple[bytes, ...]:
    """The Pixel Data element's header up to its length: explicit VR: OW or OB, two reserved
    bytes (then a 4-byte length); implicit VR: the length at once."""
    return (_PIXEL_DATA,) if syntax.is_implicit_VR else (_PIXEL_DATA + b"OW\0\0", _PIXEL_DATA + b"OB\0\0")


def _tail_closes(syntax: UID, data, stopped_at: int, size: int) -> bool:
    """:func:`_pixels_close` on the file's bytes (``bytes`` or ``mmap``)."""
    for pattern in _patterns(syntax):
        at = data.rfind(pattern, stopped_at)
        if at < 0 or at + len(pattern) + 4 > size:
            continue
        (length,) = struct.unpack_from("<I", data, at + len(pattern))
        if length == 0xFFFFFFFF:
            return syntax.is_encapsulated and data[size - 8:] in _SEQUENCE_END
        if at + len(pattern) + 4 + length == size:
            return True
    return False


def _check_payload(path: Path, head: bytes | None = None, data: bytes | None = None) -> tuple[str, str, str]:
    """(SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID) of a received file, once it is
    known whole; raises (ValueError, pydicom's errors) when it is not readable or cut short.
    ``head``: the file's first bytes, when its writer kept them (else they are read); ``data``:
    all its bytes, when its writer held them (``path`` may then be None: no file yet; with a
    file, it is opened only if pydicom must decide).

    Cheap for the common case, an image whose Pixel Data ends the file: its head, walked from
    the element headers (pydicom parses it when the walk cannot decide), and the header of its
    Pixel Data found from the end. Anything else is read whole (values over 1 KiB skipped)."""
    if data is not None:
        head, size = data, len(data)
    else:
        size = os.stat(path).st_size
    try:
        if head is None or (len(head) < _HEAD_BYTES and len(head) < size):
            with open(path, "rb") as f:
                head = f.read(_HEAD_BYTES)
        syntax, found, stopped_at = _walk_head(head)
        uids = (found[0x00080018], found[0x0020000D], found[0x0020000E])
    except Exception:  # an unusual encoding, or not DICOM: pydicom decides, as it always did
        ds, stopped_at, size = _read_head(path, data)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        uids = (str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    if not _pixels_close(syntax, path, stopped_at, size, data):
        if data is not None:
            _check_whole(pydicom.dcmread(io.BytesIO(data), defer_size=1024), size, lambda: data[-8:])
        else:
            _check_whole(pydicom.dcmread(path, defer_size=1024), size, functools.partial(_last_bytes, path, size))
    return uids


def _last_bytes(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, size - 8))
        return f.read(8)


check_payload = _check_payload  # for a router (pacs2bids.retrieve.StudySink): it checks, the series sink files


class RateLimiter:
    """At most ``per_minute`` instances accepted per minute, shared by whoever holds it.
    Delaying our C-STORE answers slows the PACS's sending: back-pressure, not polling (E5)."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self.interval
        if delay > 0:
            time.sleep(delay)


def keyed_name(key: bytes, uid: str, length: int = 32) -> str:
    """HMAC-SHA256 of ``uid`` under ``key`` (the raw-name key, :func:`pacs2bids.deid.keyed.raw_name_key`),
    hex, first ``length`` characters."""
    return hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()[:length]


def _move_into_place(src: Path | str, dest: Path | str) -> None:
    """Rename ``src`` to ``dest`` atomically (copying first to a temporary name beside ``dest``
    when they are on different file systems)."""
    try:
        os.replace(src, dest)
    except OSError:
        src, dest = Path(src), Path(dest)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        src.unlink(missing_ok=True)


_TEMP_NAMES = itertools.count()  # next() is atomic under the interpreter lock: one name per write


def _write_into_place(data: bytes, dest: str) -> None:
    """Write ``data`` to ``dest`` whole or not at all: under a temporary name beside it (a
    ``.part`` that :meth:`SeriesSink.load` deletes if a killed run left it), renamed in the same
    folder (one directory locked, not two)."""
    folder, name = os.path.split(dest)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{next(_TEMP_NAMES)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, dest)


def _check_whole(ds: Dataset, size: int, last8: Callable[[], bytes]) -> None:
    """Raise ValueError if the file (``size`` bytes; ``last8()``: its last 8) ends before its last
    element does (a cut transfer): values larger than the defer size were not read, only their
    offsets and lengths."""
    tag = ds.keys().__reversed__().__next__() if len(ds) else None
    if tag is None:
        raise ValueError("empty data set")
    raw = ds.get_item(tag)
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if tell is None or length is None:  # read whole: check native pixel data against its size
        if tag == 0x7FE00010 and not ds.file_meta.TransferSyntaxUID.is_compressed:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            bits = int(ds.get("BitsAllocated", 8) or 8)
            want = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames * bits // 8
            if len(ds.PixelData) < want:
                raise ValueError("pixel data is shorter than its rows and columns say (truncated)")
        return
    if length == 0xFFFFFFFF:  # encapsulated pixel data ends with a Sequence Delimitation Item
        if last8() not in _SEQUENCE_END:
            raise ValueError("encapsulated pixel data is not closed (truncated)")
    elif tell + length > size:
        raise ValueError("the last element extends past the end of the file (truncated)")


class SeriesSink:
    """Receives the instances of one series: checks each, writes it in place, records it.

    Called from pynetdicom's threads (C-GET, C-MOVE) or the WADO-RS reader. Thread-safe.
    """

    def __init__(self, key: bytes, study_uid: str, series_uid: str, folder: Path, quarantine: Path,
                 limiter: RateLimiter | None = None, on_stored: Callable[[], None] | None = None,
                 transport: str | None = None):
        self.key, self.study_uid, self.series_uid = key, study_uid, series_uid
        self.transport = transport  # c-get, c-move or wado-rs: recorded per file in the ledger
        self.folder, self.quarantine_dir = folder, quarantine
        self.limiter, self.on_stored = limiter, on_stored
        self.lock = threading.Lock()
        self.ledger: dict[str, dict] = {}
        self._changes, self._saved = 1, 0  # the ledger is written again only when it changed
        self.quarantined: list[tuple[str, str]] = []
        self.stored = 0  # files written in this run
        self.duplicates = 0  # arrived again although already on disk: not rewritten
        # name -> size of the files this sink wrote, or found matching its ledger, since its first
        # load(): a later load() trusts them without a stat (a series is looked at 3 times after
        # its retrieval); None until that first load, which reads the ledger and stats every file
        self._seen: dict[str, int] | None = None

    # -- ledger -----------------------------------------------------------------------
    def load(self, announced_names: set[str] | None) -> set[str]:
        """Reconcile the folder with its ledger; returns the names of the good files on disk.
        The first call reads the ledger and checks each file's size against it; later calls
        (the ledger in memory is then the folder's) check only the files this sink has not
        written or checked yet, and still see what was removed or added since."""
        if self._seen is None:
            self.ledger, self._seen = read_ledger(self.folder), {}
        seen = self._seen
        present: set[str] = set()
        with os.scandir(self.folder) as entries:  # DirEntry: no pathlib object per file
            files = [(e.name, e.path) for e in entries]
        for fname, p in files:
            if fname.endswith(".part"):
                Path(p).unlink(missing_ok=True)  # left by a killed run
                continue
            if not fname.endswith(".dcm") or fname == ".dcm":
                continue
            name = fname[:-4]
            entry = self.ledger.get(name)
            if entry is not None and seen.get(name) == entry["size"]:
                present.add(name)
                continue
            size = os.stat(p).st_size
            if entry is None:  # renamed into place, then the run died before the ledger was saved
                entry = self.ledger[name] = {"sha256": sha256_file(p), "size": size, "transport": None}
                self._changes += 1
            if entry["size"] != size:
                log.warning("a raw file differs from its ledger entry; fetching it again")
                os.unlink(p)
                self.ledger.pop(name, None)
                self._changes += 1
                continue
            seen[name] = size
            present.add(name)
        for name in list(self.ledger):
            if name not in present:
                self.ledger.pop(name)
                seen.pop(name, None)
                self._changes += 1
        return present

    def save(self) -> None:
        with self.lock:
            if self._saved == self._changes and (self.folder / LEDGER).exists():
                return
            self._saved = self._changes
            # no indent: json's C encoder (indented, the pure Python one took ~0.1 ms per entry)
            data = json.dumps({"version": 1, "instances": self.ledger}, sort_keys=True)
        tmp = self.folder / f"{LEDGER}.{uuid.uuid4().hex[:8]}.part"
        tmp.write_text(data)
        os.replace(tmp, self.folder / LEDGER)

    # -- receiving --------------------------------------------------------------------
    def _quarantine(self, path: Path | None, name: str, reason: str, data: bytes | None = None) -> None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        if name == "unnamed":
            name = f"unnamed-{uuid.uuid4().hex[:12]}"
        qname = f"{name}-{uuid.uuid4().hex[:8]}.dcm"
        if path is None:
            _write_into_place(data, os.path.join(self.quarantine_dir, qname))
        else:
            _move_into_place(path, self.quarantine_dir / qname)
        (self.quarantine_dir / f"{qname}.reason.txt").write_text(reason + "\n")
        with self.lock:
            self.quarantined.append((qname, reason))
        log.warning("a received payload was quarantined: %s", reason)

    def __call__(self, path: Path | None, sop_class_uid: str | None = None, sop_instance_uid: str | None = None, *,
                 sha256: str | None = None, size: int | None = None, head: bytes | None = None,
                 uids: tuple[str, str, str] | None = None, data: bytes | None = None) -> int:
        """Take a received instance: the temporary file ``path`` (moved away; deleted otherwise by
        its creator), or, when ``path`` is None, its bytes ``data`` (the file is then written
        here, once, in the series folder). ``sha256`` and ``size``: the file's, when its writer
        took them as it wrote it (else they are taken here); ``head``: its first bytes, kept by
        its writer; ``data``: all its bytes, when its writer held them (checked in memory);
        ``uids``: what :func:`check_payload` said of it, when a router checked it already.
        Returns the C-STORE status to answer: 0x0000 stored, 0xC000 refused (PS3.4 B.2.3)."""
        if self.limiter is not None:
            self.limiter.wait()
        name = keyed_name(self.key, sop_instance_uid) if sop_instance_uid else "unnamed"  # made unique if quarantined
        try:
            payload_sop, study, series = uids or _check_payload(path, head, data)
        except Exception as exc:  # anything pydicom cannot read is quarantined, never stored
            self._quarantine(path, name, f"not readable DICOM ({type(exc).__name__}: {str(exc)[:120]})", data)
            return 0xC000
        if sop_instance_uid and payload_sop != sop_instance_uid:
            self._quarantine(path, name, "payload SOPInstanceUID differs from the one announced for it", data)
            return 0xC000
        if study != self.study_uid or series != self.series_uid:
            self._quarantine(path, name, "payload belongs to another study or series than the one requested", data)
            return 0xC000
        name = keyed_name(self.key, payload_sop)
        dest = os.path.join(self.folder, f"{name}.dcm")
        with self.lock:
            if os.path.exists(dest):
                self.duplicates += 1
                return 0x0000
        if path is None:
            # hashlib and os.write release the interpreter lock: the reader goes on beside them
            sha256, size = hashlib.sha256(data).hexdigest(), len(data)
            _write_into_place(data, dest)
        else:
            if sha256 is None or size is None:
                sha256, size = sha256_file(path), os.stat(path).st_size
            _move_into_place(path, dest)
        with self.lock:
            self.ledger[name] = {"sha256": sha256, "size": size, "transport": self.transport}
            if self._seen is not None:
                self._seen[name] = size
            self._changes += 1
            self.stored += 1
        if self.on_stored is not None:
            self.on_stored()
        return 0x0000


def read_ledger(folder: Path) -> dict[str, dict]:
    """The retrieval ledger of one raw series folder: raw file name (without ``.dcm``) ->
    ``{"sha256", "size", "transport"}`` (transport None for a file recovered after a killed
    run). Empty when there is none."""
    try:
        return json.loads((Path(folder) / LEDGER).read_text()).get("instances", {})
    except (OSError, ValueError):
        return {}
