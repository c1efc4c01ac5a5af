"""The C-FIND identifiers of the query (PS3.4 C.6.2): a study by PatientID or AccessionNumber in a
date range, the series of one study or several; and the DA range they and QIDO-RS share."""

from __future__ import annotations

from datetime import date

from pydicom.dataset import Dataset


def da_range(lo: date | None, hi: date | None) -> str:
    """A DA range matching [lo, hi] (PS3.4 C.2.2.2.5); "" (any date) when either is None."""
    return "" if lo is None or hi is None else f"{lo:%Y%m%d}-{hi:%Y%m%d}"


def _fits_latin1(value: str) -> bool:
    return all(ord(c) < 256 for c in value)


def study_identifier(key: str, value: str, lo: date | None, hi: date | None) -> Dataset:
    """A study-level C-FIND identifier: ``key`` is ``value``, StudyDate in [lo, hi] (any when None).
    A value outside ASCII names its character set (Latin-1 when it fits, which PACS support most
    widely, else UTF-8): without one, the PACS decodes it with its own default (PS3.5 6.1.2.4), and
    ``Zoé`` sent as Latin-1 matches nothing on a PACS whose default is UTF-8."""
    ds = Dataset()
    if not value.isascii():
        ds.SpecificCharacterSet = "ISO_IR 100" if _fits_latin1(value) else "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    setattr(ds, key, value)
    ds.StudyDate = da_range(lo, hi)
    ds.StudyInstanceUID = ""
    ds.StudyDescription = ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedSeries = ds.SOPClassesInStudy = ""  # SOP classes: for the schedule (study.study_cost)
    return ds


def series_identifier(study_uids: list[str], modality: str) -> Dataset:
    """A series-level C-FIND identifier for one study or several (List of UID matching)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uids if len(study_uids) > 1 else study_uids[0]
    ds.SeriesInstanceUID = ""
    ds.Modality = modality
    ds.SeriesNumber = ""
    ds.SeriesDescription = ""
    ds.NumberOfSeriesRelatedInstances = ""
    return ds
