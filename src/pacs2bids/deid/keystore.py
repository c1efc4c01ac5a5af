"""The matching key ("clé d'appariement", P1): subject code <-> original patient identifiers.

Lives in its own folder (``spec.resolved_key_store``), never under the dataset. Encrypted at
rest with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``), whose key is derived from
the project secret by HKDF-SHA256 with the distinct info ``pacs2bids/<project>/keystore``
(:func:`pacs2bids.deid.keyed.fernet_key`): the UID and date keys cannot be derived from it, nor
it from them. Files:

- ``keys.journal``: one Fernet token per line, each what one series taught
  ``{"project", "subject", "patient_ids", "patient_names", "studies", "identifiers"}``;
  appended (one line per :meth:`KeyStore.record_series`) and fsync'd, never rewritten, so
  recording a series costs the size of that series, not of the project;
- ``keys.fernet``: the snapshot, one Fernet token holding the folded document
  ``{"project", "subjects": {code: {"patient_ids", "patient_names", "studies"}}, "identifiers"}``
  (the whole store before journals existed: such a file keeps loading as it is);
- ``audit.jsonl``: the re-identification audit (S2, :mod:`pacs2bids.deid.reidentify`), one chained JSON record per attempt
  (:mod:`pacs2bids.auditchain`): ``{"seq", "who", "uid", "claimed_who"?, "when", "what",
  "subject", "reason", "prev", "mac"}``, appended, never rewritten. ``who`` is the OS account of
  the real uid; ``claimed_who`` the name ``$LOGNAME``/``$USER`` gave, when it differs. The
  reason is Fernet-encrypted (a person may type more than they should). Each record holds the
  SHA-256 of the one before and an HMAC under the project's log key
  (:func:`pacs2bids.deid.keyed.audit_mac_key`), so a line deleted, edited or moved is found by
  :meth:`KeyStore.verify_audit` (``pacs2bids audit SPEC``). An attempt with a wrong secret is
  recorded too, hash-chained but unsigned (``"what": "refused (wrong secret)"``, the reason kept
  as its SHA-256 only), and sealed by the next signed record. A reason of at least
  :data:`MIN_REASON` characters is required; an attempt without one is recorded and refused.
- ``audit.fernet``: the audit of older versions (one Fernet token per line, unchained). It is no
  longer written; the first ``audit.jsonl`` record holds its SHA-256 (``sealed_legacy``).

The store is the snapshot with every journal record folded in (unions; a study's first
record wins). When the journal grows past :data:`COMPACT_BYTES` and past the snapshot, the writer
folds it into a new snapshot (written aside, then ``os.replace``) and empties the journal the same
way; a crash between the two leaves records folded twice, which changes nothing. A line
without its final newline was never committed (a crash mid-write): readers ignore it and the
next writer cuts it off. Every access takes ``flock`` on ``.lock`` (shared to read, exclusive
to write).

A process keeps what it has decrypted (one cache per store, secret and project): a later read
decrypts only the journal lines appended since, so a series task opens the matching key in
time proportional to what other tasks recorded meanwhile, not to the project's size. A new
snapshot or journal (compaction, or a file replaced by hand) is noticed by its inode, size and
modification time and read again whole. Lines already read are not authenticated again by
the same process: a change to them is seen by the next process that opens the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from cryptography.fernet import Fernet, InvalidToken

from ..errors import PseudonymisationError
from .keyed import audit_mac_key, fernet_key
from .patterns import looks_like_uid
from .reidentify import ReidentificationAudit

#: The writer whose append takes the journal past this size, and past the snapshot's size, folds
#: the journal into the snapshot: compaction then costs, amortised, a constant per byte recorded.
COMPACT_BYTES = 16 * 1024 * 1024

@dataclass
class _Folded:
    """What one process has decrypted of one store: the files it read (``files``, see
    :meth:`KeyStore._files`), the journal up to byte ``offset``, and the document they fold
    into, but its identifiers: those that are not UIDs (``values``) alone. The original UIDs, one
    per instance, are read again when asked for (:meth:`KeyStore._all_identifiers`: the leak scan,
    once a run, and compaction): cached, they grew with the project for the whole run (18 MB at
    20 copies of the corpus)."""

    files: tuple
    offset: int
    doc: dict
    values: set[str] = field(default_factory=set)


_CACHE: dict[tuple, _Folded] = {}
_CACHE_LOCK = threading.Lock()  # flock does not order the threads of one process holding it shared


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyStore(ReidentificationAudit):
    """The encrypted matching key of one project, in folder ``path``; its re-identification
    and audit log come from :class:`~pacs2bids.deid.reidentify.ReidentificationAudit`."""

    def __init__(self, path: Path, *, project: str, secret: bytes, compact_bytes: int = COMPACT_BYTES):
        self.path = Path(path)
        self.project = project
        self.compact_bytes = compact_bytes
        key = fernet_key(secret, project)
        self._fernet = Fernet(key)
        self._cache_key = (str(self.path.resolve()), project, hashlib.sha256(key).hexdigest())
        self._keys = self.path / "keys.fernet"
        self._journal = self.path / "keys.journal"
        self._audit = self.path / "audit.jsonl"
        self._legacy_audit = self.path / "audit.fernet"
        self._mac_key = audit_mac_key(secret, project)

    # -- storage -------------------------------------------------------------------------
    @contextmanager
    def _locked(self, exclusive: bool = True) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _decrypt(self, token: bytes, where: Path, *, own_project: bool = True) -> dict:
        try:
            doc = json.loads(self._fernet.decrypt(token))
        except InvalidToken:
            raise PseudonymisationError(
                f"key store {where} cannot be decrypted with this project's secret; "
                "check the secret's environment variable (a different secret gives different pseudonyms)"
            ) from None
        if own_project and doc.get("project") != self.project:
            raise PseudonymisationError(f"key store {where} belongs to another project; point key_store elsewhere")
        return doc

    def _journal_tail(self, offset: int) -> tuple[list[bytes], int]:
        """The committed journal lines from byte ``offset`` on, and the offset after the last
        (a trailing line without its newline never was)."""
        try:
            with open(self._journal, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], 0
        end = data.rfind(b"\n") + 1
        return [line for line in data[:end].split(b"\n") if line], offset + end

    def _files(self) -> tuple[tuple, int]:
        """Which snapshot and journal are there now: ((snapshot inode, size, mtime; journal
        inode), journal size). Compaction replaces both files, so both inodes change."""
        try:
            st = self._keys.stat()
            snapshot = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            snapshot = None
        try:
            st = self._journal.stat()
            return (snapshot, st.st_ino), st.st_size
        except FileNotFoundError:
            return (snapshot, None), 0

    def _load(self) -> _Folded:
        """The snapshot with every committed journal record folded in (without ``identifiers``:
        :class:`_Folded`). Shared with the rest of the process: read it, never change it.
        The caller holds the store's flock."""
        with _CACHE_LOCK:
            files, journal_size = self._files()
            folded = _CACHE.pop(self._cache_key, None)
            if folded is None or folded.files != files or journal_size < folded.offset:
                doc = {"project": self.project, "subjects": {}, "identifiers": []}
                if files[0] is not None:
                    doc = self._decrypt(self._keys.read_bytes(), self._keys)
                doc.setdefault("subjects", {})
                values = {v for v in doc.pop("identifiers", []) if not looks_like_uid(v)}
                folded = _Folded(files, 0, doc, values)
            lines, offset = self._journal_tail(folded.offset)
            for line in lines:  # a failure leaves nothing cached: the next read starts again
                self._fold(folded, self._decrypt(line, self._journal))
            folded.offset = max(offset, folded.offset)
            _CACHE[self._cache_key] = folded
            return folded

    @staticmethod
    def _fold(folded: _Folded, rec: dict) -> None:
        """Fold one journal record in: unions; a study's first record wins."""
        subjects = folded.doc["subjects"]
        entry = subjects.setdefault(rec["subject"], {"patient_ids": [], "patient_names": [], "studies": {}})
        entry["patient_ids"] = sorted(set(entry["patient_ids"]) | set(rec["patient_ids"]))
        entry["patient_names"] = sorted(set(entry["patient_names"]) | set(rec["patient_names"]))
        for uid, info in rec["studies"].items():
            entry["studies"].setdefault(uid, info)
        folded.values.update(v for v in rec["identifiers"] if not looks_like_uid(v))

    def _all_identifiers(self) -> set[str]:
        """Every identifier recorded (the snapshot's and the committed journal's), read from the files
        now, not cached (:class:`_Folded`). The caller holds the store's flock."""
        found: set[str] = set()
        if self._keys.exists():
            found.update(self._decrypt(self._keys.read_bytes(), self._keys).get("identifiers", []))
        lines, _end = self._journal_tail(0)
        for line in lines:
            found.update(self._decrypt(line, self._journal)["identifiers"])
        return found

    @staticmethod
    def forget_cache() -> None:
        """Drop what this process has decrypted of every store (tests, benchmarks)."""
        with _CACHE_LOCK:
            _CACHE.clear()

    def _append(self, record: dict) -> int:
        """Append one record to the journal and fsync it; returns the journal's size in bytes.
        Reads only the journal's tail (to cut off a line a crash left without its newline)."""
        token = self._fernet.encrypt(json.dumps(record, sort_keys=True).encode())
        with open(self._journal, "ab+") as f:
            os.chmod(self._journal, 0o600)
            end = f.seek(0, os.SEEK_END)
            committed = end
            while committed > 0:
                f.seek(max(0, committed - 4096))
                chunk = f.read(committed - max(0, committed - 4096))
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    committed = committed - len(chunk) + cut + 1
                    break
                committed -= len(chunk)
            if committed != end:  # a torn line: never committed
                f.truncate(committed)
            f.write(token + b"\n")
            f.flush()
            os.fsync(f.fileno())
            return f.tell()

    def _replace(self, target: Path, data: bytes) -> None:
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            os.chmod(tmp, 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(self.path)

    def compact(self) -> None:
        """Fold the journal into the snapshot (atomic replace of each file)."""
        with self._locked():
            self._compact()

    def _compact(self) -> None:
        folded = self._load()
        doc = {**folded.doc, "identifiers": sorted(self._all_identifiers())}
        self._replace(self._keys, self._fernet.encrypt(json.dumps(doc, sort_keys=True).encode()))
        self._replace(self._journal, b"")
        with _CACHE_LOCK:  # the same document, now from the new files: nothing to read again
            folded.files, folded.offset = self._files()[0], 0
            _CACHE[self._cache_key] = folded

    # -- API -----------------------------------------------------------------------------
    def identifiers(self) -> set[str]:
        """The identifying values recorded so far (for cleaning and leak scanning)."""
        with self._locked(exclusive=False):
            return self._all_identifiers()

    def values(self) -> frozenset[str]:
        """The recorded identifiers that are not UIDs (names, IDs, accession numbers...): what
        is searched for in text. Grows with the patients, not with the instances."""
        with self._locked(exclusive=False):
            return frozenset(self._load().values)

    def study_dates(self, subject: str) -> set[str]:
        """The dates (``YYYYMMDD``) of the studies recorded for ``subject``: shifted wherever a
        later series quotes them in its text."""
        with self._locked(exclusive=False):
            studies = self._load().doc["subjects"].get(subject, {}).get("studies", {})
            return {str(s.get("study_date") or "") for s in studies.values()} - {""}

    def subjects(self) -> list[str]:
        with self._locked(exclusive=False):
            return sorted(self._load().doc["subjects"])

    def record_series(
        self,
        subject: str,
        *,
        patient_ids: Iterable[str],
        patient_names: Iterable[str],
        studies: dict[str, dict],
        identifiers: Iterable[str],
    ) -> None:
        """Add what one series taught about ``subject``: one journal line (idempotent when
        folded). Compacts the journal once it is larger than ``compact_bytes`` and the snapshot."""
        record = {
            "project": self.project,
            "subject": subject,
            "patient_ids": sorted(set(patient_ids)),
            "patient_names": sorted(set(patient_names)),
            "studies": studies,
            "identifiers": sorted(set(identifiers)),
        }
        with self._locked():
            size = self._append(record)
            if size > max(self.compact_bytes, self._keys.stat().st_size if self._keys.exists() else 0):
                self._compact()
