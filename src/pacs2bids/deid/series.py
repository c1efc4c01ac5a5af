"""Pseudonymise one series to DICOM PS3.15 Annex E, keyed per project (P1-P14).

The files of a series go in batches to worker processes (:mod:`pacs2bids.deid.pool`,
:mod:`pacs2bids.deid.batch`); the :class:`Pseudonymiser` folds what each batch gives in file
order (names, quarantine, record, key store). Each file, one at a time (memory does not grow
with the series): read, decide its SOP class, collect
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
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pydicom.dataset import Dataset

from ..config import PseudonymizationSettings
from .. import quarantine
from ..errors import PseudonymisationError
from . import pool
from .batch import BatchResult, Known, SeriesJob, batch_size, deid_batch, deid_dataset, drop_reason
from .keyed import Keyed
from .keystore import KeyStore
from .patterns import looks_like_uid
from .profile import Profile
from .record import SeriesDeidResult, build_record, dry_run

log = logging.getLogger(__name__)
SMALL_SERIES = 64  # files: a series this small goes ahead of larger ones in the worker pool's queue
__all__ = ["BatchResult", "Known", "Pseudonymiser", "SeriesJob", "deid_batch", "deid_dataset"]

@dataclass
class _SeriesState:
    """What the parent folds, in file order, from the batches of one series."""

    job: SeriesJob
    quarantine_dir: Path
    paths: list[Path]
    result: SeriesDeidResult = field(default_factory=SeriesDeidResult)
    notes: Counter = field(default_factory=Counter)
    pixel_log: list[dict] = field(default_factory=list)
    names_used: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> files written under it
    patient_ids: set[str] = field(default_factory=set)
    patient_names: set[str] = field(default_factory=set)
    studies: dict[str, dict] = field(default_factory=dict)
    new_identifiers: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)
    first: tuple | None = None


class Pseudonymiser:
    """Pseudonymise series of one project, with the project's secret and settings.

    ``key_store`` is the folder of the encrypted matching key (never under the dataset).
    Raises :class:`~pacs2bids.errors.SpecError` for unknown options or malformed
    ``keep_private`` entries, :class:`ValueError` for a secret shorter than 16 bytes.
    """

    def __init__(self, project: str, secret: bytes, settings: PseudonymizationSettings, key_store: Path):
        self.project = project
        self.secret = secret
        self.settings = settings
        self.profile = Profile(settings.options, settings.keep_private, settings.keep_text)
        self.keyed = Keyed(secret, project)
        self.key_store = KeyStore(Path(key_store), project=project, secret=secret)
        # The identifying values recorded so far that are not UIDs, searched for in every file's
        # text (UIDs are replaced by element, never searched for in text); they grow with the
        # patients, not with the instances. The UIDs are read only for the leak scan.
        self._values: frozenset[str] = self.key_store.values()
        self._learned: set[str] = set()  # what this instance recorded: not appended twice
        # Every date seen per subject by the series this instance finished: a later series may
        # quote an earlier visit's date in its text (a prior exam in a protocol or a comment).
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

    def known(self, subject: str, dates: Iterable[str] = ()) -> Known:
        """What a series of ``subject`` starts from: the values known so far; the subject's dates
        seen by this instance, recorded in the key store (its studies' dates) and ``dates``."""
        seen = set(self._subject_dates.get(subject, ())) | self.key_store.study_dates(subject) | set(dates)
        return Known(self._values, frozenset(d for d in seen if d and len(d) == 8 and d.isdigit()))

    def drop_reason(self, ds: Dataset) -> str | None:
        """Why an instance is dropped by default (None: it is kept)."""
        return drop_reason(ds, self.allow_sop)

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
        known: Known | None = None,
        workers: int | None = None,
    ) -> SeriesDeidResult:
        """Pseudonymise the files of one series into ``out_dir``.

        Files go in batches to ``workers`` processes (default: ``settings.workers``, see
        :func:`pacs2bids.deid.pool.worker_count`; a series of one batch stays in this process);
        each is read and written one at a time (memory
        does not grow with the series). Unreadable files and files whose pixels cannot be
        cleaned with confidence are copied to ``quarantine_dir`` under a keyed name with a
        ``.reason.txt``; dropped SOP classes are listed. A file's text is cleaned of its own
        identifying values and dates and of ``known`` (default :meth:`known`), never of another
        file's: the output does not depend on the batches. The key store is updated once, at
        the end. ``pixels_reviewed``: a person released these files from quarantine
        (:mod:`pacs2bids.quarantine`), so their pixels are kept as reviewed, without OCR.
        Returns a :class:`SeriesDeidResult`; raises
        :class:`~pacs2bids.errors.PseudonymisationError` when ``out_dir`` cannot be written.
        """
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PseudonymisationError(f"cannot create output folder {out_dir}: {exc.strerror}") from None
        job = SeriesJob(uuid.uuid4().hex, self.project, self.secret, self.settings, subject, session, out_dir,
                        known or self.known(subject), pixels_reviewed)
        state = _SeriesState(job, Path(quarantine_dir), [Path(p) for p in files])
        n = pool.worker_count(workers if workers is not None else self.settings.workers)
        size = batch_size(len(state.paths), n)
        batches = [(job, [(i, str(p)) for i, p in enumerate(state.paths[k:k + size], start=k)])
                   for k in range(0, len(state.paths), size)]
        try:
            # a small series' batches go before a large one's (the pool's queue serves the lowest first); large
            # series share one priority, first come first served: a large study, often the run's critical path,
            # is delayed by no more than the small series' own work
            for batch in pool.map_ordered(deid_batch, batches, n if len(batches) > 1 else 1,
                                          priority=min(len(state.paths), SMALL_SERIES + 1)):
                self._fold(state, batch)
        except BaseException:
            for tmp in out_dir.glob(".deid-*.part"):  # a failed series leaves no half-named file
                tmp.unlink(missing_ok=True)
            raise
        return self._finish(state)

    # -- internals -----------------------------------------------------------------------
    def _fold(self, state: _SeriesState, batch: BatchResult) -> None:
        """One batch's files into the series, in file order: renamed, quarantined or listed."""
        result = state.result
        for index, kind, qname, detail, sop, info in batch.files:
            if kind == "dropped":
                result.dropped.append((qname, detail))
            elif kind == "quarantine":
                self._quarantine(state, state.paths[index], qname, detail)
            else:
                n = state.names_used.get(sop, 0)
                state.names_used[sop] = n + 1
                target = state.job.out_dir / (f"{sop}.dcm" if n == 0 else f"{sop}-{n}.dcm")
                os.replace(state.job.out_dir / detail, target)
                result.written.append(target)
                result.sources.append(state.paths[index].name)
                if not result.pseudo_series_uid:
                    (result.pseudo_study_uid, result.pseudo_series_uid, result.series_number,
                     result.series_description, result.modality) = info
        state.notes.update(batch.notes)
        state.pixel_log.extend(batch.pixel_log)
        state.new_identifiers |= batch.identifiers
        state.dates |= batch.dates
        state.patient_ids |= batch.patient_ids
        state.patient_names |= batch.patient_names
        for uid, info in batch.studies.items():
            state.studies.setdefault(uid, info)
        if state.first is None:
            state.first = batch.first

    def _finish(self, state: _SeriesState) -> SeriesDeidResult:
        result, subject = state.result, state.job.subject
        if not result.pseudo_series_uid and state.first is not None:
            # nothing written (all dropped or quarantined): the series still has its pseudonyms,
            # so that lineage and re-runs can name it
            first = state.first
            result.pseudo_study_uid, result.pseudo_series_uid = self.keyed.uid(first[0]), self.keyed.uid(first[1])
            result.series_number = int(first[2]) if first[2] not in (None, "") else None
        self.key_store.record_series(
            subject,
            patient_ids=sorted(v for v in state.patient_ids if v),
            patient_names=sorted(v for v in state.patient_names if v),
            studies=state.studies,
            identifiers=state.new_identifiers - self._values - self._learned,  # the store has those already
        )
        self._learned |= state.new_identifiers
        self._values |= {v for v in state.new_identifiers if not looks_like_uid(v)}
        self._subject_dates.setdefault(subject, set()).update(state.dates)
        result.record = build_record(self.profile, state.notes, state.pixel_log, result, len(state.paths))
        return result

    def _quarantine(self, state: _SeriesState, path: Path, qname: str, reason: str) -> None:
        job = state.job
        item = quarantine.hold(state.quarantine_dir, qname, path, reason, subject=job.subject,
                               session=job.session, series_folder=job.out_dir.name)
        state.result.quarantined.append((item.id, reason))
