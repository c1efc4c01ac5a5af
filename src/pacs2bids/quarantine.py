"""Quarantine: files held back from publication until a person decides (P9).

The folder is ``<work>/quarantine/`` (private, beside the dataset, never published). Two
stages put files there:

- **pseudonymise**: pixels at risk that could not be cleaned with confidence, or a file the
  pseudonymiser could not process. ``<id>.dcm`` is the clinical file as received and
  ``<id>.json`` describes it: stage, reason, subject and session codes, the series folder it
  belongs to, its SHA-256 and size. No original identifier is written there.
- **retrieve**: payloads that were not readable DICOM or carried another instance's UIDs,
  written by :mod:`pacs2bids.retrieve` as ``<name>.dcm`` with ``<name>.dcm.reason.txt``. They
  cannot be released (nothing trustworthy to publish): a re-run fetches the instance again;
  they can be rejected.

A reviewer decides with ``pacs2bids quarantine release|reject``. Every decision is appended to
``decisions.jsonl`` (the reviewer, the OS account from the real uid, when, note, the SHA-256 the
decision was about) and never rewritten: an item's state is its last decision (``pending`` when
there is none).

Decisions are authenticated with the project key (:mod:`pacs2bids.auditchain`): each line holds
an HMAC-SHA256 under a key derived from the project secret
(:func:`pacs2bids.deid.keyed.audit_mac_key`), and each MAC covers the previous line. A decision
is written only by a holder of the secret: before writing, the secret is checked against the
key store (which must know the item's subject) and against the existing chain. A line written
by hand, edited, deleted or moved breaks the chain: no decision from the break on counts, the
run then publishes no released file at all and its summary names the broken entry
(:meth:`Quarantine.problems`). Without the key (``Quarantine(folder)``), no decision is read.

Files of older versions, whose lines carry no MAC: those unsigned lines come before the chain
and stay as they are. Their ``reject`` and ``published`` decisions still count (they can only
withhold a file), their ``release`` decisions do not: such an item is pending again, and a
reviewer releases it anew with the secret (``pacs2bids quarantine release SPEC ID --reviewer
NAME``); ``list`` and the run summary say so.

A **release** says: "I looked at these pixels and they carry nothing identifying" (or: "here is
a copy I cleaned myself", ``replace``). The next run pseudonymises the released file's header
like any other, without re-running OCR on its pixels, writes it to ``sourcedata/`` of its
subject and session, leak-scans it with the rest and publishes it; then the clinical copy is
deleted and the item is marked ``published``. A file whose bytes changed after the release is
refused: the review was about other bytes. Released images are not converted to NIfTI (a
session is converted whole, in one run); they are published as pseudonymised DICOM.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from . import auditchain
from .checksum import sha256_file
from .errors import Pacs2BidsError

DECISIONS = "decisions.jsonl"
#: binds the MACs of ``decisions.jsonl`` to this log (the re-identification audit has its own)
MAC_CONTEXT = "pacs2bids/quarantine-decisions"
STAGE_PSEUDONYMISE, STAGE_RETRIEVE = "pseudonymise", "retrieve"


class QuarantineError(Pacs2BidsError):
    """A quarantine decision cannot be taken (unknown item, wrong state, changed file)."""


@dataclass
class Item:
    """One quarantined file and its current state."""

    id: str
    stage: str
    reason: str
    state: str = "pending"  # pending | released | rejected | published
    subject: str | None = None
    session: str | None = None
    series_folder: str | None = None
    series_number: int | None = None
    sha256: str | None = None  # at quarantine time
    size: int | None = None
    quarantined_at: str | None = None
    released_sha256: str | None = None  # the bytes the reviewer released

    @property
    def releasable(self) -> bool:
        return self.stage == STAGE_PSEUDONYMISE and self.subject is not None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hold(folder: Path, item_id: str, source: Path, reason: str, *, subject: str, session: str | None,
         series_folder: str, series_number: int | None = None) -> Item:
    """Copy ``source`` into the quarantine as ``<item_id>.dcm`` with its description.

    The copy is written under a temporary name and renamed, so a listed item is always whole.
    ``source`` is left in place (its owner deletes it). An id already used gets a suffix
    (``-2``...): a file held again is a new item, decided anew.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    base, n = item_id, 1
    while (folder / f"{item_id}.json").exists():  # held again (a re-run): a new item, decided anew
        n += 1
        item_id = f"{base}-{n}"
    target = folder / f"{item_id}.dcm"
    item = Item(id=item_id, stage=STAGE_PSEUDONYMISE, reason=reason, subject=subject, session=session,
                series_folder=series_folder, series_number=series_number, quarantined_at=_now())
    try:
        tmp = folder / f".{item_id}.part"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        item.sha256, item.size = sha256_file(target), target.stat().st_size
    except OSError:
        pass  # the description still says why; list() shows the file as missing
    meta = {k: v for k, v in asdict(item).items() if k not in ("state", "released_sha256")}
    tmp = folder / f".{item_id}.json.part"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / f"{item_id}.json")
    return item


class Quarantine:
    """The quarantine folder of one project's work folder.

    ``key``: the project's log key (:func:`pacs2bids.deid.keyed.audit_mac_key`); without it no
    decision is read (every item looks pending) and none can be written. ``known_subjects``:
    returns the subjects of the project's key store, raising when the secret cannot decrypt it
    (:meth:`pacs2bids.deid.KeyStore.subjects`); a release is refused unless the key store
    opens with this secret and knows the item's subject. :meth:`for_spec` sets both.
    """

    def __init__(self, folder: Path, *, key: bytes | None = None,
                 known_subjects: Callable[[], list[str]] | None = None):
        self.folder = Path(folder)
        self.key = key
        self.known_subjects = known_subjects

    @classmethod
    def for_spec(cls, spec) -> "Quarantine":
        """The quarantine of a project spec, with its key and its key store's check."""
        from .deid.keyed import audit_mac_key
        from .deid.keystore import KeyStore

        secret = spec.secret_bytes
        store = KeyStore(spec.resolved_key_store, project=spec.project, secret=secret)
        return cls(spec.resolved_work_dir / "quarantine", key=audit_mac_key(secret, spec.project),
                   known_subjects=store.subjects)

    # -- reading ---------------------------------------------------------------------------
    def items(self) -> list[Item]:
        """Every item, oldest first, with its current state."""
        if not self.folder.is_dir():
            return []
        found: dict[str, Item] = {}
        for meta in self.folder.glob("*.json"):
            data = json.loads(meta.read_text(encoding="utf-8"))
            found[data["id"]] = Item(**data)
        for reason in self.folder.glob("*.reason.txt"):
            item_id = reason.name.removesuffix(".reason.txt").removesuffix(".dcm")
            if item_id not in found:
                f = self.folder / f"{item_id}.dcm"
                stamp = datetime.fromtimestamp(reason.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
                found[item_id] = Item(id=item_id, stage=STAGE_RETRIEVE, reason=reason.read_text().strip(),
                                      size=f.stat().st_size if f.exists() else None, quarantined_at=stamp)
        for d in self._counted():
            item = found.get(d.get("id"))
            state = {"release": "released", "reject": "rejected", "published": "published"}.get(d.get("action"))
            if item is not None and state is not None:
                item.state = state
                item.released_sha256 = d.get("sha256") if state == "released" else None
        return sorted(found.values(), key=lambda i: (i.quarantined_at or "", i.id))

    def get(self, item_id: str) -> Item:
        for item in self.items():
            if item.id == item_id:
                return item
        raise QuarantineError(
            f"no quarantined item {item_id!r} in {self.folder}; 'pacs2bids quarantine list SPEC' shows the items"
        )

    def path(self, item: Item) -> Path:
        return self.folder / f"{item.id}.dcm"

    def released(self) -> list[Item]:
        """Items released and not yet published; none while the chain of decisions is broken."""
        if self.key is not None and self.verification().broken is not None:
            return []
        return [i for i in self.items() if i.state == "released"]

    def decisions(self) -> list[dict]:
        """Every decision that counts, oldest first (the audit trail of the quarantine)."""
        return list(self._counted())

    def verification(self) -> auditchain.Verification:
        """``decisions.jsonl`` checked against the project key (raises without a key)."""
        if self.key is None:
            raise QuarantineError("quarantine decisions are checked with the project key: open the quarantine "
                                  "with Quarantine.for_spec(spec) (the secret's environment variable set)")
        return auditchain.verify(auditchain.committed_lines(self.folder / DECISIONS), self.key, MAC_CONTEXT,
                                 legacy_prefix=True)

    def problems(self) -> list[str]:
        """What makes decisions not count, in words for the reviewer and the run summary: a
        broken chain (the first broken entry named), releases of an older version without MAC."""
        if self.key is None:
            return []
        v = self.verification()
        pending = {i.id for i in self.items() if i.state == "pending"}  # decided since: nothing to say
        out = [f"{DECISIONS} entry {e.number} (item {e.record.get('id')}): a release without MAC, written by an "
               f"older version or by hand, does not count; release it again "
               f"('pacs2bids quarantine release SPEC {e.record.get('id')} --reviewer NAME')"
               for e in v.entries if e.legacy and e.record.get("action") == "release" and e.record.get("id") in pending]
        if v.broken is not None:
            out.insert(0, self._broken_text(v.broken))
        return out

    def _broken_text(self, entry: auditchain.Entry) -> str:
        return (f"{self.folder / DECISIONS}: the chain of decisions is broken at entry {entry.number}, which "
                f"{entry.problem}; no decision from there on counts and no released file is published. "
                "Find out who changed the file; to start again, move it aside and decide every item anew")

    def _counted(self) -> Iterator[dict]:
        """The decisions that count: signed ones before any break, and withholding decisions
        (reject, published) of an older version's unsigned lines."""
        if self.key is None:
            return
        for e in self.verification().trusted:
            if e.legacy and e.record.get("action") not in ("reject", "published"):
                continue
            yield e.record

    # -- deciding --------------------------------------------------------------------------
    def release(self, item_id: str, *, reviewer: str, note: str = "", replacement: Path | None = None) -> Item:
        """Release ``item_id`` for the next run. With ``replacement``, the reviewer's cleaned copy
        (same SOP Instance UID) takes the place of the quarantined file first."""
        with self._locked():
            self._check_key()
            item = self.get(item_id)
            if not item.releasable:
                raise QuarantineError(
                    f"item {item_id} was quarantined at retrieval ({item.reason}): there is nothing trustworthy to "
                    "release. Re-run the project to fetch the instance again, then reject this item."
                )
            if item.state not in ("pending", "released"):
                raise QuarantineError(f"item {item_id} is {item.state}; only a pending item can be released")
            self._check_subject(item)
            target = self.path(item)
            if replacement is not None:
                self._replace(target, Path(replacement))
            if not target.exists():
                raise QuarantineError(f"the file of item {item_id} is missing ({target}); it cannot be released")
            digest = sha256_file(target)
            self._append({"id": item_id, "action": "release", "who": reviewer, "when": _now(), "note": note,
                          "sha256": digest, "replaced": replacement is not None})
            item.state, item.released_sha256 = "released", digest
            return item

    def reject(self, item_id: str, *, reviewer: str, note: str = "") -> Item:
        """Never publish ``item_id``: its clinical copy is deleted, the decision kept."""
        with self._locked():
            self._check_key()
            item = self.get(item_id)
            if item.state == "published":
                raise QuarantineError(f"item {item_id} is already published; it cannot be rejected")
            self._check_subject(item)
            target = self.path(item)
            digest = sha256_file(target) if target.exists() else None
            self._append({"id": item_id, "action": "reject", "who": reviewer, "when": _now(), "note": note,
                          "sha256": digest})
            target.unlink(missing_ok=True)
            item.state = "rejected"
            return item

    def check_released(self, item: Item) -> Path:
        """The released file, after checking it still holds the bytes that were reviewed."""
        target = self.path(item)
        if not target.exists():
            raise QuarantineError(f"released item {item.id}: its file {target} is missing")
        if sha256_file(target) != item.released_sha256:
            raise QuarantineError(
                f"released item {item.id} changed after it was reviewed; review it again "
                f"('pacs2bids quarantine release SPEC {item.id} --reviewer NAME')"
            )
        return target

    def mark_published(self, item_id: str, *, run_id: str) -> None:
        """Record that ``item_id`` was published by ``run_id`` and delete its clinical copy (E6)."""
        with self._locked():
            self._check_key()
            self._append({"id": item_id, "action": "published", "who": f"run {run_id}", "when": _now(),
                          "note": f"run {run_id}", "sha256": None})
            (self.folder / f"{item_id}.dcm").unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.folder / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_key(self) -> None:
        """Refuse to write with no key, a key the existing chain does not verify, or a broken chain."""
        if self.key is None:
            raise QuarantineError("a quarantine decision is signed with the project key: open the quarantine with "
                                  "Quarantine.for_spec(spec), the secret's environment variable set")
        v = self.verification()
        if v.broken is None:
            return
        if not any(e.signed for e in v.entries) and "MAC" in (v.broken.problem or ""):
            raise QuarantineError(
                f"the project secret does not verify {self.folder / DECISIONS} (entry {v.broken.number} "
                f"{v.broken.problem}): check the secret's environment variable; nothing was written"
            )
        raise QuarantineError(self._broken_text(v.broken) + "; nothing was written")

    def _check_subject(self, item: Item) -> None:
        """The key store must open with this secret and know the item's subject."""
        if self.known_subjects is None:
            return
        try:
            subjects = self.known_subjects()
        except Pacs2BidsError as exc:
            raise QuarantineError(f"the secret given cannot open the key store ({exc}); nothing was written") from None
        if item.subject is not None and item.subject not in subjects:
            raise QuarantineError(
                f"the key store opened with this secret does not know subject {item.subject} of item {item.id}: "
                "check the secret's environment variable and the spec's key_store; nothing was written"
            )

    def _append(self, record: dict) -> None:
        assert self.key is not None
        auditchain.append(self.folder / DECISIONS, {**record, **auditchain.os_account()}, key=self.key,
                          context=MAC_CONTEXT)

    @staticmethod
    def _replace(target: Path, replacement: Path) -> None:
        import pydicom

        try:
            new = pydicom.dcmread(replacement, stop_before_pixels=True)
        except Exception as exc:
            raise QuarantineError(f"{replacement} is not readable DICOM ({type(exc).__name__}); nothing was changed") from None
        try:
            old = pydicom.dcmread(target, stop_before_pixels=True)
        except Exception:
            old = None
        if old is not None and str(old.get("SOPInstanceUID", "")) != str(new.get("SOPInstanceUID", "")):
            raise QuarantineError(
                f"{replacement} is another instance (its SOP Instance UID differs from the quarantined file's); "
                "a replacement must be the same image, cleaned"
            )
        tmp = target.with_name(f".{target.name}.part")
        shutil.copyfile(replacement, tmp)
        os.replace(tmp, target)
