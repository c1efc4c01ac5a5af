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


OK, FAILED, NOT_TESTED = "ok", "failed", "not tested"


@dataclass
class CheckResult:
    """One check's outcome: ``status`` is ``ok``, ``failed`` or ``not tested`` (nothing to test
    with: neither a pass nor a failure, and never counted as one)."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.status, bool):  # CheckResult(name, True/False, ...)
            self.status = OK if self.status else FAILED
        if self.status not in (OK, FAILED, NOT_TESTED):
            raise ValueError(f"unknown check status {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def failed(self) -> bool:
        return self.status == FAILED


def _dimse_checks(spec: ProjectSpec) -> list[CheckResult]:
    from .pacs import services

    s = spec.pacs.dimse
    peer = f"{s.ae_title}@{s.host}:{s.port} (calling AE {s.calling_ae_title})"
    out: list[CheckResult] = []
    try:
        services.echo(s)
        out.append(CheckResult("c-echo", OK, f"PACS {peer} answers C-ECHO"))
    except PacsError as exc:
        out.append(CheckResult("c-echo", FAILED, str(exc), "Check the PACS's host, port and AE title in pacs.dimse, "
                               "and that the PACS lists our calling AE title among its modalities."))
        return out
    probe = None
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.StudyDate = ""
        r = services.find(s, ds)
        out.append(CheckResult("c-find", OK, f"C-FIND answered with {len(r.matches)} studies"
                               + (" (cut short at the PACS's result limit: queries will be split)" if r.truncated else "")))
        probe = next((str(m.StudyInstanceUID) for m in r.matches if m.get("StudyInstanceUID")), None)
    except PacsError as exc:
        out.append(CheckResult("c-find", FAILED, str(exc), "Ask the PACS administrator to allow C-FIND "
                               "(Study Root) for our calling AE title."))
    if s.retrieve == "c-move":
        out.append(_move_check(spec, probe))
    return out


def _move_check(spec: ProjectSpec, study_uid: str | None) -> CheckResult:
    """A real C-MOVE of one instance into a throw-away folder."""
    from .pacs import services
    from .pacs.scp import storage_server
    from .pacs.status import MoveDestinationUnknown
    from .sink import SeriesSink

    s = spec.pacs.dimse
    dest = s.move_destination or s.calling_ae_title
    if study_uid is None:
        return CheckResult("c-move", NOT_TESTED, "the PACS holds no study to test C-MOVE with")
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.SOPInstanceUID = ""
        found = services.find(s, ds).matches
        if not found:
            return CheckResult("c-move", NOT_TESTED, "no instance to test C-MOVE with")
        inst = found[0]
        with tempfile.TemporaryDirectory(prefix="pacs2bids-check-") as tmp:
            sink = SeriesSink(spec.secret_bytes if spec.secret else b"check", study_uid, str(inst.SeriesInstanceUID),
                              Path(tmp), Path(tmp) / "q")
            with storage_server(s) as server:
                server.expect_series(str(inst.SeriesInstanceUID), sink)
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = study_uid
                q.SeriesInstanceUID = str(inst.SeriesInstanceUID)
                q.SOPInstanceUID = str(inst.SOPInstanceUID)
                r = services.move(s, q, dest, server)
        if sink.stored:
            return CheckResult("c-move", OK, f"the PACS sent one instance to our storage AE {dest} on "
                               f"{s.storage_host}:{s.storage_port}")
        return CheckResult("c-move", FAILED, f"C-MOVE ended with {r.status.meaning if r.status else 'no status'} and "
                           f"nothing arrived at {dest} on {s.storage_host}:{s.storage_port}",
                           f"Check that the PACS can open a connection to {s.storage_host}:{s.storage_port} "
                           f"(firewall) and that its entry for {dest} has that host and port.")
    except MoveDestinationUnknown as exc:
        return _unknown_or_unreachable(spec, q, exc)
    except PacsError as exc:
        return CheckResult("c-move", FAILED, str(exc), f"Declare AE title {dest}, host {s.storage_host}, port "
                           f"{s.storage_port} among the PACS's modalities, or use retrieve: c-get.")


def _unknown_or_unreachable(spec: ProjectSpec, query: Dataset, first: PacsError) -> CheckResult:
    """The PACS failed our C-MOVE before sending anything, and never connected to us: it does not
    know our AE, or it knows it but cannot connect to the address it has for it. A PACS tells
    the two apart only by its answer (0xA801 for an unknown AE) or by time (connecting to a
    filtered port takes its timeout); so the same C-MOVE is sent to an AE title no PACS knows,
    and the answers compared. Orthanc answers 0xC000 in both cases, at once when the port is
    closed: then both causes are named."""
    import secrets
    import time

    from .pacs import services

    s = spec.pacs.dimse
    dest = s.move_destination or s.calling_ae_title
    where = f"{s.storage_host}:{s.storage_port}"
    fix_address = (f"Make the PACS's entry for AE title {dest} point to host {s.storage_host}, port {s.storage_port} "
                   "(pacs.dimse.storage_host and storage_port; storage_port 0 picks a port the PACS cannot know), "
                   "and open that port in any firewall between the PACS and this machine.")
    fix_declare = f"Declare AE title {dest}, host {s.storage_host}, port {s.storage_port} among the PACS's modalities."
    stranger = "P2B" + secrets.token_hex(4).upper()  # 11 characters: an AE title no PACS knows
    started = time.monotonic()
    try:
        services.move(s, query, stranger)
        other: int | None = None  # the PACS accepted a move to an AE it cannot know: says nothing
    except PacsError as exc:
        other = exc.status
    probe_seconds = time.monotonic() - started
    ours = first.status
    if other is not None and other != ours:
        return CheckResult(
            "c-move", FAILED,
            f"destination known but unreachable: the PACS knows AE title {dest} (it answers 0x{other:04X} for an AE "
            f"title it cannot know, 0x{ours:04X} for {dest}) but could not connect to it: our storage SCP at {where} "
            "received no connection", fix_address)
    if ours == 0xA801:
        return CheckResult(
            "c-move", FAILED,
            f"unknown AE: the PACS answered 0xA801 'move destination unknown' for {dest}, as for an AE title it cannot "
            f"know, and our storage SCP at {where} received no connection (a PACS that answers 0xA801 also when it "
            "cannot connect would say the same: its log tells)", f"{fix_declare} {fix_address}")
    return CheckResult(
        "c-move", FAILED,
        f"unknown AE or unreachable destination: the PACS answered 0x{ours:04X} for {dest}, the same as for an AE "
        f"title it cannot know ({probe_seconds:.1f} s), and our storage SCP at {where} received no connection: it "
        f"either does not know {dest} or cannot connect to the host and port it has for it (its log says which: "
        "Orthanc logs 'Unknown modality' or 'connecting to AET ...')",
        f"{fix_declare} If it is declared, check its host and port there. {fix_address}")


def _web_checks(spec: ProjectSpec) -> list[CheckResult]:
    from .pacs.dicomweb import WebPacs

    w = spec.pacs.dicomweb
    fix = "Check pacs.dicomweb.url (the DICOMweb root), that the server is running, and the credentials' variables."
    try:
        web = WebPacs(w)
    except PacsError as exc:
        return [CheckResult("qido-rs", FAILED, str(exc), fix)]
    try:
        web.client.search_for_studies(limit=1)
    except Exception as exc:  # requests' errors, raised through dicomweb-client
        return [CheckResult("qido-rs", FAILED, str(web._error("QIDO-RS /studies?limit=1", exc)), fix)]
    return [CheckResult("qido-rs", OK, f"DICOMweb {w.url} answers QIDO-RS")]


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
        "disk-space", OK if ok else FAILED,
        f"{free / 2**30:.1f} GiB free at {probe}; about {need / 2**30:.1f} GiB may be needed "
        f"({studies} inclusion rows x {BYTES_PER_STUDY // 2**20} MiB)",
        "" if ok else "Free space there, or set work_dir to a larger disk.",
    )


def preflight(spec: ProjectSpec) -> list[CheckResult]:
    """Run every check for ``spec``; never raises for a failed check (each is a result)."""
    try:
        results = _dimse_checks(spec) if spec.pacs.chosen == "dimse" else _web_checks(spec)
    except Exception as exc:  # a check that crashes is a failed check, with its reason, not a traceback
        results = [CheckResult(spec.pacs.chosen, FAILED, f"{type(exc).__name__}: {exc}",
                               "Check the pacs section of the spec; run with -v and report it if it persists.")]
    results.append(_disk_check(spec))
    return results
