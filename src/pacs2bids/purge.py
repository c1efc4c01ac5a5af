"""Retention: what a project's ``retention`` says must go, listed and deleted (issue 14).

A version expires when it is no longer the current one and was published more than
``retention.keep_days`` days ago. From the day after ``retention.project_end`` everything goes:
every version (the current one included, its pointer first, so readers see no dataset rather than
half of one), locally and on every storage target; the work area (raw copies, quarantine, dead
letters, staging); and the matching key (``keys.journal``, ``keys.fernet``). The audit logs stay:
the re-identification log in the key store folder, and the operations log
(:mod:`pacs2bids.audit`), where every purge is recorded with what it deleted. A purge that
deletes the quarantine first seals the head of its decision log there.

A research PACS target that is an Orthanc whose REST API the spec gives (``purge:`` on the target)
loses the expired versions' studies that no staying version holds
(:mod:`pacs2bids.targets.research_pacs_purge`); they are deleted before the local versions, and a
local version whose studies could not be deleted there is kept, so the next purge can still find
them. Any other research PACS is listed as not purgeable, with the reason. A purge refuses to
start while a run of the project is alive (its work lock).

:func:`plan_purge` lists (``pacs2bids purge SPEC --dry-run``); :func:`execute` deletes and records.
Plain Python: the flow ``purge_project`` (flows/purge.py) orchestrates. No original identifier is
involved: versions are run ids, places are paths and target names.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import audit
from .errors import Pacs2BidsError, PacsError
from .targets.research_pacs_purge import NOT_PURGEABLE
from .publish import MANIFEST, current_version, published_versions, versions_dir

KEY_FILES = ("keys.journal", "keys.fernet")  # the matching key; audit.jsonl / audit.fernet are logs, kept

log = logging.getLogger(__name__)


class PurgeError(Pacs2BidsError):
    """A purge cannot start (a run is alive, a target cannot be listed)."""


@dataclass
class PurgeItem:
    """One thing to delete: ``where`` (local, a target's name, work, quarantine, key store),
    ``what`` (a version id or a folder), ``reason``; ``error`` once tried and failed."""

    where: str
    what: str
    reason: str
    current: bool = False
    error: str = ""
    studies: list[str] = field(default_factory=list, repr=False)  # research PACS: pseudonymised study UIDs


@dataclass
class PurgePlan:
    project: str
    today: str
    ended: bool
    keep_days: int | None
    items: list[PurgeItem] = field(default_factory=list)
    not_purgeable: list[str] = field(default_factory=list)  # targets deleted by other means (research PACS)


def _published(version: Path) -> datetime | None:
    """When a local version was published (its manifest), else its folder's modification time."""
    try:
        return _parse(json.loads((version / MANIFEST).read_text()).get("published"))
    except (OSError, ValueError, AttributeError):
        try:
            return datetime.fromtimestamp(version.stat().st_mtime, timezone.utc)
        except OSError:
            return None


def _parse(when: str | None) -> datetime | None:
    if not when:
        return None
    try:
        parsed = datetime.fromisoformat(when)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _expired(published: datetime | None, current: bool, ended: bool, cutoff: datetime) -> str | None:
    """Why a version goes, or None when it stays."""
    if ended:
        return "the project has ended"
    if current:
        return None
    if published is None:
        return None  # no date: never guessed expired
    return f"published {published.date().isoformat()}, more than the retention's days ago" if published < cutoff \
        else None


def plan_purge(spec, *, now: datetime | None = None) -> PurgePlan:
    """Everything the spec's retention says must go now (nothing is deleted)."""
    now = now or datetime.now(timezone.utc)
    retention = spec.retention
    ended = bool(retention and retention.project_end and now.date() > retention.project_end)
    plan = PurgePlan(spec.project, now.date().isoformat(), ended, retention.keep_days if retention else None)
    if retention is None:
        return plan
    cutoff = now - timedelta(days=retention.keep_days)
    current = current_version(spec.output)
    local: list[tuple[Path, bool, str | None]] = []
    for v in published_versions(spec.output):
        is_current = current is not None and v.resolve() == current.resolve()
        why = _expired(_published(v), is_current, ended, cutoff)
        local.append((v, is_current, why))
        if why:
            plan.items.append(PurgeItem("local", v.name, why, current=is_current))
    _plan_targets(spec, plan, ended, cutoff, local)
    if ended:
        work = Path(spec.resolved_work_dir)
        if (work / "quarantine").exists():
            plan.items.append(PurgeItem("quarantine", str(work / "quarantine"), "the project has ended"))
        if work.exists():
            plan.items.append(PurgeItem("work", str(work), "the project has ended"))
        keys = [n for n in KEY_FILES if (Path(spec.resolved_key_store) / n).exists()]
        if keys:
            plan.items.append(PurgeItem("key store", ", ".join(keys), "the project has ended"))
    return plan


def _plan_targets(spec, plan: PurgePlan, ended: bool, cutoff: datetime, local: list) -> None:
    from .targets import Purgeable, open_targets
    from .targets.research_pacs_purge import studies_to_delete

    studies = None
    for target in open_targets(spec):
        if getattr(getattr(target, "settings", None), "purge", None) is not None:  # a research PACS: its studies
            studies = studies if studies is not None else studies_to_delete([(v, bool(why)) for v, _, why in local])
            plan.items += [PurgeItem(target.name, v.name, why, current=cur, studies=studies[v.name])
                           for v, cur, why in local if why]
            continue
        if not isinstance(target, Purgeable):
            plan.not_purgeable.append(target.name)
            continue
        for v in target.versions():
            why = _expired(_parse(v.get("published")), bool(v.get("current")), ended, cutoff)
            if why:
                plan.items.append(PurgeItem(target.name, v["version"], why, current=bool(v.get("current"))))


def format_plan(plan: PurgePlan, *, dry_run: bool) -> str:
    head = "would delete" if dry_run else "deleted"
    if plan.keep_days is None:
        return f"{plan.project}: no retention in the spec: nothing expires"
    lines = [f"{plan.project}: retention {plan.keep_days} day(s)" + (", project ended" if plan.ended else "")
             + f"; {head} {len(plan.items)} item(s) on {plan.today}"]
    for i in plan.items:
        state = f"  FAILED: {i.error}" if i.error else ""
        there = f", {len(i.studies)} stud(ies) there" if i.where not in _LOCAL and i.studies else ""
        lines.append(f"  {i.where:<16} {i.what}{' (current)' if i.current else ''}  ({i.reason}{there}){state}")
    for name in plan.not_purgeable:
        lines.append(f"  {name:<16} {NOT_PURGEABLE}")
    return "\n".join(lines)


class _WorkLock:
    """The project's run lock (:class:`pacs2bids.publish.RunLock`) taken exclusively: no run alive."""

    def __init__(self, work: Path):
        self.path = work / "run.lock"
        self.fd: int | None = None

    def __enter__(self):
        if self.path.parent.exists():
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise PurgeError(f"a run of this project is alive (it holds {self.path}): purge after it ends") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def execute(spec, plan: PurgePlan, *, logger: logging.Logger | logging.LoggerAdapter = log) -> PurgePlan:
    """Delete every item of ``plan`` (current versions last, after the others) and record the
    purge in the audit log, failures included. Returns the plan with each item's error."""
    sealed = _seal_quarantine(spec) if any(i.where == "quarantine" for i in plan.items) else None
    with _WorkLock(Path(spec.resolved_work_dir)):
        targets = _purgeable_targets(spec) if any(i.where not in _LOCAL for i in plan.items) else {}
        for item in sorted(plan.items, key=lambda i: (i.current, i.where in _LOCAL)):  # research PACS first
            try:
                _kept_for_pacs(item, plan)
                _delete(spec, item, targets, logger)
            except Exception as exc:  # noqa: BLE001 - one failure does not stop the rest; recorded
                item.error = str(exc)[:300]
                logger.error("purge: %s %s not deleted: %s", item.where, item.what, item.error)
    audit.record(spec, "purge", ended=plan.ended, keep_days=plan.keep_days,
                 deleted=[_entry(i) for i in plan.items if not i.error],
                 failed=[{**_entry(i), "reason": i.reason, "error": i.error} for i in plan.items if i.error],
                 not_purgeable=plan.not_purgeable,
                 output=str(spec.output), **({"quarantine_decisions": sealed} if sealed else {}))
    return plan


_LOCAL = ("local", "work", "quarantine", "key store")


def _entry(item: PurgeItem) -> dict:
    """An item as the audit log records it: places, version ids and counts (study UIDs are counted)."""
    return {"where": item.where, "what": item.what, "current": item.current,
            **({"studies": len(item.studies)} if item.where not in _LOCAL and item.studies else {})}


def _kept_for_pacs(item: PurgeItem, plan: PurgePlan) -> None:
    """A local version stays while a research PACS could not delete its studies (they are found from it)."""
    if item.where == "local":
        stuck = [i.where for i in plan.items if i.where not in _LOCAL and i.what == item.what and i.error and i.studies]
        if stuck:
            raise PurgeError(f"kept: research PACS {', '.join(stuck)} still holds its studies; the next purge tries "
                             "again and deletes it then")


def _purgeable_targets(spec) -> dict:
    from .targets import Purgeable, open_targets
    from .targets.research_pacs_purge import OrthancStudyPurger

    out: dict = {}
    for t in open_targets(spec):
        settings = getattr(t, "settings", None)
        if getattr(settings, "purge", None) is not None:
            try:
                out[t.name] = OrthancStudyPurger(t.name, settings.purge, t.environ)
            except PacsError as exc:  # its items fail with this; the other targets are purged
                out[t.name] = exc
        elif isinstance(t, Purgeable):
            out[t.name] = t
    return out


def _delete(spec, item: PurgeItem, targets: dict, logger) -> None:
    if item.where == "local":
        if item.current and Path(spec.output).is_symlink():
            Path(spec.output).unlink()  # the pointer first: readers find no dataset, never half of one
        shutil.rmtree(versions_dir(Path(spec.output)) / item.what)
        if not any(versions_dir(Path(spec.output)).iterdir()):
            versions_dir(Path(spec.output)).rmdir()
    elif item.where in ("work", "quarantine"):
        if Path(item.what).exists():
            shutil.rmtree(item.what)
    elif item.where == "key store":
        for name in KEY_FILES:
            (Path(spec.resolved_key_store) / name).unlink(missing_ok=True)
    elif isinstance(targets[item.where], PacsError):  # a research PACS whose purger could not be made
        raise targets[item.where]
    elif hasattr(targets[item.where], "delete_studies"):
        targets[item.where].delete_studies(item.studies, log=logger)
    else:
        targets[item.where].delete_version(item.what, log=logger)
    logger.info("purge: %s %s deleted (%s)", item.where, item.what, item.reason)


def _seal_quarantine(spec) -> dict | None:
    """The quarantine decision log's entry count and head, to keep in the audit log once it is gone."""
    from .quarantine import Quarantine

    try:
        v = Quarantine.for_spec(spec).verification()
    except Exception as exc:  # noqa: BLE001 - sealing is best effort; the purge says why it could not
        return {"sealed": False, "why": type(exc).__name__}
    return {"entries": len(v.entries), "head": v.head, "intact": v.intact}
