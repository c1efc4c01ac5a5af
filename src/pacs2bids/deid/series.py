"""Pseudonymise one series to DICOM PS3.15 Annex E, keyed per project (P1-P14).

One file at a time (memory does not grow with the series): read, decide its SOP class, collect
its identifying values (:mod:`pacs2bids.deid.identifiers`), clean pixels at risk
(:mod:`pacs2bids.deid.pixels`), walk every element at every depth applying the profile
(:mod:`pacs2bids.deid.walk`), rebuild the File Meta Information with a zeroed preamble
(PS3.10 7.1), write it under the output folder named by its new SOP Instance UID. What was done
is recorded in a :class:`~pacs2bids.deid.record.SeriesDeidResult`.

Dropped by default (listed with a reason): SR, KO, presentation states, raw data, encapsulated
documents, private SOP classes and DICOMDIRs, unless their SOP class is in
``settings.allow_sop_classes`` (P12, C4).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pydicom
from pydicom.dataset import Dataset

from ..config import PseudonymizationSettings
from .. import quarantine
from ..errors import PseudonymisationError
from . import pixels
from .context import FileContext
from .identifiers import collect
from .keyed import Keyed
from .keystore import KeyStore
from .patterns import compile_identifiers, date_tokens, looks_like_uid
from .profile import Profile
from .record import SeriesDeidResult, build_record, dry_run
from .walk import apply
from ..sopclasses import NOT_PUBLISHED

log = logging.getLogger(__name__)

def deid_dataset(ds: Dataset, ctx: FileContext, *, pixels_reviewed: bool) -> tuple[str | None, list[dict]]:
    """Pseudonymise one read file in place: its pixels at risk, its overlays, its elements.

    Returns ``(reason, pixel_log)``: ``reason`` is why the file must be quarantined instead of
    written, for its pixels (None: write it), ``pixel_log`` the pixel summaries for the record.
    Any other failure raises: the caller must not publish the half-done file.
    ``pixels_reviewed``: a person released the file from quarantine, its pixels are kept as
    reviewed, without OCR. The inputs pickle, but for ``ctx.keyed`` (its UID cache).
    """
    pixel_log: list[dict] = []
    try:
        if pixels_reviewed:
            outcome = pixels.PixelOutcome(at_risk=True, reason="released from quarantine by a reviewer",
                                          notes=["pixels kept as reviewed, not OCRed again"])
        else:
            outcome = pixels.clean_if_at_risk(ds, enabled=ctx.profile.has("cleanPixelDataOpt"))
        if outcome.quarantine:
            return outcome.quarantine, pixel_log
        if outcome.at_risk:
            pixel_log.append(outcome.summary())
        if ctx.profile.has("cleanGraphOpt"):  # without it, the Basic profile removes overlays
            overlays = pixels.clean_overlays(ds)
            if overlays.planes:
                pixel_log.append(overlays.summary())
        apply(ds, ctx, pixels_cleaned=outcome.cleaned)
    except pixels.PixelError as exc:
        return str(exc), pixel_log
    return None, pixel_log


@dataclass
class _SeriesState:
    """What the files of one series share while it is pseudonymised."""

    subject: str
    session: str | None
    out_dir: Path
    quarantine_dir: Path
    result: SeriesDeidResult = field(default_factory=SeriesDeidResult)
    notes: Counter = field(default_factory=Counter)
    pixel_log: list[dict] = field(default_factory=list)
    names_used: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> files written under it
    patient_ids: set[str] = field(default_factory=set)
    patient_names: set[str] = field(default_factory=set)
    studies: dict[str, dict] = field(default_factory=dict)
    new_identifiers: set[str] = field(default_factory=set)
    patterns: dict[frozenset, Any] = field(default_factory=dict)
    date_patterns: dict[frozenset, Any] = field(default_factory=dict)
    scrubbed: dict = field(default_factory=dict)
    count: int = 0
    first: tuple | None = None  # original study and series UIDs, series number of the first readable file


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

    @property
    def known_values(self) -> frozenset[str]:
        """The identifying values known so far that are not UIDs (searched for in text)."""
        return self._values

    def drop_reason(self, ds: Dataset) -> str | None:
        """Why an instance is dropped by default (None: it is kept)."""
        sop = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", Dataset()), "MediaStorageSOPClassUID", ""))
        if sop in self.allow_sop:
            return None
        if not sop:
            return "no SOP Class UID (not a composite instance)"
        for prefix, reason in NOT_PUBLISHED:
            if sop.startswith(prefix):
                return reason
        if not sop.startswith("1.2.840.10008."):
            return "private SOP class"
        return None

    def dry_run(self, files_sample: Iterable[Path], *, subject: str = "dryrun") -> list[dict]:
        """What pseudonymisation would change, per file and attribute, writing nothing
        (:func:`pacs2bids.deid.record.dry_run`)."""
        return dry_run(self, files_sample, subject=subject)

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
        state = _SeriesState(subject, session, out_dir, Path(quarantine_dir))
        for path in files:
            self._one_file(state, Path(path), pixels_reviewed)
        return self._finish(state)

    # -- internals -----------------------------------------------------------------------
    def _one_file(self, state: _SeriesState, path: Path, pixels_reviewed: bool) -> None:
        state.count += 1
        qname = self.keyed.token(f"{state.subject}/{state.session}/{path.name}/{state.count}")
        try:
            ds = pydicom.dcmread(path, force=False)
            _ = ds.get("SOPClassUID")
        except Exception as exc:  # pydicom raises many kinds on truncated or corrupt files
            self._quarantine(state, path, qname, f"unreadable DICOM ({type(exc).__name__})")
            return
        if state.first is None:
            state.first = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")), ds.get("SeriesNumber"))
        reason = self.drop_reason(ds)
        if reason:
            state.result.dropped.append((qname, reason))
            return
        ctx = self._file_context(state, ds)
        try:
            self._remember_originals(state, ds)
            reason, pixel_log = deid_dataset(ds, ctx, pixels_reviewed=pixels_reviewed)
        except Exception as exc:  # any failure of the walk: never publish a half-done file
            log.warning("file %d of the series could not be pseudonymised: %s", state.count, type(exc).__name__)
            reason = f"pseudonymisation failed ({type(exc).__name__})"
        if reason:
            self._quarantine(state, path, qname, reason)
            return
        state.pixel_log.extend(pixel_log)
        self._write(state, ds, path, qname)

    def _file_context(self, state: _SeriesState, ds: Dataset) -> FileContext:
        """The file's context: its identifying values and the subject's dates, compiled once
        per distinct set within the series."""
        file_dates: set[str] = set()
        file_ids = collect(ds, self.profile, file_dates)
        state.new_identifiers |= file_ids
        seen_dates = self._subject_dates.setdefault(state.subject, set())
        seen_dates |= file_dates
        dkey = frozenset(seen_dates)
        if dkey not in state.date_patterns:
            state.date_patterns[dkey] = date_tokens(dkey)
        key = frozenset(v for v in file_ids if not looks_like_uid(v)) - self._values
        pattern = state.patterns.get(key)
        if pattern is None:
            pattern = state.patterns[key] = compile_identifiers(key | self._values)
        return FileContext(self.keyed, self.profile, state.subject, pattern, state.notes, None, state.scrubbed,
                           dates=state.date_patterns[dkey])

    def _remember_originals(self, state: _SeriesState, ds: Dataset) -> None:
        """What the key store records of the series: the patient's IDs and names, the studies."""
        state.patient_ids.add(str(ds.get("PatientID", "")))
        state.patient_names.add(str(ds.get("PatientName", "")))
        study_uid = str(ds.get("StudyInstanceUID", ""))
        if study_uid and study_uid not in state.studies:
            state.studies[study_uid] = {
                "accession_number": str(ds.get("AccessionNumber", "")),
                "study_date": str(ds.get("StudyDate", "")),
                "pseudo_study_uid": self.keyed.uid(study_uid),
                "session": state.session,
            }

    def _write(self, state: _SeriesState, ds: Dataset, path: Path, qname: str) -> None:
        result = state.result
        sop = str(ds.get("SOPInstanceUID", "")) or self.keyed.uid(qname)
        n = state.names_used.get(sop, 0)
        state.names_used[sop] = n + 1
        target = state.out_dir / (f"{sop}.dcm" if n == 0 else f"{sop}-{n}.dcm")
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

    def _finish(self, state: _SeriesState) -> SeriesDeidResult:
        result = state.result
        if not result.pseudo_series_uid and state.first is not None:
            # nothing written (all dropped or quarantined): the series still has its pseudonyms,
            # so that lineage and re-runs can name it
            first = state.first
            result.pseudo_study_uid, result.pseudo_series_uid = self.keyed.uid(first[0]), self.keyed.uid(first[1])
            result.series_number = int(first[2]) if first[2] not in (None, "") else None
        self.key_store.record_series(
            state.subject,
            patient_ids=sorted(v for v in state.patient_ids if v),
            patient_names=sorted(v for v in state.patient_names if v),
            studies=state.studies,
            identifiers=state.new_identifiers - self._values - self._learned,  # the store has those already
        )
        self._learned |= state.new_identifiers
        self._values |= {v for v in state.new_identifiers if not looks_like_uid(v)}
        result.record = build_record(self.profile, state.notes, state.pixel_log, result, state.count)
        return result

    def _quarantine(self, state: _SeriesState, path: Path, qname: str, reason: str) -> None:
        item = quarantine.hold(state.quarantine_dir, qname, path, reason, subject=state.subject,
                               session=state.session, series_folder=state.out_dir.name)
        state.result.quarantined.append((item.id, reason))
