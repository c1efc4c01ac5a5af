"""Secondary storage (issue 13): copying the version just published locally to other places.

The LOCAL published version stays the source of truth (it seeds the next run); each target gets
it after :func:`pacs2bids.publish.publish_local`, in its own step, with the version's manifest
(:mod:`.manifest`: every file's path, size and SHA-256). Plain Python: no Prefect here.

- :mod:`.manifest`: a version's manifest, built once, saved inside the version;
- :mod:`.fsspec_target`: :class:`FsspecTarget`, one class for any fsspec file system (S3 through
  s3fs, SFTP through paramiko, local folders): incremental, resumable, verified, atomic for readers
  (``<prefix>/versions/<id>/`` + ``<prefix>/CURRENT.json`` written last), locked per project;
- ``research_pacs`` (its own module): the pseudonymised DICOM to a research PACS.

Every target has a ``name`` fit for logs (never a secret) and ``publish(version, manifest, log=)``
returning a :class:`TargetReport`. :func:`open_targets` builds them from the spec.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

from ..config.targets import DicomwebTargetSettings, DimseTargetSettings, StorageTargetSettings, TargetSettings
from ..errors import Pacs2BidsError


class TargetError(Pacs2BidsError):
    """A target could not be published to. The message names the target and what to check (its
    address, credentials, the space left); what the target held before is left as it was, and
    the local dataset is published. The next run resumes where this one stopped."""


@dataclass
class TargetReport:
    """What one target got from one publish: counts and bytes, never names or secrets."""

    target: str
    version: str
    sent_files: int = 0
    sent_bytes: int = 0
    copied_files: int = 0  # unchanged since the target's current version: copied or linked by the server
    skipped_files: int = 0  # already there (a re-run, or what an interrupted publish had sent)
    verified: bool = False
    seconds: float = 0.0
    state: str = "published"  # published | unchanged | failed
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Target(Protocol):
    name: str  # as in the spec, for logs and the summary (never a secret)

    def publish(self, version: Path, manifest: dict, *, log: logging.Logger | logging.LoggerAdapter) -> TargetReport:
        """Make ``version`` (a local published version folder, whose manifest is ``manifest``) the
        target's current version; raises :class:`TargetError` naming the target on failure."""
        ...


@runtime_checkable
class Purgeable(Protocol):
    """A target whose versions can be listed and deleted (retention, :mod:`pacs2bids.purge`):
    :class:`~.fsspec_target.FsspecTarget`. A research PACS is not (it holds studies, not versions):
    :mod:`.research_pacs_purge` deletes an Orthanc's expired studies when the target gives ``purge``."""

    name: str

    def versions(self) -> list[dict]:
        """``[{"version", "published": ISO UTC or None, "current": bool}]``."""
        ...

    def delete_version(self, version: str, *, log: logging.Logger | logging.LoggerAdapter) -> None:
        """Delete ``version`` (the current one too, when asked: its pointer first)."""
        ...


def open_targets(spec, *, secrets: Mapping[str, Mapping[str, str]] | None = None,
                 environ: Mapping[str, str] | None = None) -> list[Target]:
    """The spec's targets, in order (a URL ``output`` first). ``secrets`` maps a Prefect block name
    to the credentials it holds (resolved by the flow's task; plain values never come from the
    spec); ``environ`` defaults to the process environment."""
    import os

    environ = os.environ if environ is None else environ
    built: list[Target] = []
    for settings in spec.targets:
        if isinstance(settings, StorageTargetSettings):
            from .fsspec_target import FsspecTarget

            block = (secrets or {}).get(settings.credentials_block or "", None)
            built.append(FsspecTarget(settings, project=spec.project, fingerprint=_fingerprint(spec),
                                      environ=environ, block=block))
        elif isinstance(settings, (DicomwebTargetSettings, DimseTargetSettings)):
            from .research_pacs import ResearchPacsTarget

            block = (secrets or {}).get(settings.credentials_block or "", None)
            built.append(ResearchPacsTarget(settings, environ=environ, block=block))
        else:  # pragma: no cover - a kind added to the union without its builder here
            raise TargetError(f"target kind {settings.kind!r} has no publisher in pacs2bids.targets.open_targets")
    return built


def _fingerprint(spec) -> str | None:
    """The keyed project fingerprint (as in the local marker), or None without a key loaded."""
    from ..publish import project_fingerprint

    return project_fingerprint(spec.project, spec.secret_bytes) if spec.secret is not None else None


__all__ = ["Purgeable", "Target", "TargetError", "TargetReport", "TargetSettings", "StorageTargetSettings", "open_targets"]
