"""Tertiary reintegration: a researcher's derivative dataset brought back into the project dataset.

``pacs2bids reintegrate SPEC FOLDER --producer NAME --tool T --tool-version V --method TEXT`` (or
``--producer-file producer.json``) checks FOLDER, then publishes a NEW version of the project
dataset holding it under ``derivatives/<name>/``, with a PROV record (``prov/``) naming its producer
and a reintegration record (``.pacs2bids/reintegrations/<run>.json``, in the version's manifest).

Refused, with the reason and nothing changed, when: the producer is not described (person or team,
tool, version, method); FOLDER is not a BIDS derivative dataset (``dataset_description.json`` with
``DatasetType: derivative``) or the validator reports errors on it; a subject is not one of the
published dataset's pseudonyms; a file holds a symlink or an identifying value of the project (the
leak scan, with the project's key store, over names and contents). Publishing reuses the run's own
steps (:func:`pacs2bids.publish.work_area`, :func:`~pacs2bids.publish.publish_local`,
:func:`pacs2bids.targets.step.publish_to_target`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import audit
from .versions import tool_versions
from .deid import scan_for_leaks
from .errors import LeakDetected, Pacs2BidsError
from .provdoc import PROV_DIR, ProvRecord, standard_agents
from .publish import current_version, staging_dir, work_area, write_marker
from .run import META, RunContext
from .validate import validate_dataset

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ReintegrationRefused(Pacs2BidsError):
    """The dataset brought back was refused; nothing was changed."""


@dataclass
class Producer:
    """Who made the results and how: a person or team, the tool and its version, the method."""

    name: str = ""
    tool: str = ""
    tool_version: str = ""
    method: str = ""

    @classmethod
    def from_file(cls, path: Path) -> "Producer":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReintegrationRefused(f"producer file {path} cannot be read as JSON: {exc}") from None
        keys = {"name", "tool", "tool_version", "method"}
        return cls(**{k: str(v) for k, v in data.items() if k in keys})

    def missing(self) -> list[str]:
        return [k for k, v in asdict(self).items() if not v.strip()]


@dataclass
class Reintegrated:
    name: str
    version: Path
    files: int
    subjects: list[str]
    targets: list = field(default_factory=list)


def _description(folder: Path) -> dict:
    path = folder / "dataset_description.json"
    try:
        desc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReintegrationRefused(f"{folder} is not a BIDS dataset: no dataset_description.json") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ReintegrationRefused(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(desc, dict) or desc.get("DatasetType") != "derivative":
        raise ReintegrationRefused(f"{path}: DatasetType must be \"derivative\" (a BIDS derivative dataset), "
                                   f"found {desc.get('DatasetType') if isinstance(desc, dict) else desc!r}")
    return desc


def check_folder(spec, folder: Path, producer: Producer, name: str | None = None) -> tuple[str, list[str]]:
    """Every check of the module docstring, cheapest first; returns ``(name, subjects)`` or raises
    :class:`ReintegrationRefused` naming the first problem."""
    folder = Path(folder)
    if missing := producer.missing():
        raise ReintegrationRefused("the producer is not described: give " + ", ".join(
            f"--{m.replace('_', '-')}" for m in missing) + " (or a --producer-file with those keys)")
    if not folder.is_dir():
        raise ReintegrationRefused(f"no folder at {folder}")
    desc = _description(folder)
    name = name or str(desc.get("Name") or "")
    if not _NAME.match(name):
        raise ReintegrationRefused(f"derivative name {name!r} is not a folder name (letters, digits, '.', '_', "
                                   "'-'): give --name")
    if name.lower().startswith("pacs2bids"):
        raise ReintegrationRefused(f"derivatives/{name} is pacs2bids' own (deface, QC): give another --name")
    if links := [p for p in folder.rglob("*") if p.is_symlink()]:
        raise ReintegrationRefused(f"{links[0]} is a symlink: copy the file itself into the dataset")
    published = current_version(spec.output)
    if published is None:
        raise ReintegrationRefused(f"the project has no published dataset at {spec.output} to bring results into")
    ours = {p.name for p in published.glob("sub-*") if p.is_dir()}
    theirs = sorted({p.name for p in folder.glob("sub-*")})
    if not theirs:
        raise ReintegrationRefused(f"{folder} holds no sub-* folder: results must be filed by the project's subjects")
    if foreign := [s for s in theirs if s not in ours]:
        raise ReintegrationRefused(f"{len(foreign)} subject(s) are not the project's pseudonyms: "
                                   f"{', '.join(foreign[:5])} (not in the published dataset)")
    _leak_check(spec, folder, "the dataset brought back")
    report = validate_dataset(folder)
    if report.errors:
        raise ReintegrationRefused(f"{folder} is not a valid BIDS derivative dataset:\n{report.summary()}")
    return name, theirs


def _leak_check(spec, root: Path, what: str) -> None:
    from .study import pseudonymiser

    hits = scan_for_leaks(root, pseudonymiser(spec).identifiers())
    if hits:
        where = "; ".join(f"{h.path} ({h.field})" for h in hits[:10])
        raise LeakDetected(f"{what} holds {len(hits)} identifying value(s) of the project: {where}")


def _record(staging: Path, dest: Path, name: str, producer: Producer, run_id: str, started: str) -> Path:
    """The PROV record of the reintegration: the producer's activity (its tool, method) generated each
    file; pacs2bids' reintegration (operator) used them."""
    rec = ProvRecord()
    agents = standard_agents(rec, tool_versions(), None, run_id)
    person = rec.person(producer.name, Role="producer")
    tool = rec.software(producer.tool, producer.tool_version)
    made = rec.activity(f"produce {name}", tool=tool, associated=[person], parameters={"method": producer.method})
    files = [rec.file_entity(staging, p, generated_by=made, attributed_to=person)
             for p in sorted(dest.rglob("*")) if p.is_file()]
    rec.activity(f"reintegrate {name}", tool=agents[0], associated=agents[1:], used=files, started=started,
                 ended=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 parameters={"derivative": f"derivatives/{name}", "run_id": run_id})
    return rec.write(staging / PROV_DIR / f"prov-reintegrate-{name}-{run_id}.jsonld")


def reintegrate(spec, folder: Path, producer: Producer, *, name: str | None = None,
                run_id: str | None = None) -> Reintegrated:
    """Check ``folder`` (:func:`check_folder`) and publish a new version of the project dataset with it
    under ``derivatives/<name>/`` (an earlier one of that name is replaced), then send that version to
    the spec's secondary targets. Raises :class:`ReintegrationRefused`, :class:`LeakDetected` or
    :class:`~pacs2bids.errors.ValidationFailed` with nothing published. ``run_id`` names the new version
    (default: a new one; the flow ``reintegrate_derivative`` gives its run's)."""
    try:
        name, subjects = check_folder(spec, folder, producer, name)
        return _publish(spec, folder, producer, name, subjects, run_id)
    except Pacs2BidsError as exc:  # a refusal is audited too: who tried what; the reason's kind, not its text
        if isinstance(exc, audit.AuditError):
            raise
        audit.record(spec, "reintegrate", outcome="refused", refusal=type(exc).__name__, derivative=name,
                     producer=producer.name or None)
        raise


def _publish(spec, folder: Path, producer: Producer, name: str, subjects: list[str],
             run_id: str | None = None) -> Reintegrated:
    """The checked ``folder`` into a new version of the project dataset (see :func:`reintegrate`)."""
    from .publish import publish_local
    from .targets.step import publish_to_target

    run_id = run_id or RunContext.new_run_id(None)
    ctx = RunContext(spec, run_id, None, staging_dir(spec.output, spec.resolved_work_dir, run_id), tool_versions())
    with work_area(ctx):  # the run lock, staging seeded from the current version, removed on leaving
        dest = ctx.staging / "derivatives" / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest)
        prov = _record(ctx.staging, dest, name, producer, run_id, ctx.started)
        n = sum(1 for p in dest.rglob("*") if p.is_file())
        note = {"run_id": run_id, "derivative": f"derivatives/{name}", "files": n, "subjects": subjects,
                "producer": asdict(producer), "provenance": prov.relative_to(ctx.staging).as_posix(),
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        notes = ctx.staging / META / "reintegrations" / f"{run_id}.json"
        notes.parent.mkdir(parents=True, exist_ok=True)
        notes.write_text(json.dumps(note, indent=2) + "\n")
        validate_dataset(ctx.staging).check()
        write_marker(ctx.staging, spec.project, spec.secret_bytes)
        _leak_check(spec, ctx.staging, "the new version")
        version = publish_local(ctx.staging, spec.output, run_id)
    log.info("derivatives/%s (%d files, %d subjects) published in version %s", name, n, len(subjects), run_id)
    targets = [publish_to_target(spec, i, version) for i in range(len(spec.targets or []))]
    audit.record(spec, "reintegrate", outcome="published", run_id=run_id, version=version.name,
                 derivative=f"derivatives/{name}", files=n, subjects=len(subjects), producer=producer.name,
                 tool=f"{producer.tool} {producer.tool_version}".strip(), where=str(spec.output),
                 targets=[{"target": getattr(t, "target", None), "state": getattr(t, "state", None)} for t in targets])
    return Reintegrated(name, version, n, subjects, targets)
