"""The operations audit log (issue 14): every extraction, publish, purge and reintegration of a project.

Kept apart from the datasets: ``<folder>/operations-audit-<project>.jsonl``, where the folder is
``$PACS2BIDS_AUDIT_DIR`` when set (a site's own, ideally write-once, storage), else the
project's key store folder (never under ``output``: refused). One JSON object per line, chained
and signed by :mod:`pacs2bids.auditchain` under the project's log key (derived from the project
secret, context :data:`CONTEXT`): editing, deleting, inserting or reordering a line is found by
:func:`verify`. Deleting lines at the very end is found only by comparing the head
(:attr:`auditchain.Verification.head`) with one noted elsewhere.

Each entry says **who** (``account``, ``uid``: the real uid's OS account; ``operator``:
``$PACS2BIDS_OPERATOR`` when set, e.g. a person behind a service account), **when** (UTC),
**what** (``action``, ``project``, run id, version, counts) and **where** (output path, target
URL without credentials or query). No original identifier is ever written: callers pass
pseudonymised codes and counts only.

Quarantine decisions and re-identifications keep their own chained logs
(:mod:`pacs2bids.quarantine`, :mod:`pacs2bids.deid.reidentify`): :func:`timeline` reads and
verifies all three and merges them in time order (``pacs2bids audit SPEC``), so none of them is
written twice. A purge that deletes the quarantine first seals its decision log's head here.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from . import auditchain
from .errors import Pacs2BidsError

CONTEXT = "pacs2bids/operations-audit"
ENV_DIR = "PACS2BIDS_AUDIT_DIR"
ENV_OPERATOR = "PACS2BIDS_OPERATOR"
ACTIONS = ("extract", "publish", "publish-target", "purge", "reintegrate", "quarantine-decision", "reidentify")


class AuditError(Pacs2BidsError):
    """The audit log cannot be written where it is configured (the message names the folder)."""


def folder(spec) -> Path:
    """Where the project's audit log lives (see the module docstring)."""
    configured = os.environ.get(ENV_DIR)
    where = Path(configured).expanduser().resolve() if configured else Path(spec.resolved_key_store)
    output = Path(spec.output).resolve()
    for forbidden in (output, output.parent / f".{output.name}.versions"):
        if where == forbidden or forbidden in where.parents:
            raise AuditError(f"the audit log folder {where} is inside the dataset {forbidden}; set {ENV_DIR} to a "
                             "folder apart from the datasets")
    return where


def log_path(spec) -> Path:
    return folder(spec) / f"operations-audit-{spec.project}.jsonl"


def safe_url(url: str) -> str:
    """``url`` without user name, password, query or fragment (where it points, not how to get in)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "(unparsable address)"
    if not parts.scheme:
        return str(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _who() -> dict:
    account = auditchain.os_account()
    out = {"account": account["account"], "uid": account["uid"], "host": socket.gethostname()}
    if os.environ.get(ENV_OPERATOR):
        out["operator"] = os.environ[ENV_OPERATOR]
    if "claimed_account" in account:
        out["claimed_account"] = account["claimed_account"]
    return out


def _key(spec) -> bytes:
    from .deid.keyed import audit_mac_key

    return audit_mac_key(spec.secret_bytes, spec.project)


def record(spec, action: str, **fields) -> dict:
    """Append one signed, chained entry for ``action`` (one of :data:`ACTIONS`) with ``fields``
    (JSON values: counts, run id, version, paths; never an original identifier). Returns it."""
    if action not in ACTIONS:
        raise ValueError(f"audit action {action!r} is not one of {', '.join(ACTIONS)}")
    path = log_path(spec)
    body = {"action": action, "project": spec.project,
            "when": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **_who(), **fields}
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return auditchain.append(path, body, key=_key(spec), context=CONTEXT)
    except OSError as exc:
        raise AuditError(f"cannot write the audit log {path}: {exc.strerror or exc}; check the folder's "
                         f"permissions, or set {ENV_DIR}") from None


def target_address(settings) -> str:
    """Where a target is, without credentials: its URL, or AE title, host and port."""
    if getattr(settings, "url", None):
        return safe_url(settings.url)
    return f"dimse://{settings.ae_title}@{settings.host}:{settings.port}"


def record_run(spec, summary) -> list[dict]:
    """The entries of one extraction run (:class:`pacs2bids.run.RunSummary`): ``extract`` always
    (failed runs too), ``publish`` when a new local version was published, and one
    ``publish-target`` per secondary target. Counts and codes only, never an error's text."""
    from .publish import MANIFEST, current_version

    version = current_version(Path(spec.output)) if summary.published else None
    entries = [record(spec, "extract", run_id=summary.run_id, state=summary.state, started=summary.started,
                      finished=summary.finished, studies=summary.studies, subjects=len(summary.subjects),
                      series=len(summary.series), quarantined=len(summary.quarantined),
                      failed_studies=len(summary.study_failures), errors=len(summary.errors),
                      published=summary.published, unchanged=summary.unchanged)]
    if version is not None:
        try:
            files = len(json.loads((version / MANIFEST).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            files = None
        entries.append(record(spec, "publish", run_id=summary.run_id, version=version.name, files=files,
                              where=str(spec.output)))
    settings = {s.label: s for s in spec.targets}
    for t in summary.targets:
        where = target_address(settings[t["target"]]) if t.get("target") in settings else None
        entries.append(record(spec, "publish-target", run_id=summary.run_id, target=t.get("target"), where=where,
                              version=t.get("version"), state=t.get("state"), sent_files=t.get("sent_files"),
                              verified=t.get("verified")))
    return entries


def verify(spec) -> auditchain.Verification:
    """The project's audit log checked with its key (``broken`` names the first bad entry)."""
    return auditchain.verify(auditchain.committed_lines(log_path(spec)), _key(spec), CONTEXT)


def verify_chain(path: Path) -> auditchain.Verification:
    """Without the project secret: only the hash chain of the log at ``path`` (numbers and
    ``prev``), MACs unchecked. An edit is still found unless whoever made it re-chained every
    line after it; only :func:`verify` (with the key) rules that out."""
    lines = auditchain.committed_lines(path)
    out = auditchain.Verification()
    expected = auditchain.GENESIS
    for n, line in enumerate(lines, 1):
        entry = auditchain.Entry(n, None)
        out.entries.append(entry)
        try:
            entry.record = json.loads(line)
        except ValueError:
            entry.problem = "is not a JSON record (written or damaged by hand)"
        else:
            if not isinstance(entry.record, dict) or entry.record.get("seq") != n:
                entry.problem = "is out of place: entries were deleted or moved"
            elif entry.record.get("prev") != expected:
                entry.problem = "does not follow the entry before it: an entry was deleted, inserted, moved or edited"
        if entry.problem and out.broken is None:
            out.broken = entry
        expected = auditchain.line_digest(line)
    out.head = expected
    return out


@dataclass
class LogCheck:
    """One chained log of a project, verified: its name, file, and result."""

    name: str
    path: Path
    verification: auditchain.Verification


def timeline(spec) -> tuple[list[tuple[str, auditchain.Entry]], list[LogCheck]]:
    """Every entry of the project's three chained logs (operations, quarantine decisions,
    re-identification), each verified with the project key, merged in time order; and the checks."""
    from .deid import KeyStore
    from .quarantine import Quarantine

    checks = [LogCheck("operations", log_path(spec), verify(spec))]
    q = Quarantine.for_spec(spec)
    checks.append(LogCheck("quarantine", q.folder / "decisions.jsonl", q.verification()))
    store = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    reid, _records = store.verify_audit()
    checks.append(LogCheck("reidentify", Path(spec.resolved_key_store) / "audit.jsonl", reid))
    merged = [(c.name, e) for c in checks for e in c.verification.entries]
    merged.sort(key=lambda item: _when(item[1]))
    return merged, checks


def _when(entry: auditchain.Entry) -> datetime:
    """An entry's time, for ordering (the other logs write whole seconds; unreadable: first)."""
    try:
        when = datetime.fromisoformat(str((entry.record or {}).get("when")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def describe(source: str, entry: auditchain.Entry) -> str:
    """One line for ``pacs2bids audit``: number, when, who, what, where; the entry's state."""
    r = entry.record or {}
    who = r.get("operator") or r.get("who") or r.get("account") or "?"
    if r.get("account") and r.get("operator"):
        who = f"{r['operator']} (as {r['account']})"
    what = r.get("action") or r.get("what") or "?"
    skip = {"seq", "prev", "mac", "when", "who", "account", "uid", "host", "operator", "claimed_account",
            "claimed_who", "action", "what", "reason", "note", "project"}
    details = " ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(r.items()) if k not in skip)
    state = "BROKEN: " + entry.problem if entry.problem else ("ok" if entry.signed else "unsigned")
    return f"{source:<11} {entry.number:4d}  {r.get('when', '?')}  {who}  {what}  {details}  [{state}]"


def print_report(spec, out, err, *, merged: bool = False) -> bool:
    """Print the operations log of ``spec`` (with ``merged``: its three logs merged in time order),
    then the operations log's verdict (the CLI prints the other two's); whether it is intact."""
    if merged:
        entries, checks = timeline(spec)
        print(f"timeline of {spec.project} (operations, quarantine decisions, re-identification; oldest first):",
              file=out)
    else:
        checks = [LogCheck("operations", log_path(spec), verify(spec))]
        entries = [("operations", e) for e in checks[0].verification.entries]
    for source, entry in entries:
        print("  " + describe(source, entry), file=out)
    ops = checks[0]
    v = ops.verification
    if v.broken is not None:
        print(f"pacs2bids audit: the operations audit log {ops.path} is BROKEN at entry {v.broken.number}, which "
              f"{v.broken.problem}", file=err)
        return False
    print(f"operations audit log intact: {len(v.entries)} entr{'y' if len(v.entries) == 1 else 'ies'}, head {v.head}",
          file=out)
    return True


def print_site_report(out, err) -> bool:
    """Without a spec: every operations log in ``$PACS2BIDS_AUDIT_DIR``, hash chain only (the
    MACs need each project's secret: give the spec for that). Whether all are intact."""
    configured = os.environ.get(ENV_DIR)
    if not configured:
        print(f"pacs2bids audit: give a SPEC, or set {ENV_DIR} to the folder holding the audit logs", file=err)
        return False
    intact = True
    for path in sorted(Path(configured).glob("operations-audit-*.jsonl")):
        v = verify_chain(path)
        for entry in v.entries:
            print("  " + describe(path.stem.removeprefix("operations-audit-"), entry).replace("[unsigned]",
                                                                                          "[chain ok]"), file=out)
        if v.broken is not None:
            intact = False
            print(f"pacs2bids audit: {path} is BROKEN at entry {v.broken.number}, which {v.broken.problem}", file=err)
        else:
            print(f"{path.name}: hash chain intact, {len(v.entries)} entries, head {v.head} (MACs not checked: "
                  "give the project's SPEC)", file=out)
    return intact
