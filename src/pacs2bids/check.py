"""``pacs2bids check``: can this spec run? Each check says what it found and how to fix it.

DIMSE: C-ECHO (PS3.7 9.1.5), a test C-FIND, and for C-MOVE a real C-MOVE of one instance to
our storage SCP (the only way to learn whether the PACS knows and can reach our storage AE:
it answers 0xA801 when it does not). DICOMweb: QIDO-RS ``/studies?limit=1`` (reachability
and credentials). Always: free space at the work folder.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from .config import ProjectSpec
from .errors import PacsError

log = logging.getLogger(__name__)

# A clinical MRI exam is about 100 MB to 2 GB (REQUIREMENTS.md, orders of magnitude).
BYTES_PER_STUDY = 500 * 1024 * 1024


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _dimse_checks(spec: ProjectSpec) -> list[CheckResult]:
    from . import dimse

    s = spec.pacs.dimse
    peer = f"{s.ae_title}@{s.host}:{s.port} (calling AE {s.calling_ae_title})"
    out: list[CheckResult] = []
    try:
        dimse.echo(s)
        out.append(CheckResult("c-echo", True, f"PACS {peer} answers C-ECHO"))
    except PacsError as exc:
        out.append(CheckResult("c-echo", False, str(exc), "Check the PACS's host, port and AE title in pacs.dimse, "
                               "and that the PACS lists our calling AE title among its modalities."))
        return out
    probe = None
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.StudyDate = ""
        r = dimse.find(s, ds)
        out.append(CheckResult("c-find", True, f"C-FIND answered with {len(r.matches)} studies"
                               + (" (cut short at the PACS's result limit: queries will be split)" if r.truncated else "")))
        probe = next((str(m.StudyInstanceUID) for m in r.matches if m.get("StudyInstanceUID")), None)
    except PacsError as exc:
        out.append(CheckResult("c-find", False, str(exc), "Ask the PACS administrator to allow C-FIND "
                               "(Study Root) for our calling AE title."))
    if s.retrieve == "c-move":
        out.append(_move_check(spec, probe))
    return out


def _move_check(spec: ProjectSpec, study_uid: str | None) -> CheckResult:
    """A real C-MOVE of one instance into a throw-away folder."""
    from . import dimse
    from .retrieve import SeriesSink

    s = spec.pacs.dimse
    dest = s.move_destination or s.calling_ae_title
    if study_uid is None:
        return CheckResult("c-move", True, "the PACS holds no study to test C-MOVE with; not tested")
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.SOPInstanceUID = ""
        found = dimse.find(s, ds).matches
        if not found:
            return CheckResult("c-move", True, "no instance to test C-MOVE with; not tested")
        inst = found[0]
        with tempfile.TemporaryDirectory(prefix="pacs2bids-check-") as tmp:
            sink = SeriesSink(spec.secret_bytes if spec.secret else b"check", study_uid, str(inst.SeriesInstanceUID),
                              Path(tmp), Path(tmp) / "q")
            with dimse.storage_server(s) as server:
                server.expect_series(str(inst.SeriesInstanceUID), sink)
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = study_uid
                q.SeriesInstanceUID = str(inst.SeriesInstanceUID)
                q.SOPInstanceUID = str(inst.SOPInstanceUID)
                r = dimse.move(s, q, dest, server)
        if sink.stored:
            return CheckResult("c-move", True, f"the PACS sent one instance to our storage AE {dest} on "
                               f"{s.storage_host}:{s.storage_port}")
        return CheckResult("c-move", False, f"C-MOVE ended with {r.status.meaning if r.status else 'no status'} and "
                           f"nothing arrived at {dest} on {s.storage_host}:{s.storage_port}",
                           f"Check that the PACS can open a connection to {s.storage_host}:{s.storage_port} "
                           f"(firewall) and that its entry for {dest} has that host and port.")
    except PacsError as exc:
        return CheckResult("c-move", False, str(exc), f"Declare AE title {dest}, host {s.storage_host}, port "
                           f"{s.storage_port} among the PACS's modalities, or use retrieve: c-get.")


def _web_checks(spec: ProjectSpec) -> list[CheckResult]:
    from .dicomweb import WebPacs

    w = spec.pacs.dicomweb
    fix = "Check pacs.dicomweb.url (the DICOMweb root), that the server is running, and the credentials' variables."
    try:
        web = WebPacs(w)
    except PacsError as exc:
        return [CheckResult("qido-rs", False, str(exc), fix)]
    try:
        web.client.search_for_studies(limit=1)
    except Exception as exc:  # requests' errors, raised through dicomweb-client
        return [CheckResult("qido-rs", False, str(web._error("QIDO-RS /studies?limit=1", exc)), fix)]
    return [CheckResult("qido-rs", True, f"DICOMweb {w.url} answers QIDO-RS")]


def _disk_check(spec: ProjectSpec) -> CheckResult:
    work = spec.resolved_work_dir
    probe = work
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    studies = max(1, len(spec.inclusions))
    need = studies * BYTES_PER_STUDY
    ok = free >= need
    return CheckResult(
        "disk-space", ok,
        f"{free / 2**30:.1f} GiB free at {probe}; about {need / 2**30:.1f} GiB may be needed "
        f"({studies} inclusion rows x {BYTES_PER_STUDY // 2**20} MiB)",
        "" if ok else "Free space there, or set work_dir to a larger disk.",
    )


def preflight(spec: ProjectSpec) -> list[CheckResult]:
    """Run every check for ``spec``; never raises for a failed check (each is a result)."""
    results = _dimse_checks(spec) if spec.pacs.chosen == "dimse" else _web_checks(spec)
    results.append(_disk_check(spec))
    return results
