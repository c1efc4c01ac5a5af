"""The pseudonymised DICOM of a published version, pushed to a research PACS (issue 13).

Every ``sourcedata/**/*.dcm`` of the version goes to the PACS by STOW-RS (PS3.18 10.5, through
dicomweb-client, in batches) or by C-STORE (PS3.4 B.2, pynetdicom, one association offering the
SOP classes and transfer syntaxes of the files). The PACS's answer is read per instance:

- STOW-RS: an instance in ``ReferencedSOPSequence`` is stored (with a ``WarningReason``: stored
  with a warning); one in ``FailedSOPSequence`` failed, with its ``FailureReason``; one in
  neither was not acknowledged (Orthanc answers so when its storage is full);
- C-STORE: success is stored; a warning (0xB000 coercion of data elements, 0xB006 element
  discarded, 0xB007 data set does not match SOP class) is stored all the same, as the standard
  says, and is reported; 0x0111 (duplicate SOP instance) means the PACS already holds it; every
  other status is a failure.

Incremental and resumable: before sending, the PACS is asked what it holds of each
pseudonymised study (QIDO-RS at instance level, or C-FIND at IMAGE level per series) and only
the instances it lacks are sent, so a re-run with nothing new sends nothing, and a push cut
by an outage is completed by the next run without sending anything twice. After a push the
PACS is asked again: the report is ``verified`` only when it holds every instance (a PACS may
answer success and drop an instance, as Orthanc does when a filter refuses it).

Instances the PACS refuses are listed by their path in the version (keyed file names, no
identifier) with the PACS's status; the others are sent all the same. Losing the PACS
mid-push (connection refused, association aborted) raises :class:`~pacs2bids.errors.PacsError`
(transient): run again. DICOMweb credentials come from the environment variables the spec
names and never appear in logs, errors or reports; DIMSE has none (AE titles).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom

from ..config.targets import DicomwebTargetSettings, DimseTargetSettings
from ..errors import PacsError
from . import TargetError, TargetReport
from ..lineage.tables import LINEAGE_DIR
from .research_pacs_send import DimsePeer, Push, WebPeer

log = logging.getLogger(__name__)

SOURCEDATA = "sourcedata/"
_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
_LISTED = 20  # failed instances named in the log; the report holds them all
_NAMED = 5  # ... and in the error (the run summary quotes it)


class ResearchPacsError(TargetError):
    """The research PACS could not be reached, refused us, was lost mid-push, or does not hold
    every instance after it. The message names the target and the fix; ``transient`` says
    whether running again may be enough; ``report`` (when some instances were refused) lists
    each by its path in the version, with the PACS's answer. What the PACS holds stays, and the
    next run sends only what it lacks."""

    def __init__(self, message: str, *, transient: bool = False, report: "ResearchPacsReport | None" = None):
        super().__init__(message)
        self.transient = transient
        self.report = report


@dataclass
class ResearchPacsReport(TargetReport):
    """``sent_files``: instances put on the wire in this publish (whatever the answer);
    ``skipped_files``: instances the PACS already held. ``failed`` and ``warnings`` map the
    version's relative path of an instance to the PACS's answer; ``verified``: after the push,
    the PACS holds every instance of the version."""

    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Instance:
    """One pseudonymised DICOM file of the version (its UIDs are pseudonyms)."""

    path: str  # relative to the version
    study: str
    series: str
    sop: str
    sop_class: str
    syntax: str
    size: int


def _files(manifest: dict | None) -> dict:
    """The ``relative path -> entry`` map of a manifest given whole or as its ``files`` map ({} for none)."""
    return (manifest.get("files", manifest) or {}) if manifest else {}


def dicom_paths(version: Path, manifest: dict | None) -> list[str]:
    """The version's pseudonymised DICOM files (``sourcedata/**/*.dcm``), relative, sorted: from
    ``manifest`` (relative path -> size or ``{size, sha256}``, or a dict with such a ``files``
    map), else from the folder."""
    files = _files(manifest)
    if files:
        names = list(files)
    else:
        names = [p.relative_to(version).as_posix() for p in (version / "sourcedata").rglob("*") if p.is_file()]
    return sorted(n for n in names if n.startswith(SOURCEDATA) and n.lower().endswith(".dcm"))


def lineage_uids(version: Path, manifest: dict | None) -> dict[str, tuple[str, str, str]]:
    """Relative path -> (study, series, SOP Instance UID) of the version's DICOM files that its
    per-instance lineage tables (``.pacs2bids/lineage/instances-*.parquet``) describe with the
    SHA-256 the manifest gives: those need no header read. Empty without a manifest or tables."""
    files = _files(manifest)
    if not files:
        return {}
    out: dict[str, tuple[str, str, str]] = {}
    columns = ["path", "sha256", "pseudo_study_uid", "pseudo_series_uid", "pseudo_sop_instance_uid"]
    for table in sorted((version / LINEAGE_DIR).glob("instances-*.parquet")):
        try:
            rows = pq.read_table(table, columns=columns).to_pylist()
        except (OSError, ValueError, KeyError, pa.ArrowException):
            continue  # unreadable or older table: its files are read instead
        for row in rows:
            entry = files.get(row["path"])
            digest = entry.get("sha256") if isinstance(entry, dict) else None
            uids = (row["pseudo_study_uid"], row["pseudo_series_uid"], row["pseudo_sop_instance_uid"])
            if digest and digest == row["sha256"] and all(uids):
                out[row["path"]] = uids
    return out


def known_instances(version: Path, manifest: dict | None) -> tuple[list[Instance], dict[str, str]]:
    """The version's DICOM instances: UIDs from its lineage where it vouches for the file, from
    the header otherwise. SOP class and transfer syntax are read only for what is sent
    (:func:`with_classes`)."""
    known = lineage_uids(version, manifest)
    paths = dicom_paths(version, manifest)
    files = _files(manifest)
    out = [Instance(p, *known[p], "", "", _size(files.get(p))) for p in paths if p in known]
    read, bad = read_instances(version, [p for p in paths if p not in known])
    return sorted(out + read, key=lambda i: i.path), bad


def _size(entry) -> int:
    return int(entry.get("size") or 0) if isinstance(entry, dict) else int(entry or 0)


def with_classes(version: Path, todo: list[Instance]) -> tuple[list[Instance], dict[str, str]]:
    """``todo`` with SOP class and transfer syntax, read from the headers of those lacking them."""
    lacking = [i.path for i in todo if not i.sop_class]
    if not lacking:
        return todo, {}
    read, bad = read_instances(version, lacking)
    by_path = {i.path: i for i in read}
    return [by_path.get(i.path, i) if not i.sop_class else i for i in todo if i.path not in bad], bad


def read_instances(version: Path, paths: Iterable[str]) -> tuple[list[Instance], dict[str, str]]:
    """Each file's UIDs (header only); returns the instances and the unreadable files with why."""
    out, bad = [], {}
    for rel in paths:
        path = version / rel
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
            out.append(Instance(rel, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), path.stat().st_size))
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
            bad[rel] = f"not a readable DICOM file with its UIDs ({type(exc).__name__})"
    return out, bad


# -- the target -----------------------------------------------------------------------------
class ResearchPacsTarget:
    """A research PACS as a publish target (see the module docstring).

    ``block``: the credentials a Prefect Secret block holds (``username``, ``password``), used
    instead of the environment variables the spec names. ``on_sent(n)`` (optional) is called
    after each instance the PACS answered, with the count so far in this publish: for progress,
    and for tests that stop the PACS mid-push."""

    def __init__(self, settings: DicomwebTargetSettings | DimseTargetSettings, *,
                 environ: Mapping[str, str] | None = None, block: Mapping[str, str] | None = None):
        self.settings = settings
        self.name = settings.label
        self.environ = os.environ if environ is None else environ
        self.block = block
        self.on_sent: Callable[[int], None] | None = None

    def _peer(self):
        if isinstance(self.settings, DicomwebTargetSettings):
            return WebPeer(self.settings, self.environ, self.block)
        return DimsePeer(self.settings)

    def publish(self, version: Path, manifest: dict | None, *, log: logging.Logger | logging.LoggerAdapter = log
                ) -> ResearchPacsReport:
        """Send what the PACS lacks of ``version``'s pseudonymised DICOM; returns the report
        (``state`` "unchanged" when nothing was missing). Raises :class:`ResearchPacsError`
        naming the target when the PACS cannot be reached, refuses us (AE title, HTTP 401/403),
        is lost mid-push, or lacks instances after the push (``report`` then lists them)."""
        started = time.monotonic()
        version = Path(version)
        report = ResearchPacsReport(self.name, version.name)
        instances, report.failed = known_instances(version, manifest)
        push = Push(on_sent=self.on_sent)
        peer_ = None
        try:
            peer_ = self._peer()
            held = self._held(peer_, instances)
            todo = [i for i in instances if i.sop not in held]
            report.skipped_files = len(instances) - len(todo)
            log.info("research PACS %s: %d instance(s) in version %s, %d already held; sending %d by %s",
                     self.name, len(instances), version.name, report.skipped_files, len(todo), peer_.method)
            if todo:
                todo, unreadable = with_classes(version, todo)
                report.failed.update(unreadable)
                peer_.send(version, todo, push)
                touched = {i.study for i in todo}  # asked again; the others were just seen whole
                again = [i for i in instances if i.study in touched]
                held = (held - {i.sop for i in again}) | self._held(peer_, again)
        except PacsError as exc:
            raise ResearchPacsError(f"research PACS {self.name}: {exc}", transient=exc.transient) from None
        finally:
            if peer_ is not None:
                peer_.close()
        self._account(report, push, [i for i in instances if i.sop not in held])
        report.seconds = time.monotonic() - started
        _log_outcome(log, report, len(instances))
        if report.failed:
            raise ResearchPacsError(_refused(report, len(instances)), report=report)
        return report

    @staticmethod
    def _held(peer_, instances: list[Instance]) -> set[str]:
        """SOP Instance UIDs of ``instances`` the PACS holds. Per study, the PACS first says how
        many instances it holds per series; a series it holds with as many instances as the
        version is taken as held whole (its keyed UIDs are this project's alone); the others are
        asked instance by instance, and a series it lacks is not asked at all."""
        studies: dict[str, dict[str, set[str]]] = {}
        for inst in instances:
            studies.setdefault(inst.study, {}).setdefault(inst.series, set()).add(inst.sop)
        held: set[str] = set()
        for study, series in sorted(studies.items()):
            counts = peer_.counts(study)
            for uid, sops in sorted(series.items()):
                n = counts.get(uid, 0)
                if n == len(sops):
                    held |= sops
                elif n != 0:
                    held |= peer_.held(study, uid) & sops
        return held

    @staticmethod
    def _account(report: ResearchPacsReport, push: Push, absent: list[Instance]) -> None:
        """Fill the report; an instance the PACS does not hold after the push is failed, with
        the PACS's answer when it gave one."""
        report.sent_files = len(push.sent)
        report.sent_bytes = sum(i.size for i in push.sent)
        report.warnings = dict(push.warnings)
        for inst in absent:
            report.failed[inst.path] = push.failed.get(
                inst.path, "answered as stored, but the PACS does not hold it after the push")
        report.verified = not report.failed
        report.state = "failed" if report.failed else "published" if push.sent else "unchanged"
        report.error = f"{len(report.failed)} instance(s) not held" if report.failed else ""


def _refused(report: ResearchPacsReport, total: int) -> str:
    shown = "; ".join(f"{path}: {why}" for path, why in list(report.failed.items())[:_NAMED])
    more = f"; and {len(report.failed) - _NAMED} more (the report lists them all)" if len(report.failed) > _NAMED else ""
    rest = " (the others are there)" if len(report.failed) < total else ""
    return (f"research PACS {report.target} does not hold {len(report.failed)} of the {total} instance(s) of "
            f"version {report.version} after the push{rest}: {shown}{more}. Check the PACS's logs and space; "
            "the next run sends only what it lacks")


def _log_outcome(log, report: ResearchPacsReport, total: int) -> None:
    log.info("research PACS %s: sent %d instance(s) (%.1f MB) in %.1f s; %d of %d held%s",
             report.target, report.sent_files, report.sent_bytes / 1e6, report.seconds,
             total - len(report.failed), total, "" if report.verified else "; NOT verified")
    if report.warnings:
        log.warning("research PACS %s stored %d instance(s) with a warning, e.g. %s: %s", report.target,
                    len(report.warnings), *next(iter(report.warnings.items())))
    for path, why in list(report.failed.items())[:_LISTED]:
        log.error("research PACS %s does not hold %s: %s", report.target, path, why)
    if len(report.failed) > _LISTED:
        log.error("research PACS %s: ... and %d more instance(s) not held", report.target,
                  len(report.failed) - _LISTED)
