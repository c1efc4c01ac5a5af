"""Publishing a local version to any fsspec file system (S3, SFTP, a folder), atomically for readers.

Layout under the target's prefix::

    versions/<version>/...              a whole published version (its BIDS tree, .pacs2bids/ included)
    versions/<version>/.pacs2bids/manifest.json   every file's path, size and SHA-256
    CURRENT.json                        which version is current, and its manifest's SHA-256
    .pacs2bids-lock.json                while a run publishes (lock.py)

A reader reads ``CURRENT.json``, then the version it names: that version is whole, since
``CURRENT.json`` is written last, in one step (one PUT on S3, a rename over it on SFTP and in a
folder), and only after every file of the version was checked. The version it replaced is kept
(a reader who read ``CURRENT.json`` a moment ago can finish); older ones are removed.

Incremental and resumable: a file already in the new version's folder with the right size and
SHA-256 (what an interrupted publish sent) is kept; one unchanged since the current version is
copied on the server (S3 CopyObject, SFTP and folders a hard link: no byte sent); only the rest
is sent. A version equal to the current one (same version, same manifest) sends and writes
nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from ..config.targets import StorageTargetSettings
from . import TargetError, TargetReport
from .errors import blank_secrets, describe
from .lock import TargetLock
from .manifest import MANIFEST_PATH, encode, manifest_sha256, read_manifest
from .stores import Store, open_store

CURRENT = "CURRENT.json"
VERSIONS = "versions"
MARKER = ".pacs2bids/dataset.json"
PUBLISHED = ".pacs2bids/published.json"  # the local manifest, published with the version (its "published" time)


class FsspecTarget:
    """A storage target (see the module docstring); ``publish`` is its one entry point."""

    def __init__(self, settings: StorageTargetSettings, *, project: str, fingerprint: str | None,
                 environ: Mapping[str, str], block: Mapping[str, str] | None = None):
        self.settings, self.project, self.fingerprint = settings, project, fingerprint
        self.name = settings.label
        self._environ, self._block = environ, block

    # -- entry point ------------------------------------------------------------------
    def publish(self, version: Path, manifest: dict, *, log) -> TargetReport:
        report = TargetReport(target=self.name, version=version.name)
        started = time.monotonic()
        store = None
        try:
            store = open_store(self.settings, self._environ, self._block)
            with TargetLock(store, run=version.name, wait_seconds=self.settings.lock_wait_seconds):
                self._publish(store, version, manifest, report, log)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of the store, named for the researcher
            why = blank_secrets(describe(exc, self.settings), self._environ, self.settings)
            raise TargetError(f"target {self.name}: {why}; what it held before is unchanged, and the next run "
                              "resumes this publish") from None
        finally:
            if store is not None:
                store.close()
            report.seconds = round(time.monotonic() - started, 3)
        return report

    # -- retention (pacs2bids.purge) ----------------------------------------------------
    def versions(self) -> list[dict]:
        """The versions the target holds: ``{"version", "published" (ISO UTC or None), "current"}``."""
        store = open_store(self.settings, self._environ, self._block)
        try:
            current = (self._current(store) or {}).get("version")
            try:
                folders = store.fs.ls(store.path(VERSIONS), detail=False)
            except FileNotFoundError:
                folders = []
            out = []
            for folder in sorted(folders):
                name = folder.rstrip("/").rsplit("/", 1)[-1]
                try:
                    published = json.loads(store.fs.cat_file(f"{folder.rstrip('/')}/{PUBLISHED}")).get("published")
                except (FileNotFoundError, ValueError, AttributeError):
                    published = None
                out.append({"version": name, "published": published, "current": name == current})
            return out
        except Exception as exc:  # noqa: BLE001 - named for the operator
            raise TargetError(f"target {self.name}: cannot list its versions: "
                              f"{blank_secrets(describe(exc, self.settings), self._environ, self.settings)}") from None
        finally:
            store.close()

    def delete_version(self, version: str, *, log) -> None:
        """Delete one version (fsspec ``rm``), under the target's lock. Deleting the current
        version deletes ``CURRENT.json`` first: readers then find no dataset, never half of one."""
        store = open_store(self.settings, self._environ, self._block)
        try:
            with TargetLock(store, run=f"purge-{version}", wait_seconds=self.settings.lock_wait_seconds):
                current = self._current(store)
                self._check_owner(store, current)
                if (current or {}).get("version") == version:
                    store.fs.rm_file(store.path(CURRENT))
                try:
                    store.fs.rm(store.path(f"{VERSIONS}/{version}"), recursive=True)
                except FileNotFoundError:
                    pass
            log.info("target %s: version %s deleted", self.name, version)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - named for the operator
            raise TargetError(f"target {self.name}: cannot delete version {version}: "
                              f"{blank_secrets(describe(exc, self.settings), self._environ, self.settings)}") from None
        finally:
            store.close()

    # -- the steps --------------------------------------------------------------------
    def _publish(self, store: Store, version: Path, manifest: dict, report: TargetReport, log) -> None:
        current = self._current(store)
        self._check_owner(store, current)
        digest = manifest_sha256(manifest)
        if current and current.get("version") == version.name and current.get("manifest_sha256") == digest:
            report.skipped_files, report.verified, report.state = len(manifest["files"]), True, "unchanged"
            log.info("target %s: version %s is current already, nothing sent", self.name, version.name)
            return
        vdir = store.path(f"{VERSIONS}/{version.name}")
        previous = self._previous_manifest(store, current)
        there = self._listing(store, vdir)
        checked = self._send(store, version, manifest, vdir, previous, there, report)
        self._verify(store, manifest, vdir, checked)
        store.replace(f"{vdir}/{MANIFEST_PATH}", encode(manifest))
        report.verified = True
        store.replace(store.path(CURRENT), self._current_body(version.name, manifest, digest))
        self._prune(store, keep={version.name, (current or {}).get("version")})
        log.info("target %s: version %s published: %d file(s) sent (%d bytes), %d copied on the server, %d already "
                 "there; verified", self.name, version.name, report.sent_files, report.sent_bytes,
                 report.copied_files, report.skipped_files)

    def _current(self, store: Store) -> dict | None:
        try:
            data = json.loads(store.fs.cat_file(store.path(CURRENT)))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _check_owner(self, store: Store, current: dict | None) -> None:
        """Refuse a prefix holding another dataset: another project's (or key's) CURRENT, or files
        pacs2bids did not publish."""
        fix = (f"give this target a prefix of its own, or remove what is there; pacs2bids replaces only a dataset it "
               f"published itself for project {self.project}")
        if current is not None:
            if current.get("project") != self.project:
                raise TargetError(f"target {self.name} holds the dataset of another project "
                                  f"({current.get('project')!r}, not {self.project!r}); {fix}")
            if self.fingerprint and current.get("fingerprint") not in (None, self.fingerprint):
                raise TargetError(f"target {self.name} holds a dataset of project {self.project} published with "
                                  f"another key; check the key, or {fix}")
            return
        try:
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.root, detail=False)}
        except FileNotFoundError:
            return
        foreign = names - {VERSIONS, ".pacs2bids-lock.json"}
        if foreign or self._foreign_versions(store):
            raise TargetError(f"target {self.name} is not empty and holds no pacs2bids dataset of project "
                              f"{self.project} ({CURRENT} is missing); {fix}")

    def _foreign_versions(self, store: Store) -> bool:
        """True when a version folder there (a publish never finished) is another project's."""
        try:
            folders = store.fs.ls(store.path(VERSIONS), detail=False)
        except FileNotFoundError:
            return False
        for folder in folders:
            try:
                marker = json.loads(store.fs.cat_file(f"{folder.rstrip('/')}/{MARKER}"))
            except (FileNotFoundError, ValueError):
                continue
            if not isinstance(marker, dict) or marker.get("project") != self.project:
                return True
        return False

    def _previous_manifest(self, store: Store, current: dict | None) -> dict:
        """The current version's manifest (files to copy on the server), or an empty one."""
        if not current or not current.get("version"):
            return {"files": {}, "version": None}
        try:
            data = store.fs.cat_file(store.path(f"{VERSIONS}/{current['version']}/{MANIFEST_PATH}"))
            if hashlib.sha256(data).hexdigest() != current.get("manifest_sha256"):
                return {"files": {}, "version": None}  # not the manifest CURRENT names: copy nothing from it
            return read_manifest(data)
        except (FileNotFoundError, ValueError):
            return {"files": {}, "version": None}

    def _listing(self, store: Store, vdir: str) -> dict[str, int]:
        """What the new version's folder holds already (an interrupted publish): relative path -> size."""
        try:
            found = store.fs.find(vdir, detail=True)
        except FileNotFoundError:
            return {}
        prefix = vdir.rstrip("/").lstrip("/") + "/"
        out = {}
        for path, info in found.items():
            if info.get("type") == "file":
                out[path.lstrip("/").removeprefix(prefix)] = int(info.get("size") or 0)
        return out

    def _send(self, store: Store, version: Path, manifest: dict, vdir: str, previous: dict,
              there: dict[str, int], report: TargetReport) -> set[str]:
        """Put every file of the manifest in ``vdir``; returns the files to re-read at verification.
        The marker goes first: a half-sent version is recognised as this project's. Copies and uploads
        go in batches (concurrent where the store's library does so: s3fs)."""
        files = manifest["files"]
        for rel in sorted(set(there) - set(files) - {MANIFEST_PATH}):  # partial files (.part) of a cut upload
            try:
                store.fs.rm_file(f"{vdir}/{rel}")
            except FileNotFoundError:
                pass
        resumed = [rel for rel in files if there.get(rel) == files[rel]["size"]]
        digests = store.sha256_many({f"{vdir}/{rel}": files[rel]["size"] for rel in resumed})
        kept = {rel for rel in resumed if digests[f"{vdir}/{rel}"] == files[rel]["sha256"]}
        report.skipped_files = len(kept)
        prev_dir = store.path(f"{VERSIONS}/{previous.get('version')}") if previous.get("version") else None
        unchanged = {rel for rel in files if rel not in kept and prev_dir and previous["files"].get(rel) == files[rel]}
        todo = [rel for rel in files if rel not in kept]
        reread: set[str] = set()
        for batch in ([rel for rel in todo if rel == MARKER], [rel for rel in todo if rel != MARKER]):
            copies = [rel for rel in batch if rel in unchanged]
            copied = store.copy_many([(f"{prev_dir}/{rel}", f"{vdir}/{rel}") for rel in copies])
            report.copied_files += len(copied)
            if self.settings.verify == "all":
                reread |= {rel for rel in copies if f"{vdir}/{rel}" in copied}
            puts = [rel for rel in batch if rel not in unchanged or f"{vdir}/{rel}" not in copied]
            store.put_many([(version / rel, f"{vdir}/{rel}") for rel in puts])
            report.sent_files += len(puts)
            report.sent_bytes += sum(files[rel]["size"] for rel in puts)
            reread |= set(puts)
        return reread

    def _verify(self, store: Store, manifest: dict, vdir: str, reread: set[str]) -> None:
        """Every file's size (all), and SHA-256 of ``reread``, against the manifest."""
        sizes = self._listing(store, vdir)
        wrong = [rel for rel, e in manifest["files"].items() if sizes.get(rel) != e["size"]]
        digests = store.sha256_many({f"{vdir}/{rel}": manifest["files"][rel]["size"] for rel in sorted(reread)
                                     if rel not in wrong})
        wrong += [rel for rel in sorted(reread) if rel not in wrong
                  and digests[f"{vdir}/{rel}"] != manifest["files"][rel]["sha256"]]
        if wrong:
            raise TargetError(f"target {self.name}: {len(wrong)} file(s) differ from the manifest after the upload "
                              f"(first: {wrong[0]}); the current version is unchanged, run again to resend them")

    def _current_body(self, version: str, manifest: dict, digest: str) -> bytes:
        return (json.dumps({
            "format": "pacs2bids-current/1", "project": self.project, "fingerprint": self.fingerprint,
            "version": version, "path": f"{VERSIONS}/{version}/", "manifest": f"{VERSIONS}/{version}/{MANIFEST_PATH}",
            "manifest_sha256": digest, "files": len(manifest["files"]), "bytes": manifest.get("total_bytes"),
            "published": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1) + "\n").encode()

    def _prune(self, store: Store, keep: set[str | None]) -> None:
        """Remove the versions but the new one and the one it replaced (and half-sent ones)."""
        try:
            folders = store.fs.ls(store.path(VERSIONS), detail=False)
        except FileNotFoundError:
            return
        for folder in folders:
            if folder.rstrip("/").rsplit("/", 1)[-1] not in keep:
                store.fs.rm(folder, recursive=True)
