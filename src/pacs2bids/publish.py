"""Publishing: ``output`` always names one complete dataset, the last one published.

Layout, beside ``output`` (same file system)::

    NAME -> .NAME.versions/<run_id>      a symlink: what readers open
    .NAME.versions/<run_id>/              each published version, whole
        .pacs2bids/dataset.json           the marker: this project's dataset (project, keyed fingerprint)
        .pacs2bids/published.json         the manifest of this version (run, time, previous, files)

A run builds its dataset in a staging folder (in the work folder, same file system), writes the
manifest, renames the staging folder into ``.NAME.versions/<run_id>`` (one rename: the version
is whole or absent), makes a new symlink beside ``output`` and renames it over ``output``:
``rename(2)`` replaces the old symlink atomically, so a reader sees the previous version or the
new one, never none and never half of one. Older versions are then pruned; the one replaced is
kept, so that a reader who opened it a moment ago can finish, and as a way back.

An ``output`` that is a real folder (published by an older pacs2bids) is migrated once: where
the kernel offers ``renameat2(RENAME_EXCHANGE)`` the folder and the new symlink are swapped in
one step; elsewhere the folder is moved into the versions and, should the process die before
the symlink is in place, :func:`recover` points ``output`` at the newest version at the next
start.

Remote targets (issue 13) slot in after :func:`publish_local`: the manifest names what a
version holds, and :func:`current_version` which version is current.

Test-only: when the environment variable ``PACS2BIDS_TEST_KILL_AT`` names one of
:data:`KILL_POINTS`, the process kills itself (SIGKILL) there, so that tests can check that
every interruption leaves a published dataset. Never set it outside tests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import json
import logging
import os
import shutil
import signal
import stat
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .errors import PublishError
from .targets.manifest import record_carried

log = logging.getLogger(__name__)

META = ".pacs2bids"
MARKER = f"{META}/dataset.json"
MANIFEST = f"{META}/published.json"
KEEP_PREVIOUS = 1  # versions kept besides the current one
KILL_POINTS = ("staged", "versioned", "linked", "swapped", "migrated-moved", "pruned")


def _test_point(name: str) -> None:
    """Test-only kill switch (see the module docstring)."""
    if os.environ.get("PACS2BIDS_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# -- locations ------------------------------------------------------------------------------
def versions_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.versions"


def staging_dir(output: Path, work_dir: Path, run_id: str) -> Path:
    """Where a run builds its dataset. It must be on ``output``'s file system for the final
    rename; the work folder sits beside ``output`` by default, so it is."""
    return work_dir / f"staging-{run_id}"


def current_version(output: Path) -> Path | None:
    """The version folder ``output`` names now (``output`` itself for an old real folder), or None."""
    if output.is_symlink():
        target = Path(os.path.realpath(output))
        return target if target.is_dir() else None
    return output if output.is_dir() else None


# -- the marker: whose dataset this is ------------------------------------------------------
def project_fingerprint(project: str, secret: bytes) -> str:
    """A keyed fingerprint of the project: tells one project's dataset from another's (and the
    same project name under another key) without revealing the key."""
    from pacs2bids.deid.keyed import derive_key  # every use of the secret has its own HKDF label

    key = derive_key(secret, project, "dataset-marker")
    return hmac.new(key, project.encode(), hashlib.sha256).hexdigest()[:32]


def write_marker(root: Path, project: str, secret: bytes) -> Path:
    path = root / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"project": project, "fingerprint": project_fingerprint(project, secret),
                                "tool": "pacs2bids"}, indent=2) + "\n")
    return path


def _legacy_project(root: Path) -> str | None:
    """The project an older pacs2bids published ``root`` for (from its run summaries), or None."""
    if not (root / "dataset_description.json").is_file():
        return None
    for summary in sorted((root / META / "runs").glob("run-*.json")):
        try:
            project = json.loads(summary.read_text()).get("project")
        except (OSError, ValueError, AttributeError):
            continue
        if project:
            return project
    return None


def output_owner_problem(output: Path, project: str, secret: bytes | None) -> str | None:
    """Why ``output`` may not be replaced by a dataset of ``project``, or None when it may: it is
    absent or empty, or pacs2bids published it for this project (with this key, when ``secret``
    is given). Anything else (another project's dataset, a folder holding other files) would be
    replaced whole by publishing, so it is refused."""
    if not output.exists():
        return None
    root = Path(os.path.realpath(output))
    if not root.is_dir() or not any(root.iterdir()):
        return None
    fix = ("give an empty or new folder as output (or move the folder away); pacs2bids replaces only a dataset it "
           f"published itself for project {project}")
    marker = root / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict) or data.get("project") != project:
            other = data.get("project") if isinstance(data, dict) else None
            return f"{output} holds the dataset of another project ({other!r}, not {project!r}); {fix}"
        if secret is not None and data.get("fingerprint") != project_fingerprint(project, secret):
            return (f"{output} holds a dataset of project {project} published with another key (its marker "
                    f"{MARKER} does not match the key in the environment); check the key, or {fix}")
        return None
    if _legacy_project(root) == project:  # published by an older pacs2bids: migrated at the next publish
        return None
    return f"{output} is not empty and holds no pacs2bids marker ({MARKER}) for project {project}; {fix}"


# -- seeding and recovery -------------------------------------------------------------------
def recover(output: Path) -> None:
    """Repair what a process killed during :func:`publish_local` may have left: ``output``
    missing while a version exists (a migration cut between its two steps) gets its symlink back
    to the newest version; stray temporary links and ``.NAME.previous-*`` folders of older
    releases are removed."""
    parent = output.parent
    if not parent.is_dir():
        return
    for stray in parent.glob(f".{output.name}.link-*"):
        if stray.is_symlink():
            stray.unlink()
    if not output.exists() and not output.is_symlink():
        versions = published_versions(output)
        if versions:
            _link(output, versions[-1], suffix="recover")
            log.info("output %s restored to its newest published version %s", output, versions[-1].name)
    if output.exists():  # the old two-rename publish's leftovers, once a dataset is in place
        for old in parent.glob(f".{output.name}.previous-*"):
            shutil.rmtree(old, ignore_errors=True)


def seed_staging(output: Path, staging: Path, *, merge: bool = False) -> None:
    """Start the staging folder from the published dataset, if any, so that a run adds to it.

    Reads through ``output``'s symlink (after :func:`recover`), so a re-run always starts from
    the last published version. A full copy, not hard links: conversion tools overwrite files
    in place, and a link would let them change the published dataset before the swap. What the
    copy carries unchanged is recorded for the targets' next manifest (``record_carried``).
    With ``merge``, what staging holds already (the run's log, opened before the query told
    whether the run has anything to publish) is kept and the dataset copied around it."""
    recover(output)
    if staging.exists() and not merge:
        shutil.rmtree(staging)
    current = current_version(output)
    if current is not None and any(current.iterdir()):
        shutil.copytree(current, staging, symlinks=True, dirs_exist_ok=merge)
        (staging / MANIFEST).unlink(missing_ok=True)  # describes the version copied, not the next one
        record_carried(current, staging)
    else:
        staging.mkdir(parents=True, exist_ok=merge)


# -- publishing -----------------------------------------------------------------------------
def published_versions(output: Path) -> list[Path]:
    """Published versions, oldest first (run ids start with a UTC timestamp)."""
    vdir = versions_dir(output)
    if not vdir.is_dir():
        return []
    return sorted((p for p in vdir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _link(output: Path, version: Path, suffix: str) -> None:
    """Point ``output`` at ``version`` with one rename of a new symlink over the old one."""
    tmp = output.parent / f".{output.name}.link-{suffix}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(version, output.parent), tmp)
    _test_point("linked")
    os.replace(tmp, output)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _path_order(path: str) -> str:
    """The sort key of a relative path in path order (component by component: ``a/b`` before ``a.txt``), as
    one string: ``/`` becomes NUL, lower than any character a name holds (a list of its parts per path took
    20 MB at 20 copies of the corpus, 60,000 files)."""
    return path.replace("/", "\0")


def _manifest(staging: Path, run_id: str, previous: str | None) -> dict:
    """Every regular file of ``staging`` (relative path: size), in path order; walked as strings (no
    ``Path`` per file: a project's files are many)."""
    files = {}
    for dirpath, _dirnames, filenames in os.walk(staging):
        rel = os.path.relpath(dirpath, staging).replace(os.sep, "/")
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files[name if rel == "." else f"{rel}/{name}"] = st.st_size
    return {"run_id": run_id, "published": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "previous": previous, "files": {k: files[k] for k in sorted(files, key=_path_order)}}


def publish_local(staging: Path, output: Path, run_id: str | None = None) -> Path:
    """Make ``staging`` the dataset ``output`` names, atomically for readers (see the module
    docstring); returns the new version's folder. The staging folder is moved, not copied.

    Raises :class:`PublishError` when staging and ``output`` are on different file systems or a
    rename fails; ``output`` then still names the previous version.
    """
    run_id = run_id or staging.name.removeprefix("staging-")
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    if os.stat(staging).st_dev != os.stat(parent).st_dev:
        raise PublishError(
            f"staging folder {staging} and output {output} are on different file systems; "
            "set work_dir in the spec to a folder on the output's file system"
        )
    recover(output)
    vdir = versions_dir(output)
    vdir.mkdir(exist_ok=True)
    before = current_version(output)
    legacy = before is not None and not output.is_symlink()  # a real folder, from an older pacs2bids
    if legacy and not any(output.iterdir()):
        output.rmdir()
        before, legacy = None, False
    previous = None if before is None or legacy else before.name
    manifest = staging / MANIFEST
    manifest.parent.mkdir(parents=True, exist_ok=True)
    doc = _manifest(staging, run_id, previous)  # before the manifest's own file is there
    with open(manifest, "w") as f:  # written as it is encoded, not held whole as one text first
        json.dump(doc, f, indent=1)
        f.write("\n")
    del doc
    _test_point("staged")
    version, n = vdir / run_id, 1
    while version.exists() or version.is_symlink():  # the same run id published twice (tests, retries)
        n += 1
        version = vdir / f"{run_id}.{n}"
    try:
        os.rename(staging, version)
        _test_point("versioned")
        if legacy:
            _migrate(output, version, run_id)
        else:
            _link(output, version, suffix=run_id)
    except OSError as exc:
        raise PublishError(f"cannot publish {staging} as {output}: {exc.strerror or exc}") from exc
    _test_point("swapped")
    _prune(output, keep={version.name, previous})
    _test_point("pruned")
    log.info("published dataset at %s (version %s)", output, run_id)
    return version


def _migrate(output: Path, version: Path, run_id: str) -> None:
    """Replace the real folder ``output`` with a symlink to ``version``; the old folder becomes
    a version too (``legacy-<run_id>``), kept as the previous one."""
    legacy = versions_dir(output) / f"legacy-{run_id}"
    tmp = output.parent / f".{output.name}.link-{run_id}"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(os.path.relpath(version, output.parent), tmp)
    if _exchange(tmp, output):  # output is now the symlink; tmp the old folder
        os.rename(tmp, legacy)
        return
    os.rename(output, legacy)  # no exchange: a short gap, repaired by recover() if we die here
    _test_point("migrated-moved")
    os.replace(tmp, output)


def _prune(output: Path, keep: set[str | None]) -> None:
    """Remove versions other than the current one and the ``KEEP_PREVIOUS`` newest before it."""
    versions = [v for v in published_versions(output) if v.name not in keep]
    spare = KEEP_PREVIOUS - len([k for k in keep if k]) + 1
    for v in versions[: max(0, len(versions) - spare)]:
        shutil.rmtree(v, ignore_errors=True)
    for old in output.parent.glob(f".{output.name}.previous-*"):
        shutil.rmtree(old, ignore_errors=True)


# -- the work folder's leftovers --------------------------------------------------------------
class RunLock:
    """Held (shared) by every run of a project for its whole life, on ``work/run.lock``: a
    run that can take it exclusively knows no other run of the project is alive, so the staging
    and scratch folders it finds are those of killed runs and may go. The kernel drops a dead
    process's lock (``flock``), so a SIGKILL leaves nothing to clear by hand."""

    def __init__(self, work: Path):
        self.path = work / "run.lock"
        self._fd: int | None = None

    def acquire(self, keep: tuple[Path, ...] = ()) -> list[Path]:
        """Take the lock; when no other run is alive, remove stale ``staging-*`` and
        ``scratch-*`` folders (except ``keep``) and return them."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        removed: list[Path] = []
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another run of this project is alive: its work folders are left alone")
        else:
            removed = remove_leftovers(self.path.parent, keep=keep)
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return removed

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_leftovers(work: Path, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Remove the ``staging-*`` and ``scratch-*`` folders in ``work`` (but ``keep``); returns them.
    Call only when no run of the project is alive (:class:`RunLock`)."""
    removed = []
    for pattern in ("staging-*", "scratch-*"):
        for p in work.glob(pattern):
            if p.is_dir() and p not in keep:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    if removed:
        log.info("removed %d staging or scratch folder(s) left by earlier runs", len(removed))
    return removed


@contextmanager
def work_area(ctx, *, seed: bool = True) -> Iterator[None]:
    """The run's folders (:class:`pacs2bids.run.RunContext`): the private work folder (0700), its
    ``raw``, ``quarantine`` and this run's ``scratch``, and the staging dataset seeded from the
    published one; :class:`RunLock` held throughout. On leaving, scratch and staging go (staging
    is gone already when published; a failed run's must not linger)."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.work.chmod(0o700)
    with RunLock(ctx.work):  # stale staging/scratch of killed runs go when no run is alive
        try:
            for d in (ctx.raw_root, ctx.quarantine, ctx.scratch):
                d.mkdir(parents=True, exist_ok=True)
            if seed:  # else the flow seeds once it knows the run has something new (seed_staging(merge=True))
                seed_staging(ctx.spec.output, ctx.staging)
            else:
                recover(ctx.spec.output)
                ctx.staging.mkdir(parents=True, exist_ok=True)
            yield
        finally:
            shutil.rmtree(ctx.scratch, ignore_errors=True)
            shutil.rmtree(ctx.staging, ignore_errors=True)
