"""Find the studies and series a project needs (E1, E2): C-FIND or QIDO-RS, then filters.

Each inclusion row is matched by PatientID or AccessionNumber at study level (with the study
date range), then its studies' series are listed and filtered by modality and description.
C-FIND answers cut short by the PACS's result limit (Orthanc ``LimitFindResults`` ends with
Cancel 0xFE00) are split into StudyDate windows until each window is complete; QIDO-RS pages
with limit/offset. Identifiers never reach the logs: rows are named by their row number.

Bad values never lose a patient. A PACS keeps what the scanner wrote: United Imaging writes
StudyDate ``***``, others leave it empty or out of range, and a date-range search never matches
those studies. So each inclusion is also asked once without a date, and a study whose StudyDate
is not a valid date is taken from that answer. When the spec filters by date, that filter
cannot be applied to such a study: it is included (the data engineer asked for the patient, and
its dates are emptied by pseudonymisation) and listed in :attr:`QueryResult.unapplied`, which
the run summary prints. Missing SeriesNumber, and any description (path-like, non-ASCII), are
kept as they are: they select nothing and name nothing on disk.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, timedelta

from pydicom.dataset import Dataset

from .config import DimseSettings, Inclusion, ProjectSpec
from .errors import PacsError
from .model import SeriesRef, StudyRef

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


def parse_da(value) -> date | None:
    """A DICOM DA value (``YYYYMMDD``, PS3.5 6.2) as a date; None when it is not a valid date
    (``***``, empty, ``99999999``, a year alone)."""
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _int(v) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# DIMSE
# ---------------------------------------------------------------------------------------
def _dimse_studies(settings: DimseSettings, key: str, value: str, lo: date, hi: date, *, _depth: int = 0) -> list[Dataset]:
    from . import dimse

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    setattr(ds, key, value)
    ds.StudyDate = f"{_da(lo)}-{_da(hi)}"
    ds.StudyInstanceUID = ""
    ds.StudyDescription = ""
    ds.ModalitiesInStudy = ""
    result = dimse.find(settings, ds)
    if not result.truncated:
        return result.matches
    if lo >= hi:
        raise PacsError(
            f"C-FIND: PACS {settings.ae_title}@{settings.host}:{settings.port} cut its answer short for one "
            f"inclusion on a single day; raise its result limit (Orthanc: LimitFindResults)",
            transient=False,
        )
    mid = lo + (hi - lo) // 2
    log.debug("C-FIND answer cut short: splitting the date window (depth %d)", _depth)
    return _dimse_studies(settings, key, value, lo, mid, _depth=_depth + 1) + _dimse_studies(
        settings, key, value, mid + timedelta(days=1), hi, _depth=_depth + 1
    )


def _dimse_series(settings: DimseSettings, study_uid: str, modalities: list[str]) -> list[Dataset]:
    from . import dimse

    def ask(modality: str) -> dimse.FindResult:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.Modality = modality
        ds.SeriesNumber = ""
        ds.SeriesDescription = ""
        ds.NumberOfSeriesRelatedInstances = ""
        return dimse.find(settings, ds)

    result = ask("")
    if not result.truncated:
        return result.matches
    out: list[Dataset] = []
    for m in modalities:  # a smaller question per modality kept
        r = ask(m)
        if r.truncated:
            raise PacsError(
                f"C-FIND: PACS {settings.ae_title}@{settings.host}:{settings.port} cut the series list of a study "
                f"short; raise its result limit (Orthanc: LimitFindResults)",
            )
        out += r.matches
    return out


# ---------------------------------------------------------------------------------------
# DICOMweb
# ---------------------------------------------------------------------------------------
_STUDY_FIELDS = ["StudyInstanceUID", "StudyDate", "StudyDescription", "ModalitiesInStudy"]
_SERIES_FIELDS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances"]


def _web_studies(web, key: str, value: str, lo: date, hi: date) -> list[Dataset]:
    """QIDO-RS studies in [lo, hi], checked against silent truncation.

    Some servers cut QIDO answers short without saying so (Orthanc's DICOMweb plugin under
    ``LimitFindResults``), and offsets do not help then. When an answer holds studies on
    several dates, the window is split at its median date: if the two halves together hold
    more studies than the whole, the whole was cut short and each half is resolved the same
    way. Costs two extra searches per inclusion with several study dates.
    """
    found = web.search("studies", {key: value, "StudyDate": f"{_da(lo)}-{_da(hi)}"}, _STUDY_FIELDS)
    dates = sorted({d for d in (parse_da(st.get("StudyDate")) for st in found) if d is not None})
    if len(found) < 2 or lo >= hi:
        return found
    if len(dates) >= 2:
        mid = dates[(len(dates) - 1) // 2]
        mid = min(max(mid, lo), hi - timedelta(days=1))
    else:
        mid = lo + (hi - lo) // 2
    left = web.search("studies", {key: value, "StudyDate": f"{_da(lo)}-{_da(mid)}"}, _STUDY_FIELDS)
    right = web.search("studies", {key: value, "StudyDate": f"{_da(mid + timedelta(days=1))}-{_da(hi)}"},
                       _STUDY_FIELDS)
    if len(left) + len(right) <= len(found):
        return found
    log.debug("QIDO-RS answer was cut short: splitting the date window")
    return _web_studies(web, key, value, lo, mid) + _web_studies(web, key, value, mid + timedelta(days=1), hi)


def _studies_outside(spec: ProjectSpec, web, key: str, value: str, lo: date, hi: date) -> list[Dataset]:
    """The studies of one inclusion that a search in [lo, hi] cannot return: those whose
    StudyDate is not a valid date, or a valid one outside the window. One search without a date
    (universal matching, PS3.4 C.2.2.2.3)."""
    if web is not None:
        found = web.search("studies", {key: value}, _STUDY_FIELDS)
    else:
        from . import dimse

        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        setattr(ds, key, value)
        ds.StudyDate = ""
        ds.StudyInstanceUID = ""
        ds.StudyDescription = ""
        ds.ModalitiesInStudy = ""
        result = dimse.find(spec.pacs.dimse, ds)
        if result.truncated:
            log.warning("C-FIND without a date was cut short: studies with an unreadable date may be missed; "
                        "raise the PACS's result limit (Orthanc: LimitFindResults)")
        found = result.matches
    return [st for st in found if (d := parse_da(st.get("StudyDate"))) is None or not lo <= d <= hi]


# ---------------------------------------------------------------------------------------
def find_studies(spec: ProjectSpec) -> QueryResult:
    """Match every inclusion row against the PACS and apply the spec's filters.

    Takes the resolved spec (``spec.inclusions``, ``spec.selection``, ``spec.pacs``).
    Returns a :class:`QueryResult`: one :class:`StudyRef` per matched study (series kept
    after filtering, with announced instance counts), and the rows that matched no study
    with at least one kept series. Raises :class:`PacsError` if the PACS cannot be queried.
    """
    sel = spec.selection
    lo = (sel.study_date.start if sel.study_date and sel.study_date.start else _EARLIEST)
    hi = (sel.study_date.end if sel.study_date and sel.study_date.end else date.today() + timedelta(days=1))
    study_re = re.compile(sel.study_description) if sel.study_description else None
    series_re = re.compile(sel.series_description) if sel.series_description else None
    exclude_re = re.compile(sel.exclude_series_description) if sel.exclude_series_description else None
    modalities = [m.upper() for m in sel.modalities]
    dated = bool(sel.study_date and (sel.study_date.start or sel.study_date.end))

    web = None
    if spec.pacs.chosen == "dicomweb":
        from .dicomweb import WebPacs

        web = WebPacs(spec.pacs.dicomweb)

    result = QueryResult()
    seen: set[str] = set()
    for inc in spec.inclusions:
        key, value = ("PatientID", inc.patient_id) if inc.patient_id else ("AccessionNumber", inc.accession_number)
        if web is not None:
            studies = _web_studies(web, key, value, lo, hi)
        else:
            studies = _dimse_studies(spec.pacs.dimse, key, value, lo, hi)
        studies = list(studies) + _studies_outside(spec, web, key, value, lo, hi)
        kept_any = False
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
            if dated and day is not None and not (lo <= day <= hi):
                continue  # outside the spec's date range (without one, no date excludes a study)
            desc = str(st.get("StudyDescription", "") or "")
            if study_re and not study_re.search(desc):
                continue
            unapplied = None
            if day is None and dated:
                what = "empty" if not sdate.strip() else "not a valid date"
                unapplied = UnappliedFilter(inc.row, inc.subject, "study_date",
                                            f"StudyDate {what}: the study is included, its date range unchecked")
            if web is not None:
                series = web.search("series", {}, _SERIES_FIELDS, study_uid=uid)
            else:
                series = _dimse_series(spec.pacs.dimse, uid, modalities)
            ref = StudyRef(
                inclusion_row=inc.row, subject=inc.subject, session=inc.session, study_instance_uid=uid,
                study_date=sdate, study_description=desc,
            )
            done: set[str] = set()
            for se in series:
                se_uid = str(se.get("SeriesInstanceUID", ""))
                if not se_uid or se_uid in done:
                    continue
                done.add(se_uid)
                modality = str(se.get("Modality", "") or "").upper()
                sdesc = str(se.get("SeriesDescription", "") or "")
                if (
                    (modalities and modality not in modalities)
                    or (series_re and not series_re.search(sdesc))
                    or (exclude_re and exclude_re.search(sdesc))
                ):
                    ref.excluded_series += 1
                    continue
                ref.series.append(
                    SeriesRef(
                        study_instance_uid=uid, series_instance_uid=se_uid, modality=modality,
                        series_number=_int(se.get("SeriesNumber")), series_description=sdesc,
                        announced_instances=_int(se.get("NumberOfSeriesRelatedInstances")),
                    )
                )
            ref.series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_description))
            if not ref.series:
                continue
            if uid in seen:
                log.warning("inclusion row %d: a study already matched by another row is taken again", inc.row)
            seen.add(uid)
            kept_any = True
            result.studies.append(ref)
            if unapplied is not None:
                log.warning("inclusion row %d: a study's date is unreadable, so the date filter was not applied "
                            "to it: included", inc.row)
                result.unapplied.append(unapplied)
        if not kept_any:
            result.unmatched.append(inc)
    log.info(
        "query: %d inclusion rows, %d studies matched, %d rows unmatched",
        len(spec.inclusions), len(result.studies), len(result.unmatched),
    )
    return result
