"""Keyed derivations from the project secret: new UIDs, per-subject date offsets, key-store key.

Every use of the secret goes through HKDF-SHA256 (RFC 5869) with its own ``info`` label, so
the UID key, the date key and the key-store encryption key are independent: learning one
tells nothing about the others, and none of them is the secret itself.

- UIDs: ``"2.25." + int(HMAC-SHA256(k_uid, original))`` in decimal, truncated so the whole
  UID fits the 64 characters of VR UI (PS3.5 6.2, PS3.5 B.2 for the ``2.25`` root). The same
  original UID always gives the same new UID under one secret, so references (in sequences,
  File Meta, a Frame of Reference shared by several series) stay consistent; another secret
  gives unrelated UIDs (P13).
- Dates: a whole number of days, between 1 and ``MAX_SHIFT_DAYS`` back in time, from
  ``HMAC-SHA256(k_date, subject)``. Whole days keep times of day unchanged and every interval
  exact (P5); the offset is never written anywhere.
- Received files: the lineage records, per published instance, ``HMAC-SHA256(k_recv,
  SHA-256(received file))`` (hex) rather than the plain SHA-256: a plain checksum of the
  clinical file would let anyone holding that file (the PACS, another extraction) link it to
  its pseudonym (P13). Only the project key holder can recompute the keyed digest from a
  candidate file and so verify which clinical file a research file came from.
- Raw folder and file names (the private retrieval area): ``HMAC-SHA256(k_raw, UID)``, hex,
  under their own key (:func:`raw_name_key`), never under the secret itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import date, datetime, timedelta
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_SHIFT_DAYS = 3650
_SALT = b"pacs2bids-deid-v1"


def derive_key(secret: bytes, project: str, purpose: str, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``secret`` with ``info = b"pacs2bids/<project>/<purpose>"``."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=_SALT, info=f"pacs2bids/{project}/{purpose}".encode()
    ).derive(secret)


#: HKDF purpose of the key that authenticates the project's decision and audit logs (quarantine
#: decisions, re-identification audit): an HMAC-SHA256 per line, chained (:mod:`pacs2bids.auditchain`).
AUDIT_MAC_PURPOSE = "audit-mac"


def audit_mac_key(secret: bytes, project: str) -> bytes:
    """The key of the HMAC-chained logs, derived apart from every other key of the project."""
    return derive_key(secret, project, AUDIT_MAC_PURPOSE)


def raw_name_key(secret: bytes, project: str) -> bytes:
    """The key of the private raw folder's names (``<h(study)>/<h(series)>/<h(sop)>.dcm``,
    :func:`pacs2bids.sink.keyed_name`): HKDF purpose ``raw-name``, apart from every other key."""
    return derive_key(secret, project, "raw-name")


def fernet_key(secret: bytes, project: str) -> bytes:
    """The url-safe base64 key Fernet needs, derived for the key store only."""
    return base64.urlsafe_b64encode(derive_key(secret, project, "keystore"))


class Keyed:
    """The keyed functions of one project (UIDs, date offsets, file names)."""

    def __init__(self, secret: bytes, project: str):
        if not secret or len(secret) < 16:
            raise ValueError("the project secret must have at least 16 bytes")
        self._uid_key = derive_key(secret, project, "uid")
        self._date_key = derive_key(secret, project, "date-shift")
        self._name_key = derive_key(secret, project, "file-name")
        self._received_key = derive_key(secret, project, "received-sha256")
        self.uid = lru_cache(maxsize=200_000)(self._uid)

    def __getstate__(self) -> dict:
        """Pickled (for a worker process) without its UID cache, rebuilt on unpickling."""
        return {k: v for k, v in self.__dict__.items() if k != "uid"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.uid = lru_cache(maxsize=200_000)(self._uid)

    def _uid(self, original: str) -> str:
        digest = hmac.new(self._uid_key, original.strip().encode(), hashlib.sha256).digest()
        return ("2.25." + str(int.from_bytes(digest, "big")))[:64]

    def uid_like(self, original: str, length: int) -> str:
        """A keyed UID-looking token of exactly ``length`` characters (for length-preserving
        scrubs inside binary private headers)."""
        new = self.uid(original)
        if length <= len(new):
            return new[:length]
        more = str(int.from_bytes(hmac.new(self._uid_key, new.encode(), hashlib.sha512).digest(), "big"))
        return (new + more)[:length]

    def day_offset(self, subject: str) -> int:
        """Days added to every date of ``subject`` (negative: back in time)."""
        digest = hmac.new(self._date_key, subject.encode(), hashlib.sha256).digest()
        return -(1 + int.from_bytes(digest[:8], "big") % MAX_SHIFT_DAYS)

    def received_digest(self, sha256_hex: str) -> str:
        """``HMAC-SHA256(k_recv, digest)`` in hex, where ``digest`` is the 32-byte SHA-256 of a
        received file given as hex (as the retrieval ledger holds it). Verifiable only with the
        project key; links nothing without it."""
        return hmac.new(self._received_key, bytes.fromhex(sha256_hex), hashlib.sha256).hexdigest()

    def token(self, value: str, n: int = 16) -> str:
        """A short keyed hex token (quarantine file names and the like)."""
        return hmac.new(self._name_key, value.encode(), hashlib.sha256).hexdigest()[:n]


def shift_da(value: str, days: int) -> str | None:
    """Shift one DA value (``YYYYMMDD``; a ``YYYYMMDD-YYYYMMDD`` range too) by ``days``.
    Returns None when the value is not a date (the caller then empties it)."""
    value = value.strip()
    if "-" in value:
        parts = value.split("-")
        if len(parts) != 2:
            return None
        out = [shift_da(p, days) if p else "" for p in parts]
        return None if None in out else "-".join(out)  # type: ignore[arg-type]
    if len(value) == 10 and value[4] == "." and value[7] == ".":  # ACR-NEMA style
        value = value.replace(".", "")
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        d = date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None
    try:
        return (d + timedelta(days=days)).strftime("%Y%m%d")
    except OverflowError:
        return None


def shift_dt(value: str, days: int) -> str | None:
    """Shift one DT value (``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]``) by whole days.

    The time part and the UTC offset are kept as they are, so the interval between any two
    DT values is unchanged, including across midnight. A partial value keeps its precision.
    """
    value = value.strip()
    if not value:
        return None
    body, tz = value, ""
    for sign in "+-":
        idx = value.find(sign, 4)
        if idx > 0:
            body, tz = value[:idx], value[idx:]
            break
    datepart, rest = body[:8], body[8:]
    if not datepart.isdigit() or len(datepart) not in (4, 6, 8):
        return None
    padded = datepart + "0101"[len(datepart) - 4 :] if len(datepart) < 8 else datepart
    shifted = shift_da(padded, days)
    if shifted is None:
        return None
    return shifted[: len(datepart)] + rest + tz


def birth_date_to_year(value: str, days: int) -> str | None:
    """Patient's Birth Date: shifted like every other date of the subject, then cut to the
    first of January of that year, so an age computed from the (shifted) study date is
    right to within a year, and day and month are gone."""
    shifted = shift_da(value, days)
    return None if shifted is None else shifted[:4] + "0101"


def parse_dt(value: str) -> datetime:
    """A full DT value (YYYYMMDDHHMMSS[.F]) as a naive datetime (for tests and checks)."""
    body = value.split("+")[0].split("-")[0] if len(value) > 8 else value
    fmt = "%Y%m%d%H%M%S.%f" if "." in body else "%Y%m%d%H%M%S"
    return datetime.strptime(body, fmt)
