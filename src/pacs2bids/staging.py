"""Staging through a store (issue 14): a study's work shares no file with the flow's machine.

With the spec's ``staging`` setting (:mod:`pacs2bids.config.staging`), each study runs, on whichever
worker, in a LOCAL scratch folder of that worker (:func:`extract_staged`): its raw files, its own
staging tree, its quarantine entries and its key-store additions. It then uploads its part under
``<staging url>/<project>/<run id>/<study label>/`` and deletes the scratch (raw files included:
they are never uploaded, being identifying, and go when the study ends, E6). A part holds:

- ``files/<path>``: what the study added to the staging dataset (``sourcedata/sub-X/ses-Y``,
  ``sub-X/ses-Y``, ``prov/``, ``.pacs2bids/`` de-identification records, lineage part, logs,
  derivatives), pseudonymised;
- ``quarantine/<name>.fernet``: each quarantine file (a clinical file and its description),
  encrypted with a key derived from the project secret (HKDF purpose ``staging-part``);
- ``keys.journal``: the matching-key records the study appended, as the key store keeps them
  (one Fernet token per line: encrypted);
- ``manifest.json``, written LAST: every file's path, size and SHA-256.

The flow's machine first shares the matching key as it stands (:func:`share_key_store`, encrypted as
stored: the workers pseudonymise from what is known, as on a shared file system), then assembles
(:func:`assemble`): for each study it downloads the part, checks every file against the manifest,
appends the key records to the central key store, adds the quarantine entries (an id taken is
suffixed, as :func:`pacs2bids.quarantine.hold` does), and places the files into the run's staging
(replacing an earlier conversion of the session, as the converter does). A part missing, incomplete
or not matching its manifest makes that study failed, named in the summary; the run goes on. The
run's prefix is deleted once assembled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from .bids.layout import clear_session
from .bids.names import session_dir
from .checksum import sha256_file
from .deid.keyed import Keyed, derive_key, fernet_key
from .deid.keystore import KeyStore
from .errors import Pacs2BidsError
from .model import StudyRef
from .recorder import Recorder
from .run import RunContext, label
from .study import StudyResult, extract_study
from .targets.stores import open_store

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
KEYS_DIR = "_keys"  # the matching key as the run started, for the workers
KEY_FILES = ("keys.fernet", "keys.journal")


class StagingError(Pacs2BidsError):
    """The staging store cannot be used at the start of a run (unreachable, credentials refused or unset)."""


class PartError(Exception):
    """A study's part cannot be assembled (missing, incomplete, or not matching its manifest)."""


class _Remote:
    """The run's prefix on the staging store: ``<url>/<project>/<run id>``."""

    def __init__(self, spec, run_id: str):
        self.store = open_store(spec.staging.store_settings(), os.environ, None)
        self.fs = self.store.fs
        self.base = self.store.path(f"{spec.project}/{run_id}")
        self.url = f"{spec.staging.url}/{spec.project}/{run_id}"

    def at(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def remove(self, rel: str | None = None) -> None:
        """Delete a part (or the run's prefix); a store that fails here is logged, not raised (the next run
        of the project removes what is left, :func:`_remove_stale`)."""
        path = self.at(rel) if rel else self.base
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - cleaning up after a failure
            log.warning("staging: %s could not be deleted (%s); the next run of the project removes it",
                        path, _reason(exc))


def _cipher(spec) -> Fernet:
    """The key of the quarantine files in a part (apart from every other key of the project)."""
    return Fernet(base64.urlsafe_b64encode(derive_key(spec.secret_bytes, spec.project, "staging-part")))


# -- the flow's machine, before the studies -------------------------------------------------------
def share_key_store(ctx: RunContext, studies: list) -> None:
    """Upload the matching key's files, as stored (encrypted), for the workers to start from."""
    spec = ctx.spec
    if spec.staging is None or not studies:
        return
    remote = None
    try:
        remote = _Remote(spec, ctx.run_id)
        _remove_stale(remote)
        store = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
        with store._locked(exclusive=False):  # a consistent snapshot and journal
            for name in KEY_FILES:
                path = spec.resolved_key_store / name
                if path.exists():
                    remote.fs.pipe_file(remote.at(f"{KEYS_DIR}/{name}"), path.read_bytes())
    except Exception as exc:
        raise StagingError(
            f"the staging store {spec.staging.store_settings().label} cannot be used: {_reason(exc)}; check "
            "staging: in the spec (url, endpoint_url) and the environment variables it names") from None
    finally:
        if remote is not None:
            remote.store.close()


def _remove_stale(remote: _Remote) -> None:
    """Delete what runs of the project that were stopped before assembling left on the store: no other
    run of the project is alive (the flow holds the work folder's run lock), so every other run's prefix
    is stale."""
    project = remote.base.rsplit("/", 1)[0]
    try:
        others = [p for p in remote.fs.ls(project, detail=False) if p.rstrip("/") != remote.base]
    except FileNotFoundError:
        return
    for path in others:
        if remote.fs.find(path):  # an empty folder some stores keep a while after its objects went is no news
            log.warning("staging: removing %s, left by a run stopped before it assembled its studies", path)
        remote.fs.rm(path, recursive=True)


# -- a worker: one study -----------------------------------------------------------------------
def extract_staged(spec, study: StudyRef, ctx: RunContext, *, progress=None, log=log) -> StudyResult:
    """:func:`pacs2bids.study.extract_study` in a local scratch folder of this machine, then its
    part uploaded to the staging store; the scratch goes in every case. Never raises."""
    name = label(study.subject, study.session)
    root_dir = spec.staging.scratch_root()
    root_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"pacs2bids-{name}-", dir=root_dir))
    remote = None
    try:
        remote = _Remote(spec, ctx.run_id)
        local_spec, local_ctx, offset = _local(spec, ctx, root, remote)
        result = extract_study(local_spec, study, local_ctx, progress=progress, log=log)
        result.raw_done = []  # the raw files go with the scratch, now (never uploaded: they are identifying)
        upload_part(remote, local_ctx, result.label, offset)
        result.part = f"{remote.url}/{result.label}"
        return result
    except Exception as exc:  # one study's failure never stops the others
        if remote is not None:
            remote.remove(name)
        why = f"its result could not be staged on {spec.staging.store_settings().label}: {_reason(exc)}"
        log.error("%s: %s", name, why)
        return failed(spec, study, why)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if remote is not None:
            remote.store.close()


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, PartError) else str(exc)


def failed(spec, study: StudyRef, why: str) -> StudyResult:
    """A study that publishes nothing, with the reason in the summary and the lineage."""
    result = StudyResult(label(study.subject, study.session))
    Recorder(Keyed(spec.secret_bytes, spec.project), result.retrieval).study_failed(study, why)
    return result


def _local(spec, ctx: RunContext, root: Path, remote: _Remote) -> tuple:
    """This study's spec and run context, every folder under ``root``, with the shared matching key
    copied in; returns them and the copied journal's size (what the study appends comes after)."""
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    for name in KEY_FILES:
        try:
            data = remote.fs.cat_file(remote.at(f"{KEYS_DIR}/{name}"))
        except FileNotFoundError:
            continue
        (keys / name).write_bytes(data)
    journal = keys / "keys.journal"
    offset = journal.stat().st_size if journal.exists() else 0
    local_spec = spec.model_copy(update={
        "work_dir": root / "work",
        "pseudonymization": spec.pseudonymization.model_copy(update={"key_store": keys})})
    local_ctx = RunContext(local_spec, ctx.run_id, ctx.flow_run_id, root / "staging", ctx.versions, ctx.started)
    for d in (local_ctx.raw_root, local_ctx.quarantine, local_ctx.scratch, local_ctx.staging):
        d.mkdir(parents=True, exist_ok=True)
    return local_spec, local_ctx, (offset, _snapshot(keys))


def _snapshot(keys: Path) -> str | None:
    path = keys / "keys.fernet"
    return sha256_file(path) if path.exists() else None


def upload_part(remote: _Remote, ctx: RunContext, part: str, offset: tuple) -> None:
    """Upload what the study produced (see the module docstring), the manifest last."""
    entries: dict[str, dict] = {}

    def put(local: Path, rel: str) -> None:
        remote.store.put(local, remote.at(f"{part}/{rel}"))
        entries[rel] = {"size": local.stat().st_size, "sha256": sha256_file(local)}

    def pipe(data: bytes, rel: str) -> None:
        remote.fs.pipe_file(remote.at(f"{part}/{rel}"), data)
        entries[rel] = {"size": len(data), "sha256": _sha256(data)}

    for path in sorted(p for p in ctx.staging.rglob("*") if p.is_file()):
        put(path, f"files/{path.relative_to(ctx.staging).as_posix()}")
    cipher = _cipher(ctx.spec)
    for path in sorted(p for p in ctx.quarantine.iterdir() if p.is_file() and not p.name.startswith(".")):
        pipe(cipher.encrypt(path.read_bytes()), f"quarantine/{path.name}.fernet")
    keys = ctx.spec.resolved_key_store
    start, snapshot = offset
    if _snapshot(keys) != snapshot:  # compacted by this study: its records are no longer a journal tail
        raise PartError("the matching key was compacted during the study; raise the key store's compact_bytes")
    journal = keys / "keys.journal"
    added = journal.read_bytes()[start:] if journal.exists() else b""
    if added:
        pipe(added, "keys.journal")
    remote.fs.pipe_file(remote.at(f"{part}/{MANIFEST}"),
                        json.dumps({"files": entries}, indent=2, sort_keys=True).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the flow's machine, after the studies ------------------------------------------------------
def assemble(ctx: RunContext, studies: list[StudyRef], results: list[StudyResult]) -> list[StudyResult]:
    """Each study's part into the run's staging, quarantine and key store (see the module docstring);
    a study whose part cannot be assembled becomes a failed study. The run's prefix is deleted."""
    spec = ctx.spec
    if spec.staging is None or not results:
        return results
    remote = _Remote(spec, ctx.run_id)
    try:
        return [_assemble_one(ctx, remote, s, r) for s, r in zip(studies, results)]
    finally:
        remote.remove()
        remote.store.close()


def _assemble_one(ctx: RunContext, remote: _Remote, study: StudyRef, result: StudyResult) -> StudyResult:
    if result.part is None:  # failed before its part was staged: failed already
        return result
    into = Path(tempfile.mkdtemp(prefix=f"part-{result.label}-", dir=ctx.scratch))
    try:
        _fetch(remote, result.label, into)
        _merge_keys(ctx.spec, into / "keys.journal")
        _merge_quarantine(ctx, into / "quarantine")
        _place(ctx, study, into / "files")
        return result
    except Exception as exc:  # one study's failure never stops the others
        why = (f"its staged result ({result.part}) could not be assembled: {_reason(exc)}; nothing of this study "
               "is published, the next run extracts it again")
        log.error("%s: %s", result.label, why)
        return failed(ctx.spec, study, why)
    finally:
        shutil.rmtree(into, ignore_errors=True)
        remote.remove(result.label)


def _fetch(remote: _Remote, part: str, into: Path) -> None:
    """Download a part into ``into``, each file checked against the manifest (written last)."""
    try:
        manifest = json.loads(remote.fs.cat_file(remote.at(f"{part}/{MANIFEST}")))
    except FileNotFoundError:
        raise PartError("its manifest is missing (the upload did not finish)") from None
    files = sorted(manifest["files"].items())
    for rel, _ in files:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise PartError(f"the manifest names a path outside the part: {rel}")
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
    try:  # one call: the store's client downloads them concurrently
        remote.fs.get([remote.at(f"{part}/{rel}") for rel, _ in files], [str(into / rel) for rel, _ in files])
    except FileNotFoundError as exc:
        raise PartError(f"a file of the part is missing ({exc})") from None
    for rel, want in files:
        local = into / rel
        if not local.is_file():
            raise PartError(f"{rel} is missing")
        if local.stat().st_size != want["size"]:
            raise PartError(f"{rel} has {local.stat().st_size} bytes, its manifest says {want['size']}")
        if sha256_file(local) != want["sha256"]:
            raise PartError(f"{rel}: its SHA-256 differs from the manifest's (corrupted in the store)")


def _merge_keys(spec, journal: Path) -> None:
    """Append the study's matching-key records to the central key store (what a shared one would hold)."""
    if not journal.exists():
        return
    fernet = Fernet(fernet_key(spec.secret_bytes, spec.project))
    records = []
    for line in journal.read_bytes().splitlines():
        try:
            rec = json.loads(fernet.decrypt(line)) if line else None
        except InvalidToken:
            raise PartError("its matching-key records cannot be decrypted with this project's secret") from None
        if rec is not None and rec.get("project") != spec.project:
            raise PartError("its matching-key records belong to another project")
        if rec is not None:
            records.append(rec)
    store = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    for rec in records:
        store.record_series(rec["subject"], patient_ids=rec["patient_ids"], patient_names=rec["patient_names"],
                            studies=rec["studies"], identifiers=rec["identifiers"])


def _write(path: Path, data: bytes) -> None:
    """Write aside, then rename: a listed file is always whole (as the quarantine does)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        os.chmod(tmp, 0o600)
        f.write(data)
    os.replace(tmp, path)


def _merge_quarantine(ctx: RunContext, folder: Path) -> None:
    """Add the study's quarantine entries to the project's; an item id taken gets a suffix (``-2``...)."""
    if not folder.is_dir():
        return
    cipher = _cipher(ctx.spec)
    try:
        plain = {p.name.removesuffix(".fernet"): cipher.decrypt(p.read_bytes()) for p in sorted(folder.iterdir())}
    except InvalidToken:
        raise PartError("its quarantine entries cannot be decrypted with this project's secret") from None
    for name, data in plain.items():
        if name.endswith(".dcm") and f"{name[:-4]}.json" in plain:
            continue  # moved with its description
        if not name.endswith(".json"):
            _write(ctx.quarantine / name, data)
            continue
        item_id = new_id = name[:-5]
        n = 1
        while (ctx.quarantine / f"{new_id}.json").exists():
            n += 1
            new_id = f"{item_id}-{n}"
        if new_id != item_id:
            data = json.dumps({**json.loads(data), "id": new_id}, indent=2, sort_keys=True).encode()
        if f"{item_id}.dcm" in plain:
            _write(ctx.quarantine / f"{new_id}.dcm", plain[f"{item_id}.dcm"])
        _write(ctx.quarantine / f"{new_id}.json", data)  # the description last, as hold() does


def _place(ctx: RunContext, study: StudyRef, files: Path) -> None:
    """Move the part's files into the run's staging; the session's converted files replace those of an
    earlier conversion (as :func:`pacs2bids.bids.layout.clear_session` does on one machine)."""
    if not files.is_dir():
        return
    moved = sorted(p for p in files.rglob("*") if p.is_file())
    session = session_dir(study.subject, study.session).parts
    if any(p.relative_to(files).parts[:len(session)] == session for p in moved):
        clear_session(ctx.staging, study.subject, study.session)
    for p in moved:
        dest = ctx.staging / p.relative_to(files)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dest)
