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
from typing import Annotated, Callable, Iterable, Literal, Union

import pydicom
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import DicomwebSettings, DimseSettings
from ..errors import PacsError
from .research_pacs_send import DimsePeer, Push, WebPeer

log = logging.getLogger(__name__)

SOURCEDATA = "sourcedata/"
_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]


# -- the spec -------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomwebTarget(_Model):
    """A research PACS reached by DICOMweb: QIDO-RS to see what it holds, STOW-RS to send."""

    kind: Literal["dicomweb"]
    name: str = Field("research-pacs", description="How logs and reports name this target.")
    url: str = Field(description="The DICOMweb root, e.g. https://pacs.example.org/dicom-web.")
    username_env: str | None = Field(None, description="Environment variable holding the user name.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    timeout: float = Field(120.0, gt=0, description="Seconds to wait for an HTTP answer.")
    batch_instances: int = Field(50, ge=1, le=1000, description="Instances per STOW-RS request, at most.")
    batch_megabytes: int = Field(64, ge=1, le=4096, description="Megabytes per STOW-RS request, at most "
                                 "(an instance larger than this goes alone).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    def settings(self) -> DicomwebSettings:
        return DicomwebSettings(url=self.url, username_env=self.username_env, password_env=self.password_env,
                                timeout=self.timeout)


class DimseTarget(_Model):
    """A research PACS reached by DIMSE: C-FIND to see what it holds, C-STORE to send."""

    kind: Literal["dimse"]
    name: str = Field("research-pacs", description="How logs and reports name this target.")
    host: str = Field(description="The PACS's host name or address.")
    port: int = Field(ge=1, le=65535, description="The PACS's DICOM port.")
    ae_title: str = Field(description="The PACS's AE title (called AE).")
    calling_ae_title: str = Field("PACS2BIDS", description="Our AE title, as the PACS knows it.")
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for a DIMSE or network answer.")

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        if not 1 <= len(v.strip()) <= 16:
            raise ValueError("an AE title has 1 to 16 characters")
        return v

    def settings(self) -> DimseSettings:
        return DimseSettings(ae_title=self.ae_title, host=self.host, port=self.port,
                             calling_ae_title=self.calling_ae_title, timeout=self.timeout, max_associations=1)


ResearchPacsSpec = Annotated[Union[DicomwebTarget, DimseTarget], Field(discriminator="kind")]


# -- what a push did ------------------------------------------------------------------------
@dataclass
class TargetReport:
    """What a publish to one target did (the shape every target reports)."""

    target: str
    version: str
    sent_files: int = 0
    sent_bytes: int = 0
    skipped_files: int = 0
    verified: bool = False
    seconds: float = 0.0


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


def dicom_paths(version: Path, manifest: dict | None) -> list[str]:
    """The version's pseudonymised DICOM files (``sourcedata/**/*.dcm``), relative, sorted: from
    ``manifest`` (relative path -> size or ``{size, sha256}``, or a dict with such a ``files``
    map), else from the folder."""
    files = (manifest or {}).get("files", manifest) if manifest else None
    if files:
        names = list(files)
    else:
        names = [p.relative_to(version).as_posix() for p in (version / "sourcedata").rglob("*") if p.is_file()]
    return sorted(n for n in names if n.startswith(SOURCEDATA) and n.lower().endswith(".dcm"))


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

    ``on_sent(n)`` (optional) is called after each instance the PACS answered, with the count
    so far in this publish: for progress, and for tests that stop the PACS mid-push."""

    def __init__(self, spec: DicomwebTarget | DimseTarget, environ: dict | None = None):
        self.spec = spec
        self.name = spec.name
        self.environ = os.environ if environ is None else environ
        self.on_sent: Callable[[int], None] | None = None

    def _peer(self):
        return WebPeer(self.spec, self.environ) if self.spec.kind == "dicomweb" else DimsePeer(self.spec)

    def publish(self, version: Path, manifest: dict | None, *, log: logging.Logger = log) -> ResearchPacsReport:
        """Send what the PACS lacks of ``version``'s pseudonymised DICOM; returns the report.
        Raises :class:`PacsError` naming the target when the PACS cannot be reached, refuses us
        (AE title, HTTP 401/403) or is lost mid-push."""
        started = time.monotonic()
        version = Path(version)
        report = ResearchPacsReport(self.name, version.name)
        instances, report.failed = read_instances(version, dicom_paths(version, manifest))
        peer_ = None
        try:
            peer_ = self._peer()
            held = self._held(peer_, instances)
            todo = [i for i in instances if i.sop not in held]
            report.skipped_files = len(instances) - len(todo)
            log.info("research PACS %r: %d instance(s) in version %s, %d already held; sending %d by %s",
                     self.name, len(instances), version.name, report.skipped_files, len(todo), peer_.method)
            push = Push(on_sent=self.on_sent)
            if todo:
                peer_.send(version, todo, push)
                held = self._held(peer_, instances)
        except PacsError as exc:
            raise PacsError(f"research PACS {self.name!r}: {exc}", transient=exc.transient, status=exc.status) from None
        finally:
            if peer_ is not None:
                peer_.close()
        self._account(report, push, [i for i in instances if i.sop not in held])
        report.seconds = time.monotonic() - started
        _log_outcome(log, report, len(instances))
        return report

    @staticmethod
    def _held(peer_, instances: list[Instance]) -> set[str]:
        studies: dict[str, set[str]] = {}
        for inst in instances:
            studies.setdefault(inst.study, set()).add(inst.series)
        held: set[str] = set()
        for study, series in sorted(studies.items()):
            held |= peer_.held(study, sorted(series))
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


def _log_outcome(log: logging.Logger, report: ResearchPacsReport, total: int) -> None:
    log.info("research PACS %r: sent %d instance(s) (%.1f MB) in %.1f s; %d of %d held%s",
             report.target, report.sent_files, report.sent_bytes / 1e6, report.seconds,
             total - len(report.failed), total, "" if report.verified else "; NOT verified")
    if report.warnings:
        log.warning("research PACS %r stored %d instance(s) with a warning, e.g. %s: %s", report.target,
                    len(report.warnings), *next(iter(report.warnings.items())))
    for path, why in list(report.failed.items())[:20]:
        log.error("research PACS %r does not hold %s: %s", report.target, path, why)
    if len(report.failed) > 20:
        log.error("research PACS %r: ... and %d more instance(s) not held", report.target, len(report.failed) - 20)


def open_research_pacs(spec: DicomwebTarget | DimseTarget, environ: dict | None = None) -> ResearchPacsTarget:
    """The target for a ``dicomweb`` or ``dimse`` entry of the spec's ``targets``."""
    return ResearchPacsTarget(spec, environ)
