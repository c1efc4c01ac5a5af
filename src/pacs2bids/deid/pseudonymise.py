"""Pseudonymise one series to DICOM PS3.15 Annex E, keyed per project (P1-P14).

One file at a time (memory does not grow with the series): read, decide its SOP class, collect
its identifying values, walk every element at every depth applying the profile
(:mod:`pacs2bids.deid.profile`), clean pixels at risk (:mod:`pacs2bids.deid.pixels`), rebuild
the File Meta Information with a zeroed preamble (PS3.10 7.1), write it under the output folder
named by its new SOP Instance UID.

What each element becomes (PS3.15 E.1.1 action codes):

- Patient's Name and Patient ID: the subject code (P2). Patient's Birth Date: shifted with the
  subject's dates, then cut to 1 January of that year (P4); emptied without a dates option.
- DA and DT: shifted by the subject's whole-day offset (Retain Longitudinal Temporal Information
  with Modified Dates, PS3.15 E.3.6), in nested sequences and kept private elements too; TM is
  unchanged (whole days). Values that are not dates are emptied.
- UI: ``2.25.<HMAC>`` (:mod:`pacs2bids.deid.keyed`), except the UIDs of the standard (SOP
  classes, transfer syntaxes, coding schemes: those in pydicom's UID dictionary).
- Clean Descriptors (``C`` on text): identifying values of the header (and of the project) are
  removed from the text; the rest (sequence names, the science) is kept.
- Private elements: kept by private creator, never by fixed group/element, when listed
  (:meth:`Profile.private_reason`), and then scrubbed like public ones; everything else private
  is removed (PS3.15 E.3.10).
- Set: Patient Identity Removed = YES, De-identification Method (text) and its code sequence
  (CID 7050), Longitudinal Temporal Information Modified = MODIFIED (PS3.15 E.1.1, E.3.6).

Dropped by default (listed with a reason): SR, KO, presentation states, raw data, encapsulated
documents, private SOP classes and DICOMDIRs, unless their SOP class is in
``settings.allow_sop_classes`` (P12, C4).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID, UID_dictionary

from ..config import PseudonymizationSettings
from .. import quarantine
from ..errors import PseudonymisationError
from . import pixels
from .csa import _UID_TOKEN, scrub_bytes, scrub_ge_protocol
from .keyed import Keyed, birth_date_to_year, shift_da, shift_dt
from .keystore import KeyStore
from .patterns import clean_text, compile_identifiers, date_tokens, is_date_value, looks_like_uid, mask_personal_data
from .profile import GE_PROTOCOL, Profile

log = logging.getLogger(__name__)

# Attributes whose values identify the patient, the visit or the site: collected from every
# file (at any depth) for cleaning text, for the key store and for the leak scan.
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MilitaryRank",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "PhysiciansOfRecord",
    "OperatorsName",
    "ScheduledPerformingPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
)
_IDENT_TAGS = {pydicom.datadict.tag_for_keyword(k): k for k in IDENTIFYING_KEYWORDS}
_UID_TEXT = re.compile(_UID_TOKEN.pattern.decode("ascii"))  # a whole UID in a private value (5+ components)
_TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "AE", "CS"}
_CLEANED_TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC"}
_NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "DS", "IS", "UV", "SV", "AT"}
_BINARY_VRS = {"OB", "OW", "UN", "OF", "OD", "OL", "OV"}
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_SET_BY_US = {0x00100010, 0x00100020, 0x00120062, 0x00120063, 0x00120064, 0x00280303, 0x00280301}
_CHARSET_TAG = 0x00080005
# Character sets whose encoded text can be searched as bytes with the identifiers' UTF-8 and
# Latin-1 spellings (compile_identifiers) and give the same hits as the decoded text.
_BYTE_SEARCHABLE_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"}
# What the pacs2bids default (not in Table E.1-1) reads or changes; every other VR is kept as is.
_DEFAULT_ACTED_VRS = {"SQ", "PN", "UI", "DA", "DT", "UN"} | _CLEANED_TEXT_VRS
# What a kept private element or action C reads or changes (TM is kept: dates shift by whole days).
_CLEAN_ACTED_VRS = {"SQ", "DA", "DT", "UI", "PN"} | _TEXT_VRS | _BINARY_VRS
# A kept binary private value scrubbed once per series: the Siemens CSA series header (the
# Phoenix protocol) is the same in every instance of a series.
_SCRUB_CACHE_SIZE = 8

_DROP = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report or key object selection (P12)"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data (C4)"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document (P12)"),
    ("1.2.840.10008.1.3.10", "media storage directory (DICOMDIR)"),
)


@lru_cache(maxsize=1)
def _version() -> str:
    try:
        return metadata.version("pacs2bids")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "0+unknown"


def _mask(value: Any) -> str:
    """Show a value's shape, never its content (dry-run output)."""
    text = str(value)
    if not text:
        return ""
    return f"{text[0]}***({len(text)})"


@dataclass
class SeriesDeidResult:
    """What :meth:`Pseudonymiser.pseudonymise_series` did to one series. Holds no original
    values: it is safe to log, to return from a task and to archive (P8)."""

    pseudo_study_uid: str = ""
    pseudo_series_uid: str = ""
    series_number: int | None = None
    series_description: str = ""
    modality: str = ""
    written: list[Path] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # per written file: the name of the file it was made from
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["written"] = [str(p) for p in self.written]
        d["quarantined"] = [list(t) for t in self.quarantined]
        d["dropped"] = [list(t) for t in self.dropped]
        return d


class _FileContext:
    """Per-file state of the walk: the subject's offset, the cleaning pattern, the notes."""

    def __init__(
        self,
        owner: "Pseudonymiser",
        subject: str,
        pattern,
        notes: Counter,
        changes: list | None,
        scrubbed: dict | None = None,
        dates: re.Pattern[bytes] | None = None,
    ):
        self.owner = owner
        self.keyed = owner.keyed
        self.profile = owner.profile
        self.subject = subject
        self.days = owner.keyed.day_offset(subject)
        self.pattern = pattern
        self.notes = notes
        self.changes = changes
        self.dates_shifted = False
        self.scrubbed = {} if scrubbed is None else scrubbed  # (value, pattern) -> scrub_bytes result
        self.bytes_searchable = True  # the current dataset's character set (see _walk)
        self.dates = dates  # the file's own dates, as written in text (patterns.date_tokens)

    def holds_no_identifier(self, elem: DataElement | RawDataElement) -> bool:
        """True when ``elem`` is still raw (undecoded) text in which the cleaning pattern finds
        nothing: then cleaning would change nothing and the value need not be decoded."""
        if not elem.is_raw or not self.bytes_searchable:
            return False
        value = elem.value or b""
        # a date, a UID, a phone number or a NIR has at least 5 digits, an e-mail address an "@"
        if b"@" in value or len(value) - len(value.translate(None, b"0123456789")) >= 5:
            return False
        return self.pattern is None or self.pattern.search(value) is None

    def scrub(self, value: bytes) -> tuple[bytes, int]:
        """:func:`scrub_bytes` with this file's pattern, remembered for the series."""
        key = (value, self.pattern, self.dates, self.days)
        done = self.scrubbed.get(key)
        if done is None:
            if len(self.scrubbed) >= _SCRUB_CACHE_SIZE:
                self.scrubbed.clear()
            done = self.scrubbed[key] = scrub_bytes(value, self.keyed.uid_like, self.pattern, self.dates_shift, self.days)
        return done

    @property
    def dates_shift(self) -> re.Pattern[bytes] | None:
        """The file's dates to shift inside text and binary values (None when dates are kept as
        they are, rtnLongFullDatesOpt). Without a dates option the date elements are emptied, and
        their dates found inside text are shifted all the same: the original never stays."""
        return None if self.profile.keep_dates else self.dates

    def note(self, name: str, action: str, why: str, before: Any = None, after: Any = None) -> None:
        self.notes[(name, action, why)] += 1
        if self.changes is not None and action != "kept":
            self.changes.append(
                {"attribute": name, "action": action, "why": why, "before": _mask(before), "after": _mask(after) if action in ("cleaned",) else str(after) if after is not None else ""}
            )


@lru_cache(maxsize=8192)
def _name(tag: int, creator: str | None = None) -> str:
    """How an element is named in records: its keyword, or its tag (private: with its creator)."""
    if creator is not None:
        return f'({tag >> 16:04X},"{creator}",{tag & 0xFF:02X})'
    if dictionary_has_tag(tag):
        return dictionary_keyword(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _decoded(ds: Dataset, elem: DataElement | RawDataElement) -> DataElement:
    """The decoded element (pydicom decodes a raw element on first access and keeps it)."""
    return ds[elem.tag] if elem.is_raw else elem


def _element(ds: Dataset, tag) -> DataElement | RawDataElement:
    """The element at ``tag``, left raw when its VR is known without decoding it (explicit VR
    other than UN, which pydicom may replace by the dictionary's VR on decoding)."""
    elem = ds.get_item(tag)
    if elem.is_raw and elem.VR in (None, "UN"):
        return ds[tag]
    return elem


def _is_standard_uid(value: str) -> bool:
    """UIDs of the standard itself (SOP classes, transfer syntaxes, context groups, coding
    schemes): in pydicom's dictionary or under the DICOM root 1.2.840.10008 (PS3.5 9.1)."""
    return value in UID_dictionary or value.startswith("1.2.840.10008.")


class Pseudonymiser:
    """Pseudonymise series of one project, with the project's secret and settings.

    ``key_store`` is the folder of the encrypted matching key (never under the dataset).
    Raises :class:`~pacs2bids.errors.SpecError` for unknown options or malformed
    ``keep_private`` entries, :class:`ValueError` for a secret shorter than 16 bytes.
    """

    def __init__(self, project: str, secret: bytes, settings: PseudonymizationSettings, key_store: Path):
        self.project = project
        self.settings = settings
        self.profile = Profile(settings.options, settings.keep_private, settings.keep_text)
        self.keyed = Keyed(secret, project)
        self.key_store = KeyStore(Path(key_store), project=project, secret=secret)
        # The identifying values recorded so far that are not UIDs, searched for in every file's
        # text (UIDs are replaced by element, never searched for in text); they grow with the
        # patients, not with the instances. The UIDs are read only for the leak scan.
        self._values: frozenset[str] = self.key_store.values()
        self._learned: set[str] = set()  # what this instance recorded: not appended twice
        # Every date seen per subject by this instance: a later file may quote an earlier visit's
        # date in its text (a prior exam in a protocol or a comment), shifted like its own.
        self._subject_dates: dict[str, set[str]] = {}
        self.allow_sop = set(settings.allow_sop_classes)

    # -- public API ----------------------------------------------------------------------
    def identifiers(self) -> set[str]:
        """Identifying values seen so far in this project: the key store, where every series
        this instance processed is recorded before it returns."""
        return self.key_store.identifiers()

    def drop_reason(self, ds: Dataset) -> str | None:
        """Why an instance is dropped by default (None: it is kept)."""
        sop = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", Dataset()), "MediaStorageSOPClassUID", ""))
        if sop in self.allow_sop:
            return None
        if not sop:
            return "no SOP Class UID (not a composite instance)"
        for prefix, reason in _DROP:
            if sop.startswith(prefix):
                return reason
        if not sop.startswith("1.2.840.10008."):
            return "private SOP class"
        return None

    def pseudonymise_series(
        self,
        files: Iterable[Path],
        out_dir: Path,
        *,
        subject: str,
        session: str | None,
        quarantine_dir: Path,
        pixels_reviewed: bool = False,
    ) -> SeriesDeidResult:
        """Pseudonymise the files of one series into ``out_dir``.

        Files are read and written one at a time. Unreadable files and files whose pixels
        cannot be cleaned with confidence are copied to ``quarantine_dir`` under a keyed name
        with a ``.reason.txt``; dropped SOP classes are listed. The key store is updated once,
        at the end. ``pixels_reviewed``: a person released these files from quarantine
        (:mod:`pacs2bids.quarantine`), so their pixels are kept as reviewed, without OCR.
        Returns a :class:`SeriesDeidResult`; raises
        :class:`~pacs2bids.errors.PseudonymisationError` when ``out_dir`` cannot be written.
        """
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PseudonymisationError(f"cannot create output folder {out_dir}: {exc.strerror}") from None
        result = SeriesDeidResult()
        notes: Counter = Counter()
        pixel_log: list[dict] = []
        seen: dict[str, int] = {}
        originals: dict[str, set[str]] = {"patient_ids": set(), "patient_names": set(), "studies": set()}
        study_map: dict[str, dict] = {}
        new_identifiers: set[str] = set()
        pattern_cache: dict[frozenset, Any] = {}
        date_cache: dict[frozenset, Any] = {}
        scrubbed: dict = {}
        count = 0
        first: tuple | None = None  # original study and series UIDs, series number of the first readable file

        def hold(path: Path, qname: str, reason: str, result: SeriesDeidResult) -> None:
            self._quarantine(path, quarantine_dir, qname, reason, result,
                             subject=subject, session=session, series_folder=out_dir.name)

        for path in files:
            count += 1
            path = Path(path)
            qname = self.keyed.token(f"{subject}/{session}/{path.name}/{count}")
            try:
                ds = pydicom.dcmread(path, force=False)
                _ = ds.get("SOPClassUID")
            except Exception as exc:  # pydicom raises many kinds on truncated or corrupt files
                hold(path, qname, f"unreadable DICOM ({type(exc).__name__})", result)
                continue
            if first is None:
                first = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")), ds.get("SeriesNumber"))
            reason = self.drop_reason(ds)
            if reason:
                result.dropped.append((qname, reason))
                continue
            file_dates: set[str] = set()
            file_ids = self._collect(ds, file_dates)
            new_identifiers |= file_ids
            seen_dates = self._subject_dates.setdefault(subject, set())
            seen_dates |= file_dates
            dkey = frozenset(seen_dates)
            if dkey not in date_cache:
                date_cache[dkey] = date_tokens(dkey)
            key = frozenset(v for v in file_ids if not looks_like_uid(v)) - self._values
            pattern = pattern_cache.get(key)
            if pattern is None:
                pattern = pattern_cache[key] = compile_identifiers(key | self._values)
            try:
                ctx = _FileContext(self, subject, pattern, notes, None, scrubbed, dates=date_cache[dkey])
                originals["patient_ids"].add(str(ds.get("PatientID", "")))
                originals["patient_names"].add(str(ds.get("PatientName", "")))
                study_uid = str(ds.get("StudyInstanceUID", ""))
                if study_uid and study_uid not in study_map:
                    study_map[study_uid] = {
                        "accession_number": str(ds.get("AccessionNumber", "")),
                        "study_date": str(ds.get("StudyDate", "")),
                        "pseudo_study_uid": self.keyed.uid(study_uid),
                        "session": session,
                    }
                if pixels_reviewed:
                    outcome = pixels.PixelOutcome(at_risk=True, reason="released from quarantine by a reviewer",
                                                  notes=["pixels kept as reviewed, not OCRed again"])
                else:
                    outcome = pixels.clean_if_at_risk(ds, enabled=self.profile.has("cleanPixelDataOpt"))
                if outcome.quarantine:
                    hold(path, qname, outcome.quarantine, result)
                    continue
                if outcome.at_risk:
                    pixel_log.append(outcome.summary())
                if self.profile.has("cleanGraphOpt"):  # without it, the Basic profile removes overlays
                    overlays = pixels.clean_overlays(ds)
                    if overlays.planes:
                        pixel_log.append(overlays.summary())
                self._apply(ds, ctx, pixels_cleaned=outcome.cleaned)
            except pixels.PixelError as exc:
                hold(path, qname, str(exc), result)
                continue
            except Exception as exc:  # any failure of the walk: never publish a half-done file
                log.warning("file %d of the series could not be pseudonymised: %s", count, type(exc).__name__)
                hold(path, qname, f"pseudonymisation failed ({type(exc).__name__})", result)
                continue
            sop = str(ds.get("SOPInstanceUID", "")) or self.keyed.uid(qname)
            n = seen.get(sop, 0)
            seen[sop] = n + 1
            target = out_dir / (f"{sop}.dcm" if n == 0 else f"{sop}-{n}.dcm")
            ds.save_as(target, enforce_file_format=True)
            result.written.append(target)
            result.sources.append(path.name)
            if not result.pseudo_series_uid:
                result.pseudo_study_uid = str(ds.get("StudyInstanceUID", ""))
                result.pseudo_series_uid = str(ds.get("SeriesInstanceUID", ""))
                sn = ds.get("SeriesNumber")
                result.series_number = int(sn) if sn not in (None, "") else None
                result.series_description = str(ds.get("SeriesDescription", ""))
                result.modality = str(ds.get("Modality", ""))
            del ds
        if not result.pseudo_series_uid and first is not None:
            # nothing written (all dropped or quarantined): the series still has its pseudonyms,
            # so that lineage and re-runs can name it
            result.pseudo_study_uid, result.pseudo_series_uid = self.keyed.uid(first[0]), self.keyed.uid(first[1])
            result.series_number = int(first[2]) if first[2] not in (None, "") else None
        self.key_store.record_series(
            subject,
            patient_ids=sorted(v for v in originals["patient_ids"] if v),
            patient_names=sorted(v for v in originals["patient_names"] if v),
            studies=study_map,
            identifiers=new_identifiers - self._values - self._learned,  # the store has those already
        )
        self._learned |= new_identifiers
        self._values |= {v for v in new_identifiers if not looks_like_uid(v)}
        result.record = self._record(notes, pixel_log, result, count)
        return result

    def dry_run(self, files_sample: Iterable[Path], *, subject: str = "dryrun") -> list[dict]:
        """What pseudonymisation would change, per file and attribute, writing nothing.

        Original values are masked (first character and length); replaced values are shown.
        Returns a list of ``{"file": n, "attribute", "action", "why", "before", "after"}``.
        """
        out: list[dict] = []
        for n, path in enumerate(files_sample, start=1):
            try:
                ds = pydicom.dcmread(Path(path))
            except Exception as exc:
                out.append({"file": n, "attribute": "*", "action": "quarantined", "why": type(exc).__name__, "before": "", "after": ""})
                continue
            reason = self.drop_reason(ds)
            if reason:
                out.append({"file": n, "attribute": "*", "action": "dropped", "why": reason, "before": "", "after": ""})
                continue
            file_dates: set[str] = set()
            ids = {v for v in self._collect(ds, file_dates) if not looks_like_uid(v)} | self._values
            changes: list[dict] = []
            ctx = _FileContext(self, subject, compile_identifiers(frozenset(ids)), Counter(), changes,
                               dates=date_tokens(file_dates))
            risk = pixels.risk_reason(ds)
            if risk:
                changes.append({"attribute": "PixelData", "action": "ocr-and-mask", "why": risk, "before": "", "after": ""})
            self._apply(ds, ctx, pixels_cleaned=False)
            for c in changes:
                c["file"] = n
            out.extend(changes)
        return out

    # -- internals -----------------------------------------------------------------------
    def _quarantine(self, path: Path, qdir: Path, qname: str, reason: str, result: SeriesDeidResult, *,
                    subject: str, session: str | None, series_folder: str) -> None:
        item = quarantine.hold(qdir, qname, path, reason, subject=subject, session=session, series_folder=series_folder)
        result.quarantined.append((item.id, reason))

    def _collect(self, ds: Dataset, dates: set[str] | None = None) -> set[str]:
        """Identifying values of one file, at any depth (names, IDs, original UIDs...). When
        ``dates`` is given, the file's dates (``YYYYMMDD`` of every DA and DT value, public or
        private, at any depth) are added to it: they are shifted wherever text repeats them."""
        found: set[str] = set()

        def visit(d: Dataset) -> None:
            for tag in d.keys():
                elem = _element(d, tag)  # decoded only when its value is read
                vr = elem.VR
                if vr == "SQ":
                    for item in d[tag].value or ():
                        visit(item)
                    continue
                private = tag.is_private
                if dates is not None and vr in ("DA", "DT"):
                    value = d[tag].value
                    for v in value if isinstance(value, MultiValue) else [value]:
                        v = str(v or "").strip()
                        if len(v) >= 8 and v[:8].isdigit():
                            dates.add(v[:8])
                identifying = tag in _IDENT_TAGS or vr == "PN"
                if not identifying and (vr != "UI" or private):
                    continue
                resolved = self.profile.action(tag) if not private else None
                if resolved is not None and resolved[0] == "K":
                    continue  # retained on purpose by an option: neither cleaned nor a leak
                value = d[tag].value
                if value in (None, "", b""):
                    continue
                values = value if isinstance(value, MultiValue) else [value]
                if identifying:
                    found.update(str(v).strip() for v in values if str(v).strip())
                else:
                    found.update(str(v).strip() for v in values if v and not _is_standard_uid(str(v).strip()))

        visit(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            found.add(str(meta.MediaStorageSOPInstanceUID))
        # A January 1st date carries its year only (exports and this profile truncate birth dates
        # so): searched for, it would hit every other subject's truncated date.
        return {v for v in found if v and not re.fullmatch(r"\d{4}0101", v)}

    def _apply(self, ds: Dataset, ctx: _FileContext, *, pixels_cleaned: bool) -> None:
        self._walk(ds, ctx, depth=0)
        subject = ctx.subject
        ds.PatientName = subject
        ds.PatientID = subject
        ctx.note("PatientName", "replaced", "subject code (P2)")
        ctx.note("PatientID", "replaced", "subject code (P2)")
        ds.PatientIdentityRemoved = "YES"
        # one LO value within 64 characters (dcm2niix copies only that much into the sidecar);
        # the options applied are the CID 7050 codes of the sequence below
        ds.DeidentificationMethod = (
            f"pacs2bids {_version()}, PS3.15 Annex E ({self.profile.describe()['edition']}) Basic Profile"
        )[:64]
        seq = Sequence()
        for value, meaning in self.profile.method_codes(pixels_cleaned):
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            seq.append(item)
        ds.DeidentificationMethodCodeSequence = seq
        if self.profile.shift_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        elif self.profile.keep_dates:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"
        if pixels_cleaned:
            ds.BurnedInAnnotation = "NO"
        self._file_meta(ds)

    def _file_meta(self, ds: Dataset) -> None:
        old = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", old.get("MediaStorageSOPClassUID"))
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or self.keyed.uid(
            str(old.get("MediaStorageSOPInstanceUID", ""))
        )
        meta.TransferSyntaxUID = old.get("TransferSyntaxUID", ExplicitVRLittleEndian)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"PACS2BIDS_{_version()}"[:16]
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128

    # the walk ---------------------------------------------------------------------------
    def _walk(self, ds: Dataset, ctx: _FileContext, depth: int) -> None:
        """Apply the profile to every element of ``ds`` (and of its sequences). Elements are
        decoded only when their value is read or changed: what is kept as it is stays in its
        raw form and is written back byte for byte."""
        tags = sorted(ds.keys())
        kept_blocks: set[tuple[int, int]] = set()
        creators: dict[tuple[int, int], str] = {}
        for t in tags:
            if t.is_private and 0x0010 <= t.element <= 0x00FF:
                value = ds[t].value
                creators[(t.group, t.element)] = value if isinstance(value, str) else ""
        outer_searchable = ctx.bytes_searchable
        if _CHARSET_TAG in ds:  # an item's own character set holds for the items below it
            charset = ds[_CHARSET_TAG].value
            ctx.bytes_searchable = isinstance(charset, str) and charset.strip() in _BYTE_SEARCHABLE_CHARSETS
        try:
            for t in tags:
                self._walk_element(ds, t, ctx, depth, creators, kept_blocks)
        finally:
            ctx.bytes_searchable = outer_searchable
        for (group, blk), _creator in creators.items():
            if (group, blk) not in kept_blocks:
                tag = (group << 16) | blk
                if tag in ds:
                    del ds[tag]

    def _walk_element(self, ds: Dataset, t, ctx: _FileContext, depth: int, creators: dict, kept_blocks: set) -> None:
        tag = int(t)  # plain int comparisons: pydicom's BaseTag compares in Python
        group, element = tag >> 16, tag & 0xFFFF
        if element == 0x0000:  # group lengths: recomputed or obsolete
            del ds[t]
            return
        if group & 1:  # private
            if 0x0010 <= element <= 0x00FF:
                return  # private creators: decided after their blocks
            block = (group, element >> 8)
            creator = creators.get(block)
            if not creator:
                del ds[t]
                ctx.note(f"({group:04X},{element:04X})", "removed", "private element without private creator")
                return
            why = ctx.profile.private_reason(group, creator, element & 0xFF)
            if why is None:
                del ds[t]
                # named by its block, never by its creator's text (raw header text: P8)
                ctx.note(f"({group:04X},{element >> 8:02X}xx)", "removed", "private, not on a keep list (PS3.15 E.3.10)")
                return
            kept_blocks.add(block)
            name = _name(tag, creator.strip().upper())  # as on the keep list that matched it
            if (group, creator.strip().upper(), element & 0xFF) == GE_PROTOCOL:
                self._ge_protocol(ds, ds[t], ctx, name, why)
                return
            self._clean_value(ds, _element(ds, t), ctx, depth, name, why, private=True)
            return
        if group == 0x0002:
            return
        if depth == 0 and tag in _SET_BY_US:
            if tag == 0x00100010 or tag == 0x00100020:
                return
            del ds[t]
            return
        if tag == 0x00100030:  # Patient's Birth Date (P4)
            self._birth_date(ds, ds[t], ctx)
            return
        if tag == 0x00880200:  # Icon Image Sequence: a thumbnail of pixels nobody cleaned (P9)
            del ds[t]
            ctx.note("IconImageSequence", "removed", "thumbnail of the pixel data (P9)")
            return
        elem = _element(ds, t)
        resolved = ctx.profile.action(tag)
        if resolved is None:
            self._default(ds, elem, ctx, depth)
            return
        code, source = resolved
        code = ctx.profile.strictest(code, elem.VR == "SQ")
        self._act(ds, elem, ctx, depth, code, f"{source} {code}")

    def _birth_date(self, ds: Dataset, elem: DataElement, ctx: _FileContext) -> None:
        value = str(elem.value or "")
        if ctx.profile.shift_dates and value:
            new = birth_date_to_year(value, ctx.days)
            elem.value = new or ""
            ctx.note("PatientBirthDate", "shifted-to-year", "P4: shifted, then 1 January", value, new)
        else:
            elem.value = ""
            ctx.note("PatientBirthDate", "emptied", "basicProfile Z", value, "")

    def _act(self, ds: Dataset, elem: DataElement | RawDataElement, ctx: _FileContext, depth: int, code: str, why: str) -> None:
        name = _name(elem.tag)
        vr = elem.VR
        if code == "K" and vr != "SQ":
            ctx.note(name, "kept", why)
            return
        if code == "X" and ctx.changes is None:  # removed: nobody reads the value
            del ds[elem.tag]
            ctx.note(name, "removed", why)
            return
        if code == "C":
            self._clean_value(ds, elem, ctx, depth, name, why, private=False)
            return
        elem = _decoded(ds, elem)
        if code == "X":
            del ds[elem.tag]
            ctx.note(name, "removed", why, elem.value if vr != "SQ" else "")
        elif code == "Z":
            before = elem.value if vr != "SQ" else ""
            elem.value = Sequence() if vr == "SQ" else ("" if vr not in _NUMERIC_VRS else None)
            ctx.note(name, "emptied", why, before, "")
        elif code == "K":
            if vr == "SQ":
                self._recurse(elem, ctx, depth)
            ctx.note(name, "kept", why)
        elif code == "D":
            if vr == "SQ":
                self._recurse(elem, ctx, depth)
                ctx.note(name, "walked", why)
            elif vr in ("DA", "DT"):
                self._dates(elem, ctx, name, why, fallback="19000101" if vr == "DA" else "19000101000000")
            elif vr == "UI":
                self._uids(elem, ctx, name, why)
            elif vr == "TM":
                ctx.note(name, "kept", why + " (time of day kept: dates shift by whole days)")
            else:
                before = elem.value
                elem.value = _dummy(vr)
                ctx.note(name, "replaced", why, before, elem.value)
        elif code == "U":
            if vr == "SQ":
                self._recurse(elem, ctx, depth)
                ctx.note(name, "walked", why)
            elif vr == "UI":
                self._uids(elem, ctx, name, why)
            else:
                del ds[elem.tag]
                ctx.note(name, "removed", why + " (not a UI value)")
        else:  # unknown code: strictest
            del ds[elem.tag]
            ctx.note(name, "removed", f"{why} (unknown action, strictest)")

    def _default(self, ds: Dataset, elem: DataElement | RawDataElement, ctx: _FileContext, depth: int) -> None:
        """Public attributes absent from Table E.1-1 (see :mod:`pacs2bids.deid.profile`)."""
        name = _name(elem.tag)
        vr = elem.VR
        why = "not in Table E.1-1: pacs2bids default"
        if elem.tag.group != 0x0010:
            if vr not in _DEFAULT_ACTED_VRS:
                ctx.note(name, "kept", why)
                return
            if vr in _CLEANED_TEXT_VRS and ctx.holds_no_identifier(elem):
                ctx.note(name, "kept", why + " (checked)")
                return
        elem = _decoded(ds, elem)
        if vr == "SQ":
            self._recurse(elem, ctx, depth)
        elif vr == "PN":
            before = elem.value
            elem.value = ""
            ctx.note(name, "emptied", why + " (person name)", before, "")
        elif vr == "UI":
            self._uids(elem, ctx, name, why)
        elif vr in ("DA", "DT"):
            if ctx.profile.keep_dates:
                ctx.note(name, "kept", why)
            elif ctx.profile.shift_dates:
                self._dates(elem, ctx, name, why, fallback="")
            else:
                before = elem.value
                elem.value = ""
                ctx.note(name, "emptied", why + " (date)", before, "")
        elif elem.tag.group == 0x0010:
            del ds[elem.tag]
            ctx.note(name, "removed", why + " (Patient group)")
        elif vr in _CLEANED_TEXT_VRS:
            self._text(elem, ctx, name, why)
        elif vr == "UN":
            self._binary(elem, ctx, name, why)
        else:
            ctx.note(name, "kept", why)

    def _clean_value(
        self, ds: Dataset, elem: DataElement | RawDataElement, ctx: _FileContext, depth: int, name: str, why: str, *, private: bool
    ) -> None:
        """Action C on a public element, or any kept private element."""
        vr = elem.VR
        if vr == "TM":
            ctx.note(name, "kept", why + " (time of day kept: dates shift by whole days)")
            return
        if vr not in _CLEAN_ACTED_VRS or (vr in _BINARY_VRS and elem.tag in _PIXEL_TAGS):
            ctx.note(name, "kept", why)
            return
        if vr in _TEXT_VRS and ctx.holds_no_identifier(elem):
            ctx.note(name, "kept", why + " (checked)")
            return
        elem = _decoded(ds, elem)
        if vr == "SQ":
            self._recurse(elem, ctx, depth)
            ctx.note(name, "walked", why)
        elif vr in ("DA", "DT"):
            if ctx.profile.keep_dates:
                ctx.note(name, "kept", why)
            else:
                self._dates(elem, ctx, name, why, fallback="")
        elif vr == "UI":
            self._uids(elem, ctx, name, why)
        elif vr == "PN":
            before = elem.value
            elem.value = ""
            ctx.note(name, "emptied", why + " (person name)", before, "")
        elif private and vr in (_TEXT_VRS | _BINARY_VRS) and self._private_date(ds, elem, ctx, name, why):
            return
        elif vr in _TEXT_VRS:
            self._text(elem, ctx, name, why, private=private)
        elif vr in _BINARY_VRS and elem.tag not in _PIXEL_TAGS:
            self._binary(elem, ctx, name, why)
        else:
            ctx.note(name, "kept", why)

    def _private_date(self, ds: Dataset, elem: DataElement, ctx: _FileContext, name: str, why: str) -> bool:
        """A kept private element whose whole value is a date or date-time, whatever its VR
        (the Siemens CSA header "versions" (0029,1009)/(0029,1019) hold the acquisition date on
        some exports): shifted like a public date when a converter or the spec needs the
        element, removed otherwise (PS3.15 E.3.10 keeps safe private values, and a date kept
        verbatim gives the subject's date offset away). A binary (UN) value holding a whole UID
        gets its keyed UID, as a public one would. Returns False for other values."""
        raw = elem.value
        if isinstance(raw, (bytes, bytearray)):
            try:
                raw = bytes(raw).decode("ascii").strip(" \x00")
            except UnicodeDecodeError:
                return False
            if _UID_TEXT.fullmatch(raw) and not _is_standard_uid(raw):  # a UID kept as UN: keyed as a public one
                new_uid = ctx.keyed.uid(raw).encode("ascii")
                before, elem.value = elem.value, new_uid + (b"\x00" if len(new_uid) % 2 else b"")
                ctx.note(name, "new-uid", why + " (private value holding a UID)", before, elem.value)
                return True
            values = raw.split("\\")
        else:
            values = [str(v) for v in (raw if isinstance(raw, MultiValue) else [raw])]
        values = [v.strip(" \x00") for v in values]
        if not any(values) or not all(is_date_value(v) for v in values if v):
            return False
        if ctx.profile.keep_dates:
            ctx.note(name, "kept", why + " (date, rtnLongFullDatesOpt)")
            return True
        if not why.startswith(("needed by", "settings.keep_private")) or not ctx.profile.shift_dates:
            del ds[elem.tag]
            ctx.note(name, "removed", why + " (holds a date, not needed: PS3.15 E.3.10)", elem.value)
            return True
        new = [(shift_da(v, ctx.days) if len(v) == 8 else shift_dt(v, ctx.days)) or "" if v else "" for v in values]
        before = elem.value
        if isinstance(before, (bytes, bytearray)):
            out = "\\".join(new).encode("ascii")
            elem.value = out + (b" " if len(out) % 2 else b"")
        else:
            elem.value = new if len(new) > 1 else new[0]
        ctx.dates_shifted = True
        ctx.note(name, "shifted", why + " (private value holding a date)", before, elem.value)
        return True

    def _recurse(self, elem: DataElement, ctx: _FileContext, depth: int) -> None:
        for item in elem.value or ():
            self._walk(item, ctx, depth + 1)

    def _dates(self, elem: DataElement, ctx: _FileContext, name: str, why: str, fallback: str) -> None:
        if not ctx.profile.shift_dates:
            before = elem.value
            elem.value = fallback
            ctx.note(name, "replaced" if fallback else "emptied", why, before, fallback)
            return
        fn = shift_da if elem.VR == "DA" else shift_dt
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        new, bad = [], 0
        for v in values:
            v = str(v or "").strip()
            if not v:
                new.append("")
                continue
            s = fn(v, ctx.days)
            if s is None:
                bad += 1
                s = ""
            new.append(s)
        before = elem.value
        elem.value = new if len(new) > 1 else (new[0] if new else "")
        ctx.dates_shifted = True
        ctx.note(name, "shifted", why + (" (unparsable values emptied)" if bad else ""), before, elem.value)

    def _uids(self, elem: DataElement, ctx: _FileContext, name: str, why: str) -> None:
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        new = []
        changed = False
        for v in values:
            v = str(v or "").strip("\x00 ")
            if not v or _is_standard_uid(v) or (elem.keyword or "").endswith(("SOPClassUID", "TransferSyntaxUID")):
                new.append(v)
            else:
                new.append(ctx.keyed.uid(v))
                changed = True
        if changed:
            before = elem.value
            elem.value = [UID(x) for x in new] if len(new) > 1 else UID(new[0])
            ctx.note(name, "new-uid", why, before, elem.value)
        else:
            ctx.note(name, "kept", why + " (UID of the standard)")

    def _text(self, elem: DataElement, ctx: _FileContext, name: str, why: str, *, private: bool = False) -> None:
        """Clean one kept text value: the header's identifying values removed
        (:func:`clean_text`), the file's own dates shifted in place, phone numbers, e-mail
        addresses and NIRs masked (:func:`mask_personal_data`); in a private value, a whole
        UID gets its keyed UID (as a public one would) and a UID inside text a keyed token of
        the same length."""
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        total = 0
        new = []
        for v in values:
            if not isinstance(v, str):
                new.append(v)
                continue
            c, n = clean_text(v, ctx.pattern)
            if private and _UID_TEXT.fullmatch(c.strip("\x00 ")) and not _is_standard_uid(c.strip("\x00 ")):
                c, n = ctx.keyed.uid(c.strip("\x00 ")), n + 1
            elif private or ctx.dates_shift is not None:
                raw = c.encode("utf-8", "surrogateescape")
                raw2, k = scrub_bytes(raw, ctx.keyed.uid_like if private else _same, None, ctx.dates_shift, ctx.days)
                if raw2 != raw:
                    c, n = raw2.decode("utf-8", "surrogateescape"), n + k
            c, k = mask_personal_data(c)
            total += n + k
            new.append(c)
        if total:
            before = elem.value
            elem.value = new if len(new) > 1 else new[0]
            ctx.note(name, "cleaned", why + " (identifying values, dates or contact data removed)", before, elem.value)
        else:
            ctx.note(name, "kept", why + " (checked)")

    def _ge_protocol(self, ds: Dataset, elem: DataElement, ctx: _FileContext, name: str, why: str) -> None:
        try:
            elem.value, _n = scrub_ge_protocol(bytes(elem.value or b""), ctx.keyed.uid_like, ctx.pattern, ctx.dates_shift, ctx.days)
            ctx.note(name, "scrubbed", why)
        except (ValueError, OSError, EOFError):
            del ds[elem.tag]
            ctx.note(name, "removed", why + " (not a readable protocol block)")

    def _binary(self, elem: DataElement, ctx: _FileContext, name: str, why: str) -> None:
        value = elem.value
        if not isinstance(value, (bytes, bytearray)):
            ctx.note(name, "kept", why)
            return
        new, n = ctx.scrub(bytes(value))
        if n:
            elem.value = new
            ctx.note(name, "scrubbed", why + " (UIDs and identifying strings overwritten, same length)")
        else:
            ctx.note(name, "kept", why + " (checked)")

    def _record(self, notes: Counter, pixel_log: list[dict], result: SeriesDeidResult, count: int) -> dict:
        attributes: dict[str, list[dict]] = {}
        for (name, action, why), n in sorted(notes.items()):
            attributes.setdefault(name, []).append({"action": action, "why": why, "files": n})
        return {
            "tool": f"pacs2bids {_version()}",
            "pydicom": pydicom.__version__,
            "profile": self.profile.describe(),
            "pseudonyms": {
                "PatientName/PatientID": "the study's subject code",
                "UIDs": "2.25. + decimal HMAC-SHA256 of the original UID under a per-project key (HKDF), cut to 64 characters",
                "dates": "shifted back by a whole number of days (1 to 3650) from HMAC-SHA256 of the subject code; times kept",
                "PatientBirthDate": "shifted with the subject's dates, then cut to 1 January",
            },
            "files_in": count,
            "files_written": len(result.written),
            "quarantined": len(result.quarantined),
            "dropped": [reason for _, reason in result.dropped],
            "attributes": attributes,
            "pixels": pixel_log,
        }


def _same(token: str, _length: int) -> str:
    """UID tokens in public text are left to the leak scan (public UIDs are replaced by element)."""
    return token


def _dummy(vr: str) -> Any:
    if vr in _NUMERIC_VRS:
        return "0" if vr in ("DS", "IS") else 0
    if vr == "TM":
        return "000000"
    if vr == "AS":
        return "000Y"
    if vr == "CS":
        return "ANONYMIZED"
    if vr in ("OB", "OW", "UN"):
        return b""
    return "ANONYMIZED"
