"""The per-file work of one series, run in batches (in worker processes or in the caller's).

:func:`deid_batch` pseudonymises the files ``(index, path)`` of one batch with a
:class:`SeriesJob` (plain values: it pickles) and returns a :class:`BatchResult` per batch that
the parent (:class:`pacs2bids.deid.series.Pseudonymiser`) folds in file order. Nothing here
depends on the other files of the series: a file's text is cleaned of its own identifying
values and dates and of those known before the series (:class:`Known`), so the output is the
same whatever the batches and whichever process runs them. A file is written under a temporary
name (``.deid-<index>.part``) that the parent renames once it has decided, in file order, the
names of duplicate SOP Instance UIDs.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset

from ..config import PseudonymizationSettings
from ..sopclasses import NOT_PUBLISHED
from . import pixels
from . import identifiers
from .context import FileContext, as_written, raw_value, str_of, value_of
from .identifiers import collect
from .keyed import Keyed
from .patterns import compile_identifiers, date_tokens, looks_like_uid
from .profile import Profile
from .walk import apply
from .writer import save

log = logging.getLogger("pacs2bids.deid.series")  # the series' log, wherever its files run
_STUDY_UID, _SERIES_UID = 0x0020000D, 0x0020000E
BATCH_FILES = 16  # files per task sent to a worker process (see batch_size)


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


def drop_reason(ds: Dataset, allow_sop: set[str] | frozenset[str] = frozenset()) -> str | None:
    """Why an instance is dropped by default (None: it is kept); ``allow_sop`` keeps SOP classes."""
    sop = str_of(ds, 0x00080016) or str(getattr(ds.get("file_meta", Dataset()), "MediaStorageSOPClassUID", ""))
    if sop in allow_sop:
        return None
    if not sop:
        return "no SOP Class UID (not a composite instance)"
    for prefix, reason in NOT_PUBLISHED:
        if sop.startswith(prefix):
            return reason
    if not sop.startswith("1.2.840.10008."):
        return "private SOP class"
    return None


@dataclass(frozen=True)
class Known:
    """What is known before a series: identifying values searched for in its text, the subject's
    dates shifted wherever its text quotes them (each file adds its own)."""

    values: frozenset[str] = field(repr=False)  # original values: never in a log or a traceback
    dates: frozenset[str] = field(repr=False)


@dataclass(frozen=True)
class SeriesJob:
    """What every file of one series is pseudonymised with: plain values, so that it pickles to a
    worker process (once per batch; ``token`` names it in the worker's cache of compiled patterns)."""

    token: str
    project: str
    secret: bytes = field(repr=False)
    settings: PseudonymizationSettings
    subject: str
    session: str | None
    out_dir: Path
    known: Known
    pixels_reviewed: bool = False


@dataclass(repr=False)  # holds original values: its repr shows none
class BatchResult:
    """What the files of one batch gave. ``files`` holds per file, in order, ``(index, kind,
    qname, detail, sop, info)``: kind ``written`` (detail: its temporary name, sop: its new SOP
    Instance UID, info: its pseudonymised study and series), ``dropped`` or ``quarantine`` (detail:
    why). The rest is what the series' record and key store gather. Original values are in it
    (for the key store): it goes to the parent, never to a log."""

    files: list[tuple] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)
    pixel_log: list[dict] = field(default_factory=list)
    identifiers: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)
    patient_ids: set[str] = field(default_factory=set)
    patient_names: set[str] = field(default_factory=set)
    studies: dict[str, dict] = field(default_factory=dict)  # the first file of each study wins
    first: tuple | None = None  # original study and series UIDs, series number of the first readable file

    def __repr__(self) -> str:
        return f"BatchResult({len(self.files)} files)"


class _FileWork:
    """A worker's state for one series job: the keyed functions, the profile, the patterns
    compiled once per distinct set of values and dates (caches: they change no output)."""

    def __init__(self, job: SeriesJob):
        self.job = job
        self.keyed = _keyed(job.secret, job.project)
        self.profile = Profile(job.settings.options, job.settings.keep_private, job.settings.keep_text)
        self.allow_sop = frozenset(job.settings.allow_sop_classes)
        self.patterns: dict[frozenset, Any] = {}
        self.date_patterns: dict[frozenset, Any] = {}
        self.scrubbed: dict = {}


_WORK: "OrderedDict[str, _FileWork]" = OrderedDict()
_WORK_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _keyed(secret: bytes, project: str) -> Keyed:
    return Keyed(secret, project)  # one UID cache per project and process


def _work(job: SeriesJob) -> _FileWork:
    with _WORK_LOCK:
        work = _WORK.pop(job.token, None) or _FileWork(job)
        _WORK[job.token] = work
        while len(_WORK) > 8:
            _WORK.popitem(last=False)
    return work


def deid_batch(job: SeriesJob, batch: list[tuple[int, str]]) -> BatchResult:
    """Pseudonymise the files ``(index, path)`` of one batch of a series (in a worker process or
    in the caller's): each written under a temporary name that the parent renames in file order."""
    work, out = _work(job), BatchResult()
    with values_unchecked():
        for index, path in batch:
            _one_file(work, out, out.notes, index, Path(path))
    return out


@contextmanager
def values_unchecked():
    """pydicom checks each value it decodes or is given against its VR and, in its default mode
    (WARN), only warns: nothing is changed or refused. Those checks cost about a sixth of the
    per-file time (issue 12), so a batch runs without them; a stricter mode set by the caller
    (RAISE) is kept. The setting is the process's: restored as it was when the batch ends."""
    settings = pydicom_config.settings
    if settings.reading_validation_mode != pydicom_config.WARN:
        yield
        return
    before = settings._reading_validation_mode  # None: pydicom's default, kept as such
    settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings._reading_validation_mode = before


def _one_file(work: _FileWork, out: BatchResult, notes: Counter, index: int, path: Path) -> None:
    job = work.job
    qname = work.keyed.token(f"{job.subject}/{job.session}/{path.name}/{index + 1}")
    try:
        ds = pydicom.dcmread(path, force=False)
        _ = value_of(ds, 0x00080016)  # read (decoded by pydicom unless raw_value can read it)
    except Exception as exc:  # pydicom raises many kinds on truncated or corrupt files
        out.files.append((index, "quarantine", qname, f"unreadable DICOM ({type(exc).__name__})", "", None))
        return
    if out.first is None:
        out.first = (str_of(ds, _STUDY_UID), str_of(ds, _SERIES_UID), ds.get("SeriesNumber"))
    reason = drop_reason(ds, work.allow_sop)
    if reason:
        out.files.append((index, "dropped", qname, reason, "", None))
        return
    try:  # a value that cannot be decoded (a corrupt sequence, say) fails this file only
        ctx = _file_context(work, out, notes, ds)
        _remember_originals(work, out, ds)
        reason, pixel_log = deid_dataset(ds, ctx, pixels_reviewed=job.pixels_reviewed)
    except Exception as exc:  # any failure of the walk: never publish a half-done file
        log.warning("file %d of the series could not be pseudonymised: %s", index + 1, type(exc).__name__)
        reason = f"pseudonymisation failed ({type(exc).__name__})"
    if reason:
        out.files.append((index, "quarantine", qname, reason, "", None))
        return
    out.pixel_log.extend(pixel_log)
    sop = str_of(ds, 0x00080018) or work.keyed.uid(qname)
    tmp = f".deid-{index:07d}.part"
    save(ds, job.out_dir / tmp)  # the bytes of save_as(enforce_file_format=True), raw elements copied
    sn = ds.get("SeriesNumber")
    info = (str_of(ds, _STUDY_UID), str_of(ds, _SERIES_UID),
            int(sn) if sn not in (None, "") else None, str(ds.get("SeriesDescription", "")), str_of(ds, 0x00080060))
    out.files.append((index, "written", qname, tmp, sop, info))


def _file_context(work: _FileWork, out: BatchResult, notes: Counter, ds: Dataset) -> FileContext:
    """The file's context: its identifying values and dates with those known before the series,
    compiled once per distinct set."""
    file_dates: set[str] = set()
    file_ids = collect(ds, work.profile, file_dates)
    out.identifiers |= file_ids
    out.dates |= file_dates
    known = work.job.known
    dkey = known.dates | file_dates
    if dkey not in work.date_patterns:
        work.date_patterns[dkey] = date_tokens(dkey)
    key = frozenset(v for v in file_ids if not looks_like_uid(v)) - known.values
    pattern = work.patterns.get(key)
    if pattern is None:
        pattern = work.patterns[key] = compile_identifiers(key | known.values)
    return FileContext(work.keyed, work.profile, work.job.subject, pattern, notes, None, work.scrubbed,
                       dates=work.date_patterns[dkey])


def _remember_originals(work: _FileWork, out: BatchResult, ds: Dataset) -> None:
    """What the key store records of the series: the patient's IDs and names, the studies."""
    searchable = identifiers.charset_searchable(ds, True)
    out.patient_ids.add(_text(ds, 0x00100020, searchable))
    out.patient_names.add(_text(ds, 0x00100010, searchable))
    study_uid = str_of(ds, _STUDY_UID)
    if study_uid and study_uid not in out.studies:
        out.studies[study_uid] = {
            "accession_number": _text(ds, 0x00080050, searchable),
            "study_date": str_of(ds, 0x00080020),
            "pseudo_study_uid": work.keyed.uid(study_uid),
            "session": work.job.session,
        }

def _text(ds: Dataset, tag: int, searchable: bool) -> str:
    """``str(ds.get(keyword, ""))`` of a text value, read from its bytes when it can be
    (:func:`~pacs2bids.deid.context.raw_value`), the element left as pydicom writes it."""
    elem = ds._dict.get(tag)
    if elem is None:
        return ""
    value = raw_value(elem, searchable)
    if isinstance(value, str):
        as_written(ds, elem, value)
        return value
    return str(ds[tag].value)


def batch_size(files: int, workers: int) -> int:
    """Files per batch: at most :data:`BATCH_FILES` (one round-trip per batch, never per file),
    fewer on a small series so that every worker gets some (the output does not depend on it)."""
    return max(1, min(BATCH_FILES, -(-files // (4 * workers))))
