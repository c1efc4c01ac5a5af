"""Retention on a research PACS (issue 14): a project's expired studies deleted from an Orthanc
through its REST API, for :mod:`pacs2bids.purge`.

A research PACS holds studies, not versions. The studies a version sent are those of its
pseudonymised ``sourcedata/**/*.dcm`` (:func:`~pacs2bids.targets.research_pacs.known_instances`:
from its lineage tables, else the headers), read from the local published versions when the purge
is planned, before any of them is deleted. Versions share studies (pseudonymised UIDs are keyed,
stable from one run to the next): an expired version's study is deleted only when no version that
stays holds it, and once, under the first expired version that holds it.

Deleting (:class:`OrthancStudyPurger`): ``POST /tools/lookup`` with the StudyInstanceUID, then
``DELETE /studies/{id}``; a study Orthanc no longer holds counts as deleted (a purge resumed after
a failure). Credentials come from the environment variables the target's ``purge`` names; they
never reach logs, errors or the audit log; https is verified (``ca_bundle``). A research PACS with
no ``purge`` setting (or not an Orthanc) stays listed as not purgeable, with the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import requests

from ..config.settings import DicomwebSettings
from ..config.targets import OrthancPurgeSettings
from ..errors import PacsError

log = logging.getLogger(__name__)

NOT_PURGEABLE = ("not purged by pacs2bids: delete the project's studies with the PACS's own tools, or, when it is an "
                 "Orthanc, give the target purge: {orthanc_rest: URL, username_env, password_env}")


def version_studies(version: Path) -> set[str]:
    """The (pseudonymised) StudyInstanceUIDs of a local published version's DICOM."""
    from ..publish import MANIFEST
    from .research_pacs import known_instances

    try:
        manifest = json.loads((version / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    instances, _unreadable = known_instances(version, manifest)
    return {i.study for i in instances}


def studies_to_delete(versions: list[tuple[Path, bool]]) -> dict[str, list[str]]:
    """``versions``: (local version folder, expired). For each expired version, the studies to
    delete: those it holds that no version staying holds, each under the first expired version
    (in the order given) that holds it."""
    keep: set[str] = set()
    for v, expired in versions:
        if not expired:
            keep |= version_studies(v)
    out: dict[str, list[str]] = {}
    for v, expired in versions:
        if expired:
            mine = version_studies(v) - keep
            out[v.name] = sorted(mine)
            keep |= mine  # already assigned: a later expired version does not list it again
    return out


class OrthancStudyPurger:
    """Deletes studies from one research-PACS target that is an Orthanc (see the module docstring)."""

    def __init__(self, name: str, settings: OrthancPurgeSettings, environ: Mapping[str, str]):
        from ..pacs.dicomweb import make_session

        self.name, self.settings = name, settings
        web = DicomwebSettings(url=settings.orthanc_rest, username_env=settings.username_env,
                               password_env=settings.password_env, ca_bundle=settings.ca_bundle)
        try:
            self.session = make_session(web, dict(environ))
        except PacsError as exc:
            raise PacsError(f"research PACS {name}: purge: {str(exc).replace('DICOMweb ', 'Orthanc REST ', 1)}",
                            transient=False) from None

    def _call(self, method: str, path: str, **kw) -> requests.Response:
        url = f"{self.settings.orthanc_rest}{path}"
        try:
            r = self.session.request(method, url, timeout=self.settings.timeout, **kw)
        except requests.RequestException as exc:
            raise PacsError(f"research PACS {self.name}: Orthanc REST {self.settings.orthanc_rest} did not answer "
                            f"({type(exc).__name__}); check that it runs and the url", transient=True) from None
        if r.status_code in (401, 403):
            names = " / ".join(n for n in (self.settings.username_env, self.settings.password_env) if n) or "none set"
            raise PacsError(f"research PACS {self.name}: Orthanc REST refused us (HTTP {r.status_code}); check the "
                            f"credentials in {names}", transient=False)
        if not r.ok and r.status_code != 404:
            raise PacsError(f"research PACS {self.name}: Orthanc REST {method} {path.split('/')[1]} answered HTTP "
                            f"{r.status_code}", transient=r.status_code >= 500)
        return r

    def _study_ids(self, study_uid: str) -> list[str]:
        found = self._call("POST", "/tools/lookup", data=study_uid).json()
        return [m["ID"] for m in found if m.get("Type") == "Study"]

    def delete_studies(self, study_uids: list[str], *, log: logging.Logger | logging.LoggerAdapter = log) -> int:
        """Delete each study Orthanc holds; returns how many it held. Raises :class:`PacsError`
        (after the others were tried) when one could not be deleted."""
        held = failed = 0
        for uid in study_uids:
            try:
                for oid in self._study_ids(uid):
                    self._call("DELETE", f"/studies/{oid}")
                    held += 1
            except PacsError as exc:
                if exc.transient is False and "refused us" in str(exc):
                    raise
                failed += 1
                last = exc
        log.info("research PACS %s: %d of %d expired stud(ies) held there, deleted", self.name, held, len(study_uids))
        if failed:
            raise PacsError(f"{failed} of {len(study_uids)} stud(ies) not deleted; last: {last}",
                            transient=last.transient)
        return held
