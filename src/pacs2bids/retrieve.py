"""Retrieve a study's series into the private raw folder, never losing or duplicating an image.

Layout: ``raw_root/<h(study)>/<h(series)>/<h(sop)>.dcm`` where ``h`` is a keyed hash
(HMAC-SHA256 with the project key, hex, truncated): no original UID in a path. Every file is
written under a temporary name and renamed into place, so what is on disk is always whole;
a re-run, or a run resumed after SIGKILL, compares the PACS's instance list (instance-level
C-FIND or QIDO-RS, by SOPInstanceUID) with the disk and fetches only what is missing.
Each series folder keeps ``.ledger.json`` (file name -> sha256, size, transport): the checksum
of each file as received, before anything reads it, so the lineage can record (keyed) which
received file each published instance came from (:func:`read_ledger`).

Payloads that are not readable DICOM, or carry UIDs of another instance or series, go to
``raw_root/../quarantine/`` with a ``.reason.txt``; their series is reported incomplete and
the rest of the study goes on. Transient PACS failures are retried with exponential back-off
(``spec.retries``); a configuration failure (0xA801, association rejected) raises at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pydicom
from pydicom.dataset import Dataset

from .checksum import sha256_file
from .config import ProjectSpec
from .errors import PacsError
from .model import SeriesRef, StudyRef

log = logging.getLogger(__name__)

LEDGER = ".ledger.json"
INCOMING = ".incoming"
BATCH = 200  # SOPInstanceUIDs per instance-level retrieve (UID list matching, PS3.4 C.4.2.2.1)


def keyed_name(key: bytes, uid: str, length: int = 32) -> str:
    """HMAC-SHA256 of ``uid`` under the project key, hex, first ``length`` characters."""
    return hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()[:length]


@dataclass
class RetrievedSeries:
    """What is on disk for one series after retrieval."""

    series: SeriesRef
    folder: Path
    received: int
    missing: int
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    status: str = "complete"  # complete | incomplete | failed
    reason: str = ""


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


# ---------------------------------------------------------------------------------------
# The receiving end: one per series
# ---------------------------------------------------------------------------------------
def _move_into_place(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` atomically (copying first to a temporary name beside ``dest``
    when they are on different file systems)."""
    try:
        os.replace(src, dest)
    except OSError:
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        src.unlink(missing_ok=True)


def _check_whole(ds: Dataset, path: Path) -> None:
    """Raise ValueError if the file ends before its last element does (a cut transfer):
    values larger than the defer size were not read, only their offsets and lengths."""
    size = path.stat().st_size
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
        with open(path, "rb") as f:
            f.seek(max(0, size - 8))
            if f.read(8) not in (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"):
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
        self.quarantined: list[tuple[str, str]] = []
        self.stored = 0  # files written in this run
        self.duplicates = 0  # arrived again although already on disk: not rewritten

    # -- ledger -----------------------------------------------------------------------
    def load(self, announced_names: set[str] | None) -> set[str]:
        """Reconcile the folder with its ledger; returns the names of the good files on disk."""
        self.ledger = read_ledger(self.folder)
        present: set[str] = set()
        for p in self.folder.iterdir():
            if p.name.endswith(".part"):
                p.unlink(missing_ok=True)  # left by a killed run
                continue
            if p.suffix != ".dcm":
                continue
            name = p.stem
            size = p.stat().st_size
            entry = self.ledger.get(name)
            if entry is None:  # renamed into place, then the run died before the ledger was saved
                entry = self.ledger[name] = {"sha256": sha256_file(p), "size": size, "transport": None}
            if entry["size"] != size:
                log.warning("a raw file differs from its ledger entry; fetching it again")
                p.unlink()
                self.ledger.pop(name, None)
                continue
            present.add(name)
        for name in list(self.ledger):
            if name not in present:
                self.ledger.pop(name)
        return present

    def save(self) -> None:
        with self.lock:
            data = json.dumps({"version": 1, "instances": self.ledger}, indent=0, sort_keys=True)
        tmp = self.folder / f"{LEDGER}.{uuid.uuid4().hex[:8]}.part"
        tmp.write_text(data)
        os.replace(tmp, self.folder / LEDGER)

    # -- receiving --------------------------------------------------------------------
    def _quarantine(self, path: Path, name: str, reason: str) -> None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        qname = f"{name}-{uuid.uuid4().hex[:8]}.dcm"
        _move_into_place(path, self.quarantine_dir / qname)
        (self.quarantine_dir / f"{qname}.reason.txt").write_text(reason + "\n")
        with self.lock:
            self.quarantined.append((qname, reason))
        log.warning("a received payload was quarantined: %s", reason)

    def __call__(self, path: Path, sop_class_uid: str | None = None, sop_instance_uid: str | None = None) -> int:
        """Take the temporary file ``path`` (moved away; deleted otherwise by its creator).
        Returns the C-STORE status to answer: 0x0000 stored, 0xC000 refused (PS3.4 B.2.3)."""
        if self.limiter is not None:
            self.limiter.wait()
        name = keyed_name(self.key, sop_instance_uid) if sop_instance_uid else f"unnamed-{uuid.uuid4().hex[:12]}"
        try:
            ds = pydicom.dcmread(path, defer_size=1024)
            payload_sop = str(ds.SOPInstanceUID)
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            _check_whole(ds, path)
        except Exception as exc:  # anything pydicom cannot read is quarantined, never stored
            self._quarantine(path, name, f"not readable DICOM ({type(exc).__name__}: {str(exc)[:120]})")
            return 0xC000
        if sop_instance_uid and payload_sop != sop_instance_uid:
            self._quarantine(path, name, "payload SOPInstanceUID differs from the one announced for it")
            return 0xC000
        if study != self.study_uid or series != self.series_uid:
            self._quarantine(path, name, "payload belongs to another study or series than the one requested")
            return 0xC000
        name = keyed_name(self.key, payload_sop)
        dest = self.folder / f"{name}.dcm"
        with self.lock:
            if dest.exists():
                self.duplicates += 1
                return 0x0000
        digest, size = sha256_file(path), path.stat().st_size
        _move_into_place(path, dest)
        with self.lock:
            self.ledger[name] = {"sha256": digest, "size": size, "transport": self.transport}
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


def transport_name(spec: ProjectSpec) -> str:
    """How ``spec`` retrieves: ``c-get``, ``c-move`` or ``wado-rs``."""
    return spec.pacs.dimse.retrieve if spec.pacs.chosen == "dimse" else "wado-rs"


# ---------------------------------------------------------------------------------------
# Transports
# ---------------------------------------------------------------------------------------
class _Dimse:
    def __init__(self, spec: ProjectSpec, stack: ExitStack):
        from . import dimse

        self.dimse = dimse
        self.settings = spec.pacs.dimse
        self.server = None
        if self.settings.retrieve == "c-move":
            self.server = stack.enter_context(dimse.storage_server(self.settings))

    def list_instances(self, study_uid: str, series_uid: str) -> dict[str, str] | None:
        """SOPInstanceUID -> SOPClassUID of the series (instance-level C-FIND), or None when
        the PACS will not list them (result limit, or a failure answering the query): the
        caller then counts instead."""
        r = None
        for with_class in (True, False):  # some PACS read each file to answer SOPClassUID
            ds = Dataset()
            ds.QueryRetrieveLevel = "IMAGE"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ""
            if with_class:
                ds.SOPClassUID = ""
            try:
                r = self.dimse.find(self.settings, ds)
                break
            except PacsError as exc:
                if exc.status is None:  # no answer at all: let the caller retry
                    raise
                log.warning("the PACS failed to list a series' instances (0x%04X)", exc.status)
        if r is None or r.truncated:
            return None
        return {str(m.SOPInstanceUID): str(m.get("SOPClassUID", "") or "") for m in r.matches if m.get("SOPInstanceUID")}

    def fetch(self, study_uid: str, series_uid: str, sops: list[str] | None, sink: SeriesSink,
              classes: frozenset[str], probe: str | None = None) -> None:
        batches = [None] if sops is None else [sops[i:i + BATCH] for i in range(0, len(sops), BATCH)]
        for batch in batches:
            ds = Dataset()
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            if batch is None:
                ds.QueryRetrieveLevel = "SERIES"
            else:
                ds.QueryRetrieveLevel = "IMAGE"
                ds.SOPInstanceUID = batch if len(batch) > 1 else batch[0]
            if self.server is None:
                self.dimse.get(self.settings, ds, sink, classes)
            else:
                self.server.support(classes)
                self.server.expect_series(series_uid, sink)
                try:
                    self.dimse.move(self.settings, ds, self.server.ae_title, self.server)
                except self.dimse.MoveDestinationUnknown as exc:
                    if exc.status == 0xA801 or not probe:
                        raise
                    # Ambiguous (a failure before any sub-operation): move one instance. If
                    # it arrives, the PACS knows us and this was another, retryable, failure.
                    one = Dataset()
                    one.QueryRetrieveLevel = "IMAGE"
                    one.StudyInstanceUID, one.SeriesInstanceUID, one.SOPInstanceUID = study_uid, series_uid, probe
                    try:
                        self.dimse.move(self.settings, one, self.server.ae_title, self.server)
                    except self.dimse.MoveDestinationUnknown:
                        raise exc from None
                    raise PacsError(f"C-MOVE of a series failed before sending anything ({exc.status:#06x}), "
                                    "although the PACS reaches our storage AE", transient=True,
                                    status=exc.status) from None
                finally:
                    self.server.forget_series(series_uid)


class _Web:
    def __init__(self, spec: ProjectSpec, raw_root: Path):
        from .dicomweb import WebPacs

        self.web = WebPacs(spec.pacs.dicomweb)
        self.raw_root = raw_root

    def list_instances(self, study_uid: str, series_uid: str) -> dict[str, str] | None:
        found = self.web.search("instances", {}, ["SOPInstanceUID", "SOPClassUID"], study_uid, series_uid)
        return {str(m.SOPInstanceUID): str(m.get("SOPClassUID", "") or "") for m in found if m.get("SOPInstanceUID")}

    def fetch(self, study_uid: str, series_uid: str, sops: list[str] | None, sink: SeriesSink,
              classes: frozenset[str], probe: str | None = None) -> None:
        incoming = Path(tempfile.mkdtemp(prefix="wado-", dir=self.raw_root / INCOMING))
        try:
            for sop in [None] if sops is None else sops:
                self.web.retrieve(study_uid, series_uid, sop, incoming, lambda p: (sink(p), p.unlink(missing_ok=True)))
        finally:
            shutil.rmtree(incoming, ignore_errors=True)


# ---------------------------------------------------------------------------------------
def _retrieve_series(spec: ProjectSpec, transport, series: SeriesRef, sink: SeriesSink, progress) -> RetrievedSeries:
    attempts = spec.retries.attempts
    backoff = spec.retries.backoff_seconds
    announced: dict[str, str] | None = None
    last_error = ""
    whole_failed = False

    def todo() -> list[str] | None:
        """What is still missing, from the disk alone: SOPInstanceUIDs, or None meaning
        'the series, again' when the PACS would not list its instances."""
        present = sink.load(None)
        if announced is not None:
            return [u for u in announced if keyed_name(sink.key, u) not in present]
        expected = series.announced_instances
        return [] if expected is not None and len(present) >= expected else None

    for attempt in range(attempts + 1):
        if attempt:
            delay = backoff * (2 ** (attempt - 1))
            log.info("series #%s: retry %d of %d in %.1f s", series.series_number, attempt, attempts, delay)
            time.sleep(delay)
        try:
            if announced is None:
                announced = transport.list_instances(series.study_instance_uid, series.series_instance_uid)
            missing = todo()
            if missing == []:
                break
            # after a series-level request that brought nothing, ask instance by instance
            whole = missing is None or (len(missing) == len(announced) and not whole_failed)
            classes = frozenset(c for c in (announced or {}).values() if c)
            whole_failed = whole
            transport.fetch(series.study_instance_uid, series.series_instance_uid, None if whole else missing,
                            sink, classes, probe=missing[0] if missing else None)
            whole_failed = whole and sink.stored == 0
            sink.save()
            if progress is not None:
                progress(series, sink.stored, len(announced) if announced else series.announced_instances)
            if todo() == []:
                break
        except PacsError as exc:
            sink.save()
            if not exc.transient:
                raise
            last_error = str(exc)
            log.warning("series #%s: transient PACS failure (attempt %d of %d)",
                        series.series_number, attempt + 1, attempts + 1)
    sink.save()
    present = sink.load(None)
    if announced is not None:
        names = {keyed_name(sink.key, u) for u in announced}
        received = len(names & present)
        missing = len(names - present)
    else:
        received = len(present)
        missing = max(0, (series.announced_instances or 0) - received)
    if received == 0 and (missing or last_error):
        status, reason = "failed", last_error or "the PACS sent no instance of this series"
    elif missing or sink.quarantined:
        status = "incomplete"
        reason = f"{missing} instance(s) missing after {attempts + 1} attempt(s)" if missing else ""
        if sink.quarantined:
            reason = "; ".join(filter(None, [reason, f"{len(sink.quarantined)} payload(s) quarantined"]))
        if last_error:
            reason += f"; last error: {last_error}"
    else:
        status, reason = "complete", ""
    return RetrievedSeries(series, sink.folder, received, missing, list(sink.quarantined), status, reason)


def retrieve_study(spec: ProjectSpec, study: StudyRef, raw_root: Path, *, progress=None,
                   limiter: RateLimiter | None = None) -> list[RetrievedSeries]:
    """Retrieve every series of ``study`` into ``raw_root`` with the spec's transport.

    ``progress(series, stored_so_far, announced)`` is called after each attempt on a series;
    ``limiter`` (a :class:`RateLimiter`, optional) caps instances per minute.
    Returns one :class:`RetrievedSeries` per series, in the study's order. Series already
    complete on disk cost one instance-list query and no transfer.
    Raises :class:`PacsError` when the PACS refuses for a reason a retry cannot fix
    (unreachable after retries is reported per series as ``failed``, not raised).
    """
    raw_root = Path(raw_root)
    key = spec.secret_bytes
    quarantine = raw_root.parent / "quarantine"
    (raw_root / INCOMING).mkdir(parents=True, exist_ok=True)
    out: list[RetrievedSeries] = []
    with ExitStack() as stack:
        transport = _Dimse(spec, stack) if spec.pacs.chosen == "dimse" else _Web(spec, raw_root)
        for series in study.series:
            folder = raw_root / keyed_name(key, study.study_instance_uid) / keyed_name(key, series.series_instance_uid)
            folder.mkdir(parents=True, exist_ok=True)
            sink = SeriesSink(key, study.study_instance_uid, series.series_instance_uid, folder, quarantine, limiter,
                              transport=transport_name(spec))
            try:
                rs = _retrieve_series(spec, transport, series, sink, progress)
            except PacsError as exc:
                if exc.transient:
                    rs = RetrievedSeries(series, folder, 0, series.announced_instances or 0, list(sink.quarantined),
                                         "failed", str(exc))
                else:
                    raise
            log.info("series #%s: %s, %d received, %d missing, %d quarantined",
                     series.series_number, rs.status, rs.received, rs.missing, len(rs.quarantined))
            out.append(rs)
    return out


def retrieve_study_with_fallback(spec: ProjectSpec, study: StudyRef, raw_root: Path, *, progress=None,
                                 limiter: RateLimiter | None = None) -> list[RetrievedSeries]:
    """:func:`retrieve_study` with the chosen transport, then, when ``pacs.fallback`` is set, the
    fallback transport for whatever did not arrive whole (or for the whole study when the chosen
    transport refused it). Both write to the same keyed folders, so the fallback fetches only
    the missing instances. Returns one :class:`RetrievedSeries` per series of ``study``.
    """
    fallback = spec.pacs.fallback
    try:
        first = retrieve_study(spec, study, raw_root, progress=progress, limiter=limiter)
    except PacsError as exc:
        if fallback is None:
            raise
        log.warning("%s refused the study (%s); trying %s", spec.pacs.chosen, exc, fallback)
        first = []
    done = {rs.series.series_instance_uid: rs for rs in first if rs.status == "complete"}
    todo = [s for s in study.series if s.series_instance_uid not in done]
    if fallback is None or not todo:
        return first
    other = spec.model_copy(update={"pacs": spec.pacs.model_copy(update={"transport": fallback})})
    log.info("%d series not retrieved whole by %s: trying %s", len(todo), spec.pacs.chosen, fallback)
    second = retrieve_study(other, replace(study, series=todo), raw_root, progress=progress, limiter=limiter)
    by_uid = {**{rs.series.series_instance_uid: rs for rs in first}, **done,
              **{rs.series.series_instance_uid: rs for rs in second}}
    for rs in second:
        if rs.status != "complete":
            rs.reason = f"{rs.reason} (after {spec.pacs.chosen}, then {fallback})".strip()
    return [by_uid[s.series_instance_uid] for s in study.series if s.series_instance_uid in by_uid]
