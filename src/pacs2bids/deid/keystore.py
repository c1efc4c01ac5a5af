"""The matching key ("clé d'appariement", P1): subject code <-> original patient identifiers.

Lives in its own folder (``spec.resolved_key_store``), never under the dataset. Encrypted at
rest with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``), whose key is derived from
the project secret by HKDF-SHA256 with the distinct info ``pacs2bids/<project>/keystore``
(:func:`pacs2bids.deid.keyed.fernet_key`): the UID and date keys cannot be derived from it, nor
it from them. Files:

- ``keys.fernet``: one Fernet token holding the JSON document
  ``{"project", "subjects": {code: {"patient_ids", "patient_names", "studies"}}, "identifiers"}``;
- ``audit.fernet``: one Fernet token per line, each an audit record
  ``{"who", "when", "what", "subject"}`` (S2): appended, never rewritten.

Writes take an exclusive ``flock`` on ``.lock`` and replace the file atomically.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from cryptography.fernet import Fernet, InvalidToken

from ..errors import PseudonymisationError
from .keyed import fernet_key


class KeyStore:
    """The encrypted matching key of one project, in folder ``path``."""

    def __init__(self, path: Path, *, project: str, secret: bytes):
        self.path = Path(path)
        self.project = project
        self._fernet = Fernet(fernet_key(secret, project))
        self._keys = self.path / "keys.fernet"
        self._audit = self.path / "audit.fernet"

    # -- storage -------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict:
        if not self._keys.exists():
            return {"project": self.project, "subjects": {}, "identifiers": []}
        try:
            doc = json.loads(self._fernet.decrypt(self._keys.read_bytes()))
        except InvalidToken:
            raise PseudonymisationError(
                f"key store {self._keys} cannot be decrypted with this project's secret; "
                "check the secret's environment variable (a different secret gives different pseudonyms)"
            ) from None
        if doc.get("project") != self.project:
            raise PseudonymisationError(f"key store {self._keys} belongs to another project; point key_store elsewhere")
        return doc

    def _save(self, doc: dict) -> None:
        tmp = self._keys.with_suffix(".tmp")
        tmp.write_bytes(self._fernet.encrypt(json.dumps(doc, sort_keys=True).encode()))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self._keys)

    # -- API -----------------------------------------------------------------------------
    def identifiers(self) -> set[str]:
        """The identifying values recorded so far (for cleaning and leak scanning)."""
        with self._locked():
            return set(self._load().get("identifiers", []))

    def subjects(self) -> list[str]:
        with self._locked():
            return sorted(self._load()["subjects"])

    def record_series(
        self,
        subject: str,
        *,
        patient_ids: Iterable[str],
        patient_names: Iterable[str],
        studies: dict[str, dict],
        identifiers: Iterable[str],
    ) -> None:
        """Add what one series taught about ``subject`` (idempotent)."""
        with self._locked():
            doc = self._load()
            entry = doc["subjects"].setdefault(subject, {"patient_ids": [], "patient_names": [], "studies": {}})
            entry["patient_ids"] = sorted(set(entry["patient_ids"]) | set(patient_ids))
            entry["patient_names"] = sorted(set(entry["patient_names"]) | set(patient_names))
            for uid, info in studies.items():
                entry["studies"].setdefault(uid, info)
            doc["identifiers"] = sorted(set(doc["identifiers"]) | set(identifiers))
            self._save(doc)

    def reidentify(self, subject: str, *, reason: str = "") -> dict:
        """The original identifiers of ``subject``; appends an audit record first (S2).

        Raises :class:`KeyError` (after auditing the attempt) when the subject is unknown.
        """
        with self._locked():
            doc = self._load()
            entry = doc["subjects"].get(subject)
            self._append_audit(
                {
                    "who": getpass.getuser(),
                    "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "what": "reidentify" if entry is not None else "reidentify (unknown subject)",
                    "subject": subject,
                    "reason": reason,
                }
            )
        if entry is None:
            raise KeyError(f"subject {subject!r} is not in the key store of project {self.project}")
        return {"subject": subject, **entry}

    def _append_audit(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = self._fernet.encrypt(json.dumps(record, sort_keys=True).encode())
        with open(self._audit, "ab") as f:
            f.write(token + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def audit_log(self) -> list[dict]:
        """Every audit record, oldest first."""
        if not self._audit.exists():
            return []
        out = []
        for line in self._audit.read_bytes().splitlines():
            if line.strip():
                out.append(json.loads(self._fernet.decrypt(line)))
        return out
