"""Find the studies and series a project needs (E1, E2): C-FIND or QIDO-RS, then filters.

Each inclusion row is matched by PatientID or AccessionNumber at study level (with the study
date range), then its studies' series are listed and filtered by modality and description.
C-FIND answers cut short by the PACS's result limit (Orthanc ``LimitFindResults`` ends with
Cancel 0xFE00) are split into StudyDate windows until each window is complete; QIDO-RS pages
with limit/offset. Identifiers never reach the logs: rows are named by their row number.

Bad values never lose a patient. A PACS keeps what the scanner wrote: United Imaging writes
StudyDate ``***``, others leave it empty or out of range, and a date-range search never matches
those studies. So each inclusion is asked once without a date, and a study whose StudyDate
is not a valid date is taken from that answer (when that answer is whole, it also gives the
studies in the date range: no second search). When the spec filters by date, that filter
cannot be applied to such a study: it is included (the data engineer asked for the patient, and
its dates are emptied by pseudonymisation) and listed in :attr:`QueryResult.unapplied`, which
the run summary prints. Missing SeriesNumber, and any description (path-like, non-ASCII), are
kept as they are: they select nothing and name nothing on disk.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta

from pydicom.dataset import Dataset

from .config import Inclusion, ProjectSpec
from .model import SeriesRef, StudyRef
from .pacs.retry import with_retries
from .pacs.transport import Transport, open_transport, parse_da

log = logging.getLogger(__name__)

_EARLIEST = date(1900, 1, 1)


@dataclass(frozen=True)
class UnappliedFilter:
    """A selection filter that could not be applied to one matched study: the study is included.
    Holds no identifier (the inclusion row number and subject code, the filter, the reason)."""

    row: int
    subject: str
    filter: str
    reason: str


@dataclass
class QueryResult:
    """Studies matched (with their kept series), inclusion rows that matched nothing, and the
    filters that could not be applied to a matched study (it was included)."""

    studies: list[StudyRef] = field(default_factory=list)
    unmatched: list[Inclusion] = field(default_factory=list)
    unapplied: list[UnappliedFilter] = field(default_factory=list)


def _int(v) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _Filters:
    """The spec's selection, compiled once."""

    lo: date
    hi: date
    dated: bool
    modalities: list[str]
    study_re: re.Pattern | None
    series_re: re.Pattern | None
    exclude_re: re.Pattern | None
    since: date | None = None  # an incremental query (replication): only studies from this day on

    def after(self, day: date | None) -> "_Filters":
        """These filters, for the studies dated ``day`` or later only (None: unchanged)."""
        return self if day is None else replace(self, lo=max(self.lo, day), since=day)

    @classmethod
    def of(cls, spec: ProjectSpec) -> "_Filters":
        sel = spec.selection
        study_re, series_re, exclude_re = (
            re.compile(p) if p else None
            for p in (sel.study_description, sel.series_description, sel.exclude_series_description))
        return cls(
            lo=sel.study_date.start if sel.study_date and sel.study_date.start else _EARLIEST,
            hi=sel.study_date.end if sel.study_date and sel.study_date.end else date.today() + timedelta(days=1),
            dated=bool(sel.study_date and (sel.study_date.start or sel.study_date.end)),
            modalities=[m.upper() for m in sel.modalities],
            study_re=study_re, series_re=series_re, exclude_re=exclude_re,
        )

    def keeps_series(self, modality: str, description: str) -> bool:
        return not ((self.modalities and modality not in self.modalities)
                    or (self.series_re and not self.series_re.search(description))
                    or (self.exclude_re and self.exclude_re.search(description)))


#: Studies per series search by a list of Study Instance UIDs (a QIDO-RS URL of 50 UIDs stays under 4 kB).
SERIES_BATCH = 50


@dataclass
class _Candidate:
    """A study an inclusion row matched, before its series are known."""

    ref: StudyRef
    day: date | None
    series_count: int | None  # NumberOfStudyRelatedSeries, as the PACS answered it


def find_studies(spec: ProjectSpec, since: Mapping[int, date] | None = None) -> QueryResult:
    """Match every inclusion row against the PACS and apply the spec's filters.

    Takes the resolved spec (``spec.inclusions``, ``spec.selection``, ``spec.pacs``).
    Returns a :class:`QueryResult`: one :class:`StudyRef` per matched study (series kept
    after filtering, with announced instance counts), and the rows that matched no study
    with at least one kept series. Each C-FIND or QIDO-RS search is retried on a transient
    failure (:mod:`pacs2bids.pacs.retry`). Raises :class:`PacsError` if the PACS cannot be queried.

    Round trips: per row, one study search without a date, and the search by date only when the
    PACS may have cut that answer short (QIDO-RS always: it cuts without a word); then the series
    of every matched study, :data:`SERIES_BATCH` studies per search (List of UID matching), each
    study's count checked against its NumberOfStudyRelatedSeries, and one search per study for
    those the batch did not answer whole. The searches share one connection, and one slot of
    the PACS's gate (:meth:`Transport.one_connection`).

    ``since`` (inclusion row -> day), for an incremental replication (:mod:`pacs2bids.replicate`):
    the rows so bounded are asked together, in ONE study search of the PACS by StudyDate from the
    earliest bound on, matched here to each row by PatientID or AccessionNumber and its own day; a
    row whose window holds none is done (and not listed as unmatched), one whose window holds a
    study is asked again as above, so that its studies get the sessions a full extraction gives.
    When the PACS cuts that answer short or warns, each bounded row is asked in a search by date
    of its own (logged).
    """
    filters = _Filters.of(spec)
    result = QueryResult()
    seen: set[str] = set()
    with open_transport(spec) as transport, transport.one_connection():
        since = since or {}
        hits = _window_hits(spec, transport, filters, since) if since else None
        matched = [(inc, _row_candidates(spec, transport, inc, filters, since.get(inc.row), hits))
                   for inc in spec.inclusions]
        series = _series_by_study(spec, transport, [c for _, found in matched for c in found], filters)
        for inc, found in matched:
            if not _keep_inclusion(inc, found, series, filters, result, seen) and inc.row not in since:
                result.unmatched.append(inc)
    log.info(
        "query: %d inclusion rows, %d studies matched, %d rows unmatched",
        len(spec.inclusions), len(result.studies), len(result.unmatched),
    )
    return result


def _studies_of(spec: ProjectSpec, transport: Transport, inc: Inclusion, f: _Filters) -> tuple[str, str, list[Dataset]]:
    """The studies of one inclusion in the date window, then those a search in the window cannot
    return: a StudyDate that is not a valid date, or a valid one outside the window. One search
    without a date (universal matching, PS3.4 C.2.2.2.3); when the PACS may have cut it short,
    also the search in the window, which splits until whole. Returns (key, value, studies)."""
    key, value = _key_of(inc)
    what = f"study search for inclusion row {inc.row}"
    if f.since is not None:  # incremental: the window alone
        return key, value, list(with_retries(spec.retries, lambda: transport.find_studies(key, value, f.lo, f.hi),
                                             what, log))
    every, whole = with_retries(spec.retries, lambda: transport.find_every_study(key, value), what, log)

    def inside(st: Dataset) -> bool:
        return (d := parse_da(st.get("StudyDate"))) is not None and f.lo <= d <= f.hi

    if whole:  # what the search in the window would answer, in the same order
        studies = [st for st in every if inside(st)]
    else:
        studies = list(with_retries(spec.retries, lambda: transport.find_studies(key, value, f.lo, f.hi), what, log))
    return key, value, studies + [st for st in every if not inside(st)]


def _row_candidates(spec: ProjectSpec, transport: Transport, inc: Inclusion, f: _Filters,
                    since: date | None, hits: set[int] | None = None) -> list[_Candidate]:
    """The candidates of one row; with ``since``, none unless a study is dated that day or later
    (known from ``hits``, the rows the window search matched, or else by a search of the row's own)."""
    if since is not None:
        if hits is not None and inc.row not in hits:
            return []
        if hits is None and not _candidates(spec, transport, inc, f.after(since)):
            return []
    return _candidates(spec, transport, inc, f)


def _window_hits(spec: ProjectSpec, transport: Transport, f: _Filters, since: Mapping[int, date]) -> set[int] | None:
    """The rows bounded by a watermark that have a study in their window, by ONE study search of
    the PACS by StudyDate from the earliest bound on, matched to the rows here by PatientID or
    AccessionNumber. None when the PACS cut that answer short or warned: then each row is asked."""
    wide = f.after(min(since.values()))
    if wide.lo > wide.hi:
        return set()
    studies, whole = with_retries(spec.retries, lambda: transport.find_window(wide.lo, wide.hi),
                                  "study search by date window", log)
    if not whole:
        log.warning("the PACS cut the study search by date window short (or warned): one search per "
                    "inclusion row instead; raise its result limit (Orthanc: LimitFindResults)")
        return None
    by_key: dict[tuple[str, str], list[Dataset]] = {}
    for st in studies:
        for key in ("PatientID", "AccessionNumber"):
            if value := str(st.get(key, "") or ""):
                by_key.setdefault((key, value), []).append(st)
    hits: set[int] = set()
    for inc in spec.inclusions:
        if inc.row in since:
            key, value = _key_of(inc)
            if _filtered(inc, key, value, by_key.get((key, value), []), f.after(since[inc.row])):
                hits.add(inc.row)
    log.info("replication: one study search by date window, %d of %d bounded rows have a study in it",
             len(hits), len(since))
    return hits


def _key_of(inc: Inclusion) -> tuple[str, str]:
    return ("PatientID", inc.patient_id) if inc.patient_id else ("AccessionNumber", inc.accession_number)


def _candidates(spec: ProjectSpec, transport: Transport, inc: Inclusion, f: _Filters) -> list[_Candidate]:
    """The studies of one inclusion row that pass the study-level filters (once each)."""
    key, value, studies = _studies_of(spec, transport, inc, f)
    return _filtered(inc, key, value, studies, f)


def _filtered(inc: Inclusion, key: str, value: str, studies: list[Dataset], f: _Filters) -> list[_Candidate]:
    """Those of ``studies`` that are the row's (``key`` is ``value``) and pass the study-level filters."""
    out: list[_Candidate] = []
    uids_here: set[str] = set()
    for st in studies:
        uid = str(st.get("StudyInstanceUID", ""))
        if not uid or uid in uids_here:
            continue
        uids_here.add(uid)
        # the PACS filtered already; check again, for PACS that ignore some keys
        if str(st.get(key, value) or value) != value:
            continue
        sdate = str(st.get("StudyDate", "") or "")
        day = parse_da(sdate)
        if (f.dated or f.since) and day is not None and not (f.lo <= day <= f.hi):
            continue  # outside the spec's date range (without one, no date excludes a study)
        desc = str(st.get("StudyDescription", "") or "")
        if f.study_re and not f.study_re.search(desc):
            continue
        ref = StudyRef(inclusion_row=inc.row, subject=inc.subject, session=inc.session, study_instance_uid=uid,
                       study_date=sdate, study_description=desc, sop_classes=_sop_classes(st))
        out.append(_Candidate(ref, day, _int(st.get("NumberOfStudyRelatedSeries"))))
    return out


def _series_by_study(spec: ProjectSpec, transport: Transport, candidates: list[_Candidate],
                     f: _Filters) -> dict[str, list[Dataset]]:
    """Every series of each candidate study, by Study Instance UID: by batches of studies, and
    one search per study for those a batch did not answer whole (count unknown or different)."""
    expected = {c.ref.study_instance_uid: c.series_count for c in candidates}
    uids = list(expected)
    found: dict[str, list[Dataset]] = {}
    for i in range(0, len(uids) if len(uids) > 1 else 0, SERIES_BATCH):
        batch = uids[i:i + SERIES_BATCH]
        answer = with_retries(spec.retries, lambda: transport.find_series_of(batch),
                              f"series search of {len(batch)} studies", log)
        by_study: dict[str, list[Dataset]] = {}
        for se in answer or ():
            by_study.setdefault(str(se.get("StudyInstanceUID", "") or ""), []).append(se)
        for uid in batch:
            got = by_study.get(uid, [])
            if got and len({str(se.get("SeriesInstanceUID", "")) for se in got}) == expected[uid]:
                found[uid] = got
    for c in candidates:
        uid = c.ref.study_instance_uid
        if uid not in found:
            found[uid] = with_retries(spec.retries, lambda: transport.find_series(uid, f.modalities),
                                      f"series search for inclusion row {c.ref.inclusion_row}", log)
    return found


def _keep_inclusion(inc: Inclusion, candidates: list[_Candidate], series: dict[str, list[Dataset]], f: _Filters,
                    result: QueryResult, seen: set[str]) -> bool:
    """Add the studies of one inclusion row to ``result``; False when none has a kept series."""
    kept_any = False
    for c in candidates:
        ref, uid, day = c.ref, c.ref.study_instance_uid, c.day
        _keep_series(ref, series[uid], f)
        if not ref.series:
            continue
        if uid in seen:
            log.warning("inclusion row %d: a study already matched by another row is taken again", inc.row)
        seen.add(uid)
        kept_any = True
        result.studies.append(ref)
        if day is None and f.dated:
            what = "empty" if not ref.study_date.strip() else "not a valid date"
            log.warning("inclusion row %d: a study's date is unreadable, so the date filter was not applied "
                        "to it: included", inc.row)
            result.unapplied.append(UnappliedFilter(inc.row, inc.subject, "study_date",
                                                    f"StudyDate {what}: the study is included, its date range unchecked"))
    return kept_any


def _sop_classes(study: Dataset) -> tuple[str, ...]:
    """The study's SOPClassesInStudy (0008,0062) as the PACS answered it (a C-FIND or QIDO key: Orthanc
    answers it over C-FIND), for the schedule only (:func:`pacs2bids.study.study_cost`); () when not."""
    value = study.get("SOPClassesInStudy")
    if value is None or value == "":
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in values if str(v).strip())


def _keep_series(ref: StudyRef, series: list[Dataset], f: _Filters) -> None:
    """Append to ``ref`` the series the filters keep (once each, by SeriesNumber), count the others."""
    done: set[str] = set()
    for se in series:
        se_uid = str(se.get("SeriesInstanceUID", ""))
        if not se_uid or se_uid in done:
            continue
        done.add(se_uid)
        modality = str(se.get("Modality", "") or "").upper()
        sdesc = str(se.get("SeriesDescription", "") or "")
        if not f.keeps_series(modality, sdesc):
            ref.excluded_series += 1
            continue
        ref.series.append(
            SeriesRef(
                study_instance_uid=ref.study_instance_uid, series_instance_uid=se_uid, modality=modality,
                series_number=_int(se.get("SeriesNumber")), series_description=sdesc,
                announced_instances=_int(se.get("NumberOfSeriesRelatedInstances")),
                sop_class=str(se.get("SOPClassUID", "") or "").strip(),
            )
        )
    ref.series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_description))
