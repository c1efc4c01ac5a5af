"""The targets step of a run: the local published version, with its manifest, to each target.

A target that fails does not undo the local publish (the local version is the source of truth,
and the next run resumes the target's upload): its report says ``failed`` and why, the run ends
"completed with failures".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from . import TargetError, TargetReport, open_targets
from .manifest import ensure_manifest

log = logging.getLogger(__name__)


def publish_to_target(spec, index: int, version: Path, *, log=log,
                      secrets: Mapping[str, Mapping[str, str]] | None = None) -> TargetReport:
    """Publish ``version`` (a local published version folder) to the spec's target ``index``."""
    settings = spec.targets[index]
    try:
        manifest = ensure_manifest(version)  # built once per version, then read back
        (target,) = [t for i, t in enumerate(open_targets(spec, secrets=secrets)) if i == index]
        return target.publish(version, manifest, log=log)
    except TargetError as exc:
        log.error("%s", exc)
        report = getattr(exc, "report", None)  # what the target did before it failed, when it says
        if isinstance(report, TargetReport):
            report.state, report.error = "failed", str(exc)
            return report
        return TargetReport(target=settings.label, version=version.name, state="failed", error=str(exc))
