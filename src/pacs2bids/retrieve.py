"""Retrieve a study's series into the private raw folder, never losing or duplicating an image.

Layout: ``raw_root/<h(study)>/<h(series)>/<h(sop)>.dcm`` where ``h`` is a keyed hash
(:func:`pacs2bids.sink.keyed_name`, HMAC-SHA256 under the project's HKDF-derived raw-name key,
hex, truncated): no original UID in a path. A re-run, or a run resumed after SIGKILL, compares
the PACS's instance list (instance-level C-FIND or QIDO-RS, by SOPInstanceUID) with the disk
and fetches only what is missing (:class:`pacs2bids.sink.SeriesSink` keeps each folder whole
and its ledger, :func:`read_ledger`). A series with nothing on disk yet is first fetched whole,
and listed only when fewer instances than its series query announced arrived. A study wanted
whole (no series left out by the selection) with nothing on disk yet comes in one request (a
study-level C-GET, or WADO-RS of the study), each instance routed to its series' folder by its
SeriesInstanceUID as it arrives (:class:`StudySink`); then each series goes on as above.

:func:`retrieve_study` does the whole job for one study: it waits for the PACS's retrieval
window, paces instances (``pacs.instances_per_minute``), retrieves with the chosen transport
(:mod:`pacs2bids.pacs.transport`), then with the fallback transport for the series that did not
arrive whole. Transient PACS failures are retried per series with exponential back-off
(``spec.retries``, :mod:`pacs2bids.pacs.retry`); a configuration failure (0xA801, association
rejected) raises at once. Payloads that are not readable DICOM, or carry UIDs of another
instance or series, are quarantined; their series is reported incomplete and the rest of the
study goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .config import ProjectSpec
from .deid.keyed import raw_name_key
from .errors import PacsError
from .model import SeriesRef, StudyRef
from .pacs.retry import with_retries
from .pacs.transport import Transport, open_transport
from .sink import RateLimiter, SeriesSink, check_payload, keyed_name, read_ledger
from .windows import wait_until_open

__all__ = ["RetrievedSeries", "StudySink", "read_ledger", "retrieve_study"]

log = logging.getLogger(__name__)

INCOMING = ".incoming"

Progress = Callable[[SeriesRef, int, "int | None"], None]
OnComplete = Callable[["RetrievedSeries"], None]


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


class _StillMissing(PacsError):
    """Instances still missing after a retrieve: a transient failure, retried (the next attempt
    asks only for what is missing)."""

    def __init__(self) -> None:
        super().__init__("instances still missing after a retrieve", transient=True)


@dataclass
class _SeriesRun:
    """One series' retrieval: its attempts share what the PACS announced and the last error."""

    transport: Transport
    series: SeriesRef
    sink: SeriesSink
    progress: Progress | None
    announced: dict[str, str] | None = None
    last_error: str = ""
    whole_failed: bool = False
    unlisted_tried: bool = False
    prefetched: bool = False  # its study was fetched whole (StudySink) into its empty folder just before

    def todo(self) -> list[str] | None:
        """What is still missing, from the disk alone: SOPInstanceUIDs, or None meaning
        'the series, again' when the PACS would not list its instances."""
        present = self.sink.load(None)
        if self.announced is not None:
            return [u for u in self.announced if keyed_name(self.sink.key, u) not in present]
        expected = self.series.announced_instances
        return [] if expected is not None and len(present) >= expected else None

    def fetch_unlisted(self) -> bool:
        """A series met for the first time, its folder empty: fetched whole before any
        instance-level listing (one round trip, and the PACS's listing work, saved per series).
        True when as many good files as the series query announced are on disk; otherwise the
        caller lists the instances and asks for what is missing, as for any resume: also when
        the PACS answered this request with a failure status (over C-GET, a series of a private
        SOP class fails until the listing names its class). When its study was just fetched whole
        (``prefetched``, :class:`StudySink`), no request is made: what arrived is counted. A request that got no answer at all
        is raised (retried). Only where the transport allows it (``fetches_unlisted``: not C-MOVE,
        which needs a listed instance to tell an unknown destination from another failure)."""
        series, sink = self.series, self.sink
        if (self.unlisted_tried or not getattr(self.transport, "fetches_unlisted", False)
                or not series.announced_instances or (not self.prefetched and sink.load(None))):
            return False
        self.unlisted_tried = True
        try:
            if not self.prefetched:
                self.transport.fetch(series.study_instance_uid, series.series_instance_uid, None, sink, frozenset())
        except PacsError as exc:
            if exc.status is None:
                raise
            return False
        finally:
            sink.save()
        if self.todo() != []:
            return False
        if self.progress is not None:
            self.progress(series, sink.stored, series.announced_instances)
        return True

    def attempt(self) -> None:
        """One attempt; raises :class:`_StillMissing` when it did not bring everything."""
        series, sink = self.series, self.sink
        try:
            if self.announced is None and self.fetch_unlisted():
                return
            if self.announced is None:
                self.announced = self.transport.list_instances(series.study_instance_uid, series.series_instance_uid)
            missing = self.todo()
            if missing == []:
                return
            # after a series-level request that brought nothing, ask instance by instance
            whole = missing is None or (len(missing) == len(self.announced) and not self.whole_failed)
            classes = frozenset(c for c in (self.announced or {}).values() if c)
            self.whole_failed = whole
            self.transport.fetch(series.study_instance_uid, series.series_instance_uid, None if whole else missing,
                                 sink, classes, probe=missing[0] if missing else None)
            self.whole_failed = whole and sink.stored == 0
            sink.save()
            if self.progress is not None:
                self.progress(series, sink.stored, len(self.announced) if self.announced else series.announced_instances)
            if self.todo() == []:
                return
        except PacsError as exc:
            sink.save()
            if exc.transient:
                self.last_error = str(exc)
            raise
        raise _StillMissing()

    def outcome(self, attempts: int) -> RetrievedSeries:
        """What is on disk now, against what the PACS announced."""
        sink, series, last_error = self.sink, self.series, self.last_error
        sink.save()
        present = sink.load(None)
        if self.announced is not None:
            names = {keyed_name(sink.key, u) for u in self.announced}
            received, missing = len(names & present), len(names - present)
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


class StudySink:
    """Receives a study fetched in one request (C-GET at study level, WADO-RS of the study) and
    hands each instance to its series' :class:`SeriesSink`, by the SeriesInstanceUID in its head
    (checked once, here). A payload it cannot route (not readable, of another study, of a series
    not asked for) is dropped, not filed: its series stays short, and the per-series retrieval
    that follows asks for what is missing, and quarantines a bad payload there, in its series, as
    a series fetch does. ``on_whole(series_uid)`` is called (in the receiving thread) once a
    series holds as many files as its query announced. Thread-safe, as the series sinks."""

    def __init__(self, study_uid: str, sinks: dict[str, SeriesSink], announced: dict[str, int | None],
                 on_whole: Callable[[str], None] | None = None):
        self.study_uid, self.sinks, self.announced, self.on_whole = study_uid, sinks, announced, on_whole
        self.dropped = 0
        self._whole: set[str] = set()

    def __call__(self, path: Path, sop_class_uid: str | None = None, sop_instance_uid: str | None = None, *,
                 sha256: str | None = None, size: int | None = None, head: bytes | None = None,
                 data: bytes | None = None) -> int:
        try:
            uids = check_payload(path, head, data)
        except Exception:  # not readable: the series fetch that follows decides (quarantine)
            uids = None
        sink = self.sinks.get(uids[2]) if uids is not None and uids[1] == self.study_uid else None
        if sink is None:
            self.dropped += 1
            log.debug("a payload of a study-level retrieval could not be routed to a series: left to the series")
            return 0xC000
        status = sink(path, sop_class_uid, sop_instance_uid, sha256=sha256, size=size, head=head, uids=uids,
                      data=data)
        want = self.announced.get(uids[2])
        with sink.lock:
            whole = bool(status == 0x0000 and want and sink.stored >= want and uids[2] not in self._whole)
            if whole:
                self._whole.add(uids[2])
        if whole and self.on_whole is not None:
            self.on_whole(uids[2])
        return status


def _retrieve_series(spec: ProjectSpec, run: _SeriesRun) -> RetrievedSeries:
    """Attempts until the series is whole, or the retries are spent (then reported, not raised);
    a failure a retry cannot fix is raised."""
    try:
        with_retries(spec.retries, run.attempt, f"series #{run.series.series_number}", log)
    except PacsError as exc:
        if not exc.transient:
            raise
    return run.outcome(spec.retries.attempts)


def _fetch_study_whole(transport: Transport, study: StudyRef, runs: list[_SeriesRun],
                       on_complete: OnComplete | None) -> set[str]:
    """When every series of ``study`` is wanted and none is on disk yet: the whole study in one
    request (one C-GET, one WADO-RS answer), each instance routed to its series as it arrives
    (:class:`StudySink`); a series is handed to ``on_complete`` as soon as it is whole. The
    per-series retrieval then finds what arrived and asks, series by series, for what did not (a
    series the PACS failed still fails alone). Returns the series already handed over. A partial
    selection (``excluded_series``), a resume, or a study of one series are fetched series by series."""
    if (len(runs) < 2 or study.excluded_series or not getattr(transport, "fetches_unlisted", False)
            or not all(r.series.announced_instances for r in runs) or any(r.sink.load(None) for r in runs)):
        return set()
    by_uid = {r.series.series_instance_uid: r for r in runs}
    handed: set[str] = set()

    def whole(uid: str) -> None:
        rs = by_uid[uid].outcome(0)
        if rs.status == "complete" and on_complete is not None:
            handed.add(uid)
            on_complete(rs)

    router = StudySink(study.study_instance_uid, {u: r.sink for u, r in by_uid.items()},
                       {u: r.series.announced_instances for u, r in by_uid.items()}, whole)
    try:
        transport.fetch(study.study_instance_uid, None, None, router, frozenset())
    except PacsError as exc:
        if not exc.transient and exc.status is None:  # a configuration failure: as a series fetch would
            raise
        log.info("the study-level retrieval failed (%s): series by series", exc)
    for run in runs:
        run.prefetched = True
        run.sink.save()
    return handed


def _retrieve_with(spec: ProjectSpec, kind: str | None, study: StudyRef, raw_root: Path, progress: Progress | None,
                   limiter: RateLimiter | None, on_complete: OnComplete | None = None,
                   whole_study: bool = False) -> list[RetrievedSeries]:
    """Every series of ``study`` with one transport (``kind``: dimse, dicomweb; None: the chosen
    one); ``whole_study``: ``study.series`` is all of it that is wanted (not a fallback's rest)."""
    key = raw_name_key(spec.secret_bytes, spec.project)
    quarantine = raw_root.parent / "quarantine"
    (raw_root / INCOMING).mkdir(parents=True, exist_ok=True)
    out: list[RetrievedSeries] = []
    # a study is retrieved over one connection (one slot of the PACS's gate), as over DIMSE
    with open_transport(spec, kind, incoming=raw_root / INCOMING) as transport, transport.one_connection():
        runs = []
        for series in study.series:
            folder = raw_root / keyed_name(key, study.study_instance_uid) / keyed_name(key, series.series_instance_uid)
            folder.mkdir(parents=True, exist_ok=True)
            sink = SeriesSink(key, study.study_instance_uid, series.series_instance_uid, folder, quarantine, limiter,
                              transport=transport.name)
            runs.append(_SeriesRun(transport, series, sink, progress))
        handed = _fetch_study_whole(transport, study, runs, on_complete) if whole_study else set()
        for run in runs:
            series = run.series
            try:
                rs = _retrieve_series(spec, run)
            except PacsError as exc:
                if not exc.transient:
                    raise
                rs = RetrievedSeries(series, run.sink.folder, 0, series.announced_instances or 0,
                                     list(run.sink.quarantined), "failed", str(exc))
            log.info("series #%s: %s, %d received, %d missing, %d quarantined",
                     series.series_number, rs.status, rs.received, rs.missing, len(rs.quarantined))
            out.append(rs)
            if on_complete is not None and rs.status == "complete" and series.series_instance_uid not in handed:
                on_complete(rs)  # final: the fallback only takes what is not complete
    return out


def retrieve_study(spec: ProjectSpec, study: StudyRef, raw_root: Path, *, progress: Progress | None = None,
                   limiter: RateLimiter | None = None, on_complete: OnComplete | None = None) -> list[RetrievedSeries]:
    """Retrieve every series of ``study`` into ``raw_root``: the whole retrieval of one study.

    Waits for the PACS's retrieval window (``pacs.windows``); paces instances at
    ``pacs.instances_per_minute / pacs.max_associations`` (a study receives on one connection at
    a time, and at most ``max_associations`` are open to the PACS across every run, so the PACS
    never sends more than ``instances_per_minute`` in all), unless ``limiter`` is given; retrieves
    with the chosen transport, then, when ``pacs.fallback`` is set, with the fallback transport
    whatever did not arrive whole (or the whole study when the chosen transport refused it). Both
    write to the same keyed folders, so the fallback fetches only the missing instances.

    ``progress(series, stored_so_far, announced)`` is called after each attempt on a series.
    ``on_complete(retrieved)`` is called once per complete series, as soon as it is complete on disk
    (its outcome is final), so that the caller can work on it while the next one arrives: in the
    retrieving thread (for a study fetched whole over C-GET, the association's receiving thread;
    in the order the series' last instances arrived).
    Returns one :class:`RetrievedSeries` per series, in the study's order. Series already
    complete on disk cost one instance-list query and no transfer; a series not yet on disk is
    first asked for whole, and listed only if fewer instances than announced arrived. Raises
    :class:`PacsError` when the PACS refuses for a reason a retry cannot fix (unreachable after retries is
    reported per series as ``failed``, not raised).
    """
    raw_root = Path(raw_root)
    if limiter is None and spec.pacs.instances_per_minute:
        limiter = RateLimiter(spec.pacs.instances_per_minute / spec.pacs.max_associations)
    wait_until_open(spec.pacs.windows, log=log.info)
    chosen, fallback = spec.pacs.chosen, spec.pacs.fallback
    try:
        first = _retrieve_with(spec, None, study, raw_root, progress, limiter, on_complete, whole_study=True)
    except PacsError as exc:
        if fallback is None:
            raise
        log.warning("%s refused the study (%s); trying %s", chosen, exc, fallback)
        first = []
    done = {rs.series.series_instance_uid: rs for rs in first if rs.status == "complete"}
    todo = [s for s in study.series if s.series_instance_uid not in done]
    if fallback is None or not todo:
        return first
    log.info("%d series not retrieved whole by %s: trying %s", len(todo), chosen, fallback)
    second = _retrieve_with(spec, fallback, replace(study, series=todo), raw_root, progress, limiter, on_complete)
    by_uid = {**{rs.series.series_instance_uid: rs for rs in first}, **done,
              **{rs.series.series_instance_uid: rs for rs in second}}
    for rs in second:
        if rs.status != "complete":
            rs.reason = f"{rs.reason} (after {chosen}, then {fallback})".strip()
    return [by_uid[s.series_instance_uid] for s in study.series if s.series_instance_uid in by_uid]
