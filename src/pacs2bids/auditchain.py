"""Chained JSON-lines logs: quarantine decisions and the re-identification audit (S2, P9).

One JSON object per line. Every line holds its number ``seq`` (from 1); ``prev``, the SHA-256
of the previous line's bytes (the first line holds :data:`GENESIS`); and ``mac``, an HMAC-SHA256
of the line's canonical JSON (``prev`` included, ``mac`` left out) under the project's log key
(:func:`pacs2bids.deid.keyed.audit_mac_key`) and the log's own context string. So:

- editing a line breaks its MAC; deleting, inserting or reordering lines breaks the ``prev`` of
  the line after (and its MAC, which covers that ``prev``, so whoever lacks the key cannot
  re-chain what follows);
- each MAC covers the previous line whole, MAC included: the chain is a MAC chain.

A line may carry ``mac: null`` where its log allows it: the re-identification audit records an
attempt made with a wrong secret that way (the attempt cannot be signed, but it is hash-chained,
and the next signed line seals it). Deleting lines at the very end of a log is not detectable
from the log alone: :func:`verify` returns the head (digest of the last line) so that it can be
noted elsewhere (a ticket, a mail, a write-once store) and compared later.

A line without its final newline was never committed (a crash mid-write): readers ignore it,
the next writer cuts it off. Writers hold their log's lock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

GENESIS = hashlib.sha256(b"pacs2bids chained log v1: genesis").hexdigest()


def os_account() -> dict:
    """The account this process really runs as, from the real uid (not ``$LOGNAME``/``$USER``,
    which anyone can set), and the name the environment claims when it differs."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (some containers)
        name = f"uid-{uid}"
    out = {"account": name, "uid": uid}
    claimed = next((os.environ[v] for v in ("LOGNAME", "USER", "LNAME", "USERNAME") if os.environ.get(v)), None)
    if claimed is not None and claimed != name:
        out["claimed_account"] = claimed
    return out


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def mac_of(record: dict, key: bytes, context: str) -> str:
    """HMAC-SHA256 of ``record`` (without its ``mac``) under ``key``, bound to the log's ``context``."""
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, context.encode() + b"\n" + _canonical(body), hashlib.sha256).hexdigest()


def committed_lines(path: Path) -> list[bytes]:
    """The committed lines of ``path`` (a trailing line without its newline never was)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    return data[:end].split(b"\n")[:-1]


def append(path: Path, body: dict, *, key: bytes | None, context: str) -> dict:
    """Chain ``body`` onto the log at ``path`` (signed when ``key`` is given) and fsync it.
    The caller holds the log's lock. Returns the record written."""
    path = Path(path)
    record = dict(body)
    with open(path, "ab+") as f:
        os.chmod(path, 0o600)
        f.seek(0)
        data = f.read()
        committed = data.rfind(b"\n") + 1
        if committed != len(data):  # a torn line: never committed
            f.truncate(committed)
        lines = data[:committed].split(b"\n")[:-1]
        record["seq"] = len(lines) + 1
        record["prev"] = line_digest(lines[-1]) if lines else GENESIS
        record["mac"] = mac_of(record, key, context) if key is not None else None
        f.seek(0, os.SEEK_END)
        f.write(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return record


@dataclass
class Entry:
    """One line of a log, as read: its 1-based ``number``, its ``record`` (None when the line
    is not JSON), whether its MAC was checked and held (``signed``), whether it is an unchained
    line of an older version (``legacy``), and what is wrong with it (``problem``)."""

    number: int
    record: dict | None
    signed: bool = False
    legacy: bool = False
    problem: str | None = None


@dataclass
class Verification:
    """The result of :func:`verify`: every entry, the first broken one (``broken``, None when
    the log is intact) and the head (digest of the last line)."""

    entries: list[Entry] = field(default_factory=list)
    broken: Entry | None = None
    head: str = GENESIS

    @property
    def intact(self) -> bool:
        return self.broken is None

    @property
    def trusted(self) -> list[Entry]:
        """The entries before the first break (legacy lines included: check ``legacy``)."""
        out = []
        for e in self.entries:
            if e is self.broken:
                break
            out.append(e)
        return out


def verify(lines: list[bytes], key: bytes, context: str, *, unsigned_ok: Callable[[dict], bool] = lambda r: False,
           legacy_prefix: bool = False) -> Verification:
    """Check a chained log: every ``prev`` is the digest of the line before (:data:`GENESIS`
    for the first), every MAC holds under ``key``, and a line without MAC is one
    ``unsigned_ok`` accepts. With ``legacy_prefix``, lines with neither ``prev`` nor ``mac``
    before the first chained line are returned as ``legacy`` (an older, unchained version)."""
    out = Verification()
    expected = GENESIS
    chained = False
    for n, line in enumerate(lines, 1):
        entry = Entry(n, None)
        out.entries.append(entry)
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
            entry.record = record
        except ValueError:
            entry.problem = "is not a JSON record (written or damaged by hand)"
        else:
            if legacy_prefix and not chained and "prev" not in record and "mac" not in record:
                entry.legacy = True
            else:
                chained = True
                if record.get("seq") != n:
                    entry.problem = (
                        f"holds entry {record.get('seq')} in the place of entry {n}: entries were deleted or moved"
                    )
                elif record.get("prev") != expected:
                    entry.problem = (
                        "does not follow the entry before it: an entry was deleted, inserted or moved there"
                        + (f", or entry {n - 1} was edited" if n > 1 else "")
                    )
                elif record.get("mac") is None:
                    if not unsigned_ok(record):
                        entry.problem = "carries no MAC: it was not written with the project key"
                elif not hmac.compare_digest(str(record["mac"]), mac_of(record, key, context)):
                    entry.problem = "does not match its MAC: it was edited, or signed with another secret"
                else:
                    entry.signed = True
        if entry.problem and out.broken is None:
            out.broken = entry
        expected = line_digest(line)
    out.head = expected
    return out
