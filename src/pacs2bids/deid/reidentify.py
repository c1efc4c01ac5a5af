"""Re-identification of a subject from the matching key, and its audit log (S2).

Every attempt is appended to ``audit.jsonl`` in the key store's folder before anything is
returned: a chained JSON record (:mod:`pacs2bids.auditchain`) signed with the project's log key,
or hash-chained but unsigned for a wrong secret. The file layout is described in
:mod:`pacs2bids.deid.keystore`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from cryptography.fernet import InvalidToken

from .. import auditchain
from ..errors import Pacs2BidsError, PseudonymisationError

#: the shortest reason a re-identification is accepted with (characters, blanks not counted)
MIN_REASON = 10
#: binds the audit log's MACs to this log (quarantine decisions have their own)
AUDIT_CONTEXT = "pacs2bids/reidentify-audit"
WRONG_SECRET = "refused (wrong secret)"


class AuditRefused(Pacs2BidsError):
    """A re-identification was refused (the attempt is recorded in the audit log). Give a reason
    of at least :data:`MIN_REASON` characters: what the original identity is needed for."""


class ReidentificationAudit:
    """Re-identification and its audit log, for :class:`~pacs2bids.deid.keystore.KeyStore`
    (which provides the folder, its lock, its decrypted document, and the keys)."""

    path: Path
    project: str
    _audit: Path
    _legacy_audit: Path
    _mac_key: bytes

    def reidentify(self, subject: str, *, reason: str) -> dict:
        """The original identifiers of ``subject``; appends an audit record first (S2).

        Every attempt is recorded: a wrong secret (hash-chained, unsigned, then
        :class:`PseudonymisationError`), a reason shorter than :data:`MIN_REASON`
        (:class:`AuditRefused`), an unknown subject (:class:`KeyError`).
        """
        reason = " ".join((reason or "").split())
        with self._locked():
            try:
                doc = self._load().doc
                failure = None
            except PseudonymisationError as exc:
                failure = exc
            if failure is None and not any(self._files()[0]) and not self._secret_opens_audit():
                failure = PseudonymisationError(
                    f"the audit log {self._audit} was signed with another secret; check the secret's environment "
                    "variable"
                )
            entry = None
            if failure is not None:
                what = WRONG_SECRET
            elif len(reason) < MIN_REASON:
                what = "refused (no reason given)"
            else:
                entry = copy.deepcopy(doc["subjects"].get(subject))
                what = "reidentify" if entry is not None else "reidentify (unknown subject)"
            self._append_audit(what, subject, reason, signed=failure is None)
        if failure is not None:
            raise failure
        if len(reason) < MIN_REASON:
            raise AuditRefused(
                f"re-identification of {subject!r} refused: give --reason, at least {MIN_REASON} characters saying "
                "why the original identity is needed (the attempt is recorded in the audit log)"
            )
        if entry is None:
            raise KeyError(f"subject {subject!r} is not in the key store of project {self.project}")
        return {"subject": subject, **entry}

    def _secret_opens_audit(self) -> bool:
        """With no key store to decrypt: does the last signed audit record verify with this secret?"""
        lines = auditchain.committed_lines(self._audit)
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("mac"):
                return auditchain.mac_of(rec, self._mac_key, AUDIT_CONTEXT) == rec["mac"]
        return True  # nothing signed yet: nothing to tell a wrong secret by

    def _append_audit(self, what: str, subject: str, reason: str, *, signed: bool) -> None:
        account = auditchain.os_account()
        record = {
            "who": account["account"],
            "uid": account["uid"],
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "what": what,
            "subject": subject,
        }
        if "claimed_account" in account:
            record["claimed_who"] = account["claimed_account"]
        if signed:
            record["reason"] = self._fernet.encrypt(reason.encode()).decode()
        else:  # cannot be encrypted for the key holder: kept as a digest, to compare with what is claimed
            record["reason_sha256"] = hashlib.sha256(reason.encode()).hexdigest()
        if not auditchain.committed_lines(self._audit):
            legacy = self._legacy_audit
            record["sealed_legacy"] = hashlib.sha256(legacy.read_bytes()).hexdigest() if legacy.exists() else None
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        auditchain.append(self._audit, record, key=self._mac_key if signed else None, context=AUDIT_CONTEXT)

    def verify_audit(self) -> tuple[auditchain.Verification, list[dict]]:
        """The audit log checked with this project's key, and its records (reasons decrypted).
        ``Verification.broken`` names the first entry deleted, edited, moved or forged; an older
        ``audit.fernet`` must still hold the bytes the first record sealed."""
        with self._locked(exclusive=False):
            lines = auditchain.committed_lines(self._audit)
            v = auditchain.verify(lines, self._mac_key, AUDIT_CONTEXT,
                                  unsigned_ok=lambda r: r.get("what") == WRONG_SECRET)
            first = v.entries[0].record if v.entries else None
            if first is not None and v.broken is not v.entries[0] and "sealed_legacy" in first:
                legacy = self._legacy_audit
                now = hashlib.sha256(legacy.read_bytes()).hexdigest() if legacy.exists() else None
                if now != first["sealed_legacy"]:
                    v.entries[0].problem = f"seals {legacy.name} of an older version, which has changed since"
                    v.entries[0].signed = False
                    v.broken = v.entries[0]
            records = []
            for e in v.entries:
                rec = dict(e.record or {})
                if e.signed and "reason" in rec:
                    try:
                        rec["reason"] = self._fernet.decrypt(rec["reason"].encode()).decode()
                    except (InvalidToken, ValueError):
                        rec["reason"] = "(cannot be decrypted)"
                records.append(rec)
            return v, records

    def legacy_audit_log(self) -> list[dict]:
        """The records of an older version's ``audit.fernet`` (unchained), oldest first."""
        if not self._legacy_audit.exists():
            return []
        return [self._decrypt(line, self._legacy_audit, own_project=False)
                for line in self._legacy_audit.read_bytes().splitlines() if line.strip()]

    def audit_log(self) -> list[dict]:
        """Every audit record, oldest first, after checking the chain.

        Raises :class:`PseudonymisationError` when the log does not verify with this secret
        (``pacs2bids audit SPEC`` names the first broken entry)."""
        v, records = self.verify_audit()
        if v.broken is not None:
            raise PseudonymisationError(
                f"audit log {self._audit} does not verify with this project's secret: entry {v.broken.number} "
                f"{v.broken.problem}"
            )
        return records
