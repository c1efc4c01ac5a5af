"""W3C PROV records in the terms of the BIDS provenance proposal (BEP028, "BIDS-Prov"), as plain JSON-LD.

A record is ``{"@context": ..., "Records": {"Software": [...], "Agents": [...], "Activities": [...],
"Entities": [...]}}``: BEP028's context maps ``Software`` to ``prov:Agent``, ``Activities`` to
``prov:Activity``, ``Entities`` to ``prov:Entity``, and ``Used``, ``GeneratedBy``, ``AssociatedWith``,
``StartedAtTime``, ``EndedAtTime``, ``AtLocation`` to their PROV-O relations; the few terms it lacks
(people and runs as ``Agents``, ``Digest``, ``Parameters``, ``InstanceCount``, ``DerivedFrom``) are added
by a second, inline context. Records live under ``prov/`` at the dataset root (the proposal's folder; the
installed validator's BIDS 1.11 schema does not know it yet, so ``.bidsignore`` lists it).

Adding a stage (deface, QC) is one :meth:`ProvRecord.activity` call plus one
:meth:`ProvRecord.file_entity` per file it wrote. Nothing here may hold an original identifier:
entities are named by pseudonymised UIDs and dataset paths, the operator by an OS account or
``$PACS2BIDS_OPERATOR``.
"""

from __future__ import annotations

import getpass
import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Iterable

from .checksum import sha256_file

PROV_DIR = Path("prov")
BEP028_CONTEXT = "https://raw.githubusercontent.com/bids-standard/BEP028_BIDSprov/master/context.json"
EXTRA_CONTEXT = {
    "Agents": "prov:Agent",
    "Person": "prov:Person",
    "SoftwareAgent": "prov:SoftwareAgent",
    "Digest": {"@id": "urn:pacs2bids:terms#digest", "@type": "@json"},
    "Parameters": {"@id": "urn:pacs2bids:terms#parameters", "@type": "@json"},
    "InstanceCount": "urn:pacs2bids:terms#instanceCount",
    "Version": "urn:pacs2bids:terms#version",
    "Method": "urn:pacs2bids:terms#method",
    "DerivedFrom": {"@id": "prov:wasDerivedFrom", "@type": "@id"},
    "InformedBy": {"@id": "prov:wasInformedBy", "@type": "@id"},
}
KINDS = ("Software", "Agents", "Activities", "Entities")


def _iso(t) -> str | None:
    if t is None:
        return None
    return t.isoformat() if isinstance(t, datetime) else str(t)


def operator() -> str:
    """Who ran pacs2bids: ``$PACS2BIDS_OPERATOR``, else the OS account."""
    name = os.environ.get("PACS2BIDS_OPERATOR", "").strip()
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in text).strip("-") or "x"


class ProvRecord:
    """One PROV record being built; each method adds one node (once per Id) and returns its Id."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, dict]] = {k: {} for k in KINDS}

    def _add(self, kind: str, node: dict) -> str:
        node = {k: v for k, v in node.items() if v not in (None, [], {})}
        self.nodes[kind].setdefault(node["Id"], node)
        return node["Id"]

    def software(self, name: str, version: str | None, **extra) -> str:
        """A program (a PROV agent) by name and version."""
        return self._add("Software", {"Id": f"urn:pacs2bids:software:{_slug(name)}-{_slug(str(version))}",
                                      "Label": name, "Version": version or "unknown", **extra})

    def person(self, name: str, **extra) -> str:
        """A person or team (a PROV agent): the operator, a result's producer."""
        return self._add("Agents", {"Id": f"urn:pacs2bids:person:{_slug(name)}", "Type": "Person",
                                    "Label": name, **extra})

    def flow_run(self, flow_run_id: str | None, run_id: str | None = None) -> str | None:
        """The Prefect flow run (a PROV software agent acting for pacs2bids), if any."""
        if not flow_run_id:
            return None
        return self._add("Agents", {"Id": f"urn:prefect:flow-run:{flow_run_id}", "Type": "SoftwareAgent",
                                    "Label": f"Prefect flow run {flow_run_id}", "RunId": run_id})

    def activity(self, label: str, *, tool: str, started=None, ended=None, parameters: dict | None = None,
                 used: Iterable[str] = (), associated: Iterable[str | None] = (), informed_by: Iterable[str] = (),
                 command: str | None = None) -> str:
        """One stage that ran: ``tool`` is a :meth:`software` Id; ``associated`` more agents (operator,
        flow run, producer); ``used`` the entities it read."""
        return self._add("Activities", {
            "Id": f"urn:pacs2bids:activity:{_slug(label)}-{uuid.uuid4().hex[:16]}", "Label": label,
            "Command": command, "AssociatedWith": [tool, *[a for a in associated if a]],
            "Used": list(used), "InformedBy": list(informed_by), "StartedAtTime": _iso(started),
            "EndedAtTime": _iso(ended), "Parameters": parameters or {},
        })

    def entity(self, ident: str, label: str, *, location: str | None = None, digest: dict | None = None,
               generated_by: str | None = None, derived_from: Iterable[str] = (), attributed_to: str | None = None,
               **extra) -> str:
        return self._add("Entities", {"Id": ident, "Label": label, "AtLocation": location, "Digest": digest,
                                      "GeneratedBy": generated_by, "DerivedFrom": list(derived_from),
                                      "AttributedTo": attributed_to, **extra})

    def file_entity(self, root: Path, path: Path | str, *, generated_by: str | None = None,
                    derived_from: Iterable[str] = (), attributed_to: str | None = None) -> str:
        """A file of the dataset, by its path relative to ``root`` and its SHA-256."""
        p = Path(path)
        absolute = p if p.is_absolute() else Path(root) / p
        rel = absolute.relative_to(root).as_posix()
        return self.entity(f"bids::{rel}", Path(rel).name, location=rel,
                           digest={"sha256": sha256_file(absolute)}, generated_by=generated_by,
                           derived_from=derived_from, attributed_to=attributed_to, Size=absolute.stat().st_size)

    def to_jsonld(self) -> dict:
        return {"@context": [BEP028_CONTEXT, EXTRA_CONTEXT],
                "Records": {k: list(v.values()) for k, v in self.nodes.items() if v}}

    def write(self, path: Path) -> Path:
        """Write the record at ``path`` (atomically); returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_jsonld(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


def standard_agents(rec: ProvRecord, versions: dict, flow_run_id: str | None, run_id: str | None = None) -> list[str]:
    """pacs2bids itself, the operator and the Prefect flow run: the agents of every pacs2bids activity."""
    return [rec.software("pacs2bids", versions.get("pacs2bids")), rec.person(operator(), Role="operator"),
            *([rec.flow_run(flow_run_id, run_id)] if flow_run_id else [])]


def read_records(root: Path) -> list[tuple[Path, dict]]:
    """Every PROV record of a dataset (``prov/**/*.jsonld``), with its path."""
    out = []
    for p in sorted((Path(root) / PROV_DIR).rglob("*.jsonld")):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def index(records: Iterable[dict]) -> dict[str, dict]:
    """Every node of ``records`` by Id (later records win), each tagged with its kind."""
    nodes: dict[str, dict] = {}
    for doc in records:
        for kind, items in (doc.get("Records") or {}).items():
            for node in items or []:
                if isinstance(node, dict) and "Id" in node:
                    nodes[node["Id"]] = {**node, "_kind": kind}
    return nodes


def record_stage(root: Path, label: str, *, tool: str, version: str | None, inputs: Iterable[str | Path],
                 outputs: Iterable[str | Path], started=None, ended=None, parameters: dict | None = None,
                 flow_run_id: str | None = None, run_id: str | None = None, key: str | None = None) -> Path:
    """One call for a later stage (deface, QC, ...): a record ``prov/prov-<label>-<run>[-<key>].jsonld``
    (``key``: one record per image, say, within a run) in which
    the activity ``label`` (``tool`` ``version``, with pacs2bids, the operator and the flow run) used
    ``inputs`` and generated ``outputs`` (dataset files, relative to ``root`` or absolute; each with its
    SHA-256, derived from the inputs). Inputs are named as the series records name them (``bids::<path>``),
    so ``pacs2bids lineage`` follows an output back through them. Returns the record's path."""
    from .versions import tool_versions

    root = Path(root)
    rec = ProvRecord()
    agents = standard_agents(rec, tool_versions(), flow_run_id, run_id)
    used = [rec.file_entity(root, p) for p in inputs]
    act = rec.activity(label, tool=rec.software(tool, version), associated=agents, used=used, started=started,
                       ended=ended, parameters=parameters)
    for p in outputs:
        rec.file_entity(root, p, generated_by=act, derived_from=used, attributed_to=agents[0])
    name = f"prov-{_slug(label)}-{_slug(run_id or act.rsplit('-', 1)[-1])}{'-' + _slug(key) if key else ''}.jsonld"
    return rec.write(root / PROV_DIR / name)
