"""Per-series provenance records in W3C PROV terms (requirements P8, Q3, S5; BIDS provenance proposal BEP028).

One JSON-LD record per converted series under the dataset's ``prov/`` folder
(:mod:`pacs2bids.provdoc`): the agents (pacs2bids and its version, the operator, the Prefect flow
run), the activities retrieve → pseudonymise → convert (tool, version, parameters, start and end),
and the entities: the pseudonymised series (its UID, instance count and the SHA-256 of its
instances' checksums) and every output file (path and SHA-256). Pseudonymised UIDs only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pacs2bids.checksum import sha256_file
from pacs2bids.heuristic_path import heuristic_file, heuristic_sha256
from pacs2bids.provdoc import ProvRecord, standard_agents
from pacs2bids.versions import tool_versions


def series_digest(root: Path, instances: list[Path]) -> dict:
    """The checksum of a pseudonymised series: SHA-256 over its instances' ``path sha256`` lines, in
    path order (each instance's SHA-256 is in the lineage instance table)."""
    lines = sorted(f"{Path(p).relative_to(root).as_posix()} {sha256_file(p)}" for p in instances)
    return {"sha256-of-instance-sha256s": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def _stage(stages: dict, name: str, started, finished) -> tuple:
    s = stages.get(name) or {}
    return s.get("started", started), s.get("ended", finished), s.get("parameters") or {}


def write_series_provenance(path: Path, *, pseudo_study_uid: str, pseudo_series_uid: str,
                            instance_count: int, outputs: list[Path], bids_root: Path, heuristic: str,
                            flow_run_id: str | None, started, finished, extra: dict,
                            instances: list[Path] | None = None, stages: dict | None = None,
                            run_id: str | None = None) -> Path:
    """Write the PROV record of one series at ``path`` (atomically) and return ``path``.

    ``outputs`` are files of the dataset (absolute, or relative to ``bids_root``), each an entity
    with its SHA-256. ``instances`` (absolute paths of the series' pseudonymised DICOM files, under
    ``bids_root``) give the series entity its location and checksum. ``stages`` maps
    ``retrieve``/``pseudonymise``/``convert`` to ``{"started", "ended", "parameters"}``; a stage not
    given takes ``started``/``finished``. ``extra`` (identifier-free) goes to the convert
    activity's parameters. Raises FileNotFoundError if an output or the heuristic is missing.
    """
    bids_root, stages, versions = Path(bids_root), stages or {}, tool_versions()
    rec = ProvRecord()
    agents = standard_agents(rec, versions, flow_run_id, run_id)
    ours = agents[0]
    t0, t1, params = _stage(stages, "retrieve", started, finished)
    retrieve = rec.activity("retrieve", tool=rec.software("pynetdicom", versions.get("pynetdicom")),
                            associated=agents, started=t0, ended=t1, parameters=params)
    t0, t1, params = _stage(stages, "pseudonymise", started, finished)
    deid = rec.activity("pseudonymise", tool=rec.software("pydicom", versions.get("pydicom")), associated=agents,
                        informed_by=[retrieve], started=t0, ended=t1,
                        parameters={"profile": "DICOM PS3.15 Annex E", **params})
    where = None
    if instances:
        where = Path(instances[0]).parent.relative_to(bids_root).as_posix()
    series = rec.entity(f"urn:dicom:uid:{pseudo_series_uid}", "pseudonymised DICOM series", location=where,
                        digest=series_digest(bids_root, instances) if instances else None, generated_by=deid,
                        attributed_to=ours, InstanceCount=int(instance_count),
                        StudyInstanceUID=pseudo_study_uid, SeriesInstanceUID=pseudo_series_uid)
    heur = heuristic_file(heuristic)
    converter = "dcm2niix" if heur.stem == "auto" else "heudiconv"
    t0, t1, params = _stage(stages, "convert", started, finished)
    convert = rec.activity("convert", tool=rec.software(converter, versions.get(converter)),
                           associated=[*agents, *([rec.software("dcm2niix", versions.get("dcm2niix"))]
                                                  if converter != "dcm2niix" else [])],
                           used=[series], informed_by=[deid], started=t0, ended=t1,
                           parameters={"heuristic": heur.stem, "heuristic_sha256": heuristic_sha256(heuristic),
                                       **params, **(extra or {})})
    for out in sorted(outputs, key=str):
        rec.file_entity(bids_root, out, generated_by=convert, derived_from=[series], attributed_to=ours)
    return rec.write(path)


def _records_of_run(root: Path, run_id: str) -> list[Path]:
    from pacs2bids.provdoc import read_records

    out = []
    for p, doc in read_records(root):
        agents = (doc.get("Records") or {}).get("Agents") or []
        if any(a.get("RunId") == run_id for a in agents if isinstance(a, dict)):
            out.append(p)
    return out


def write_run_provenance(root: Path, *, run_id: str, flow_run_id: str | None, started, parameters: dict,
                         ended=None) -> Path:
    """The dataset-level PROV record of one run, ``prov/prov-run-<run_id>.jsonld``: the run as an
    activity of pacs2bids, the operator and the flow run, which generated this version of the dataset
    and the series records written by the run (each an entity with its SHA-256). ``parameters``
    (project, heuristic, ...) must be identifier-free. Returns its path."""
    from datetime import datetime, timezone

    root = Path(root)
    rec = ProvRecord()
    agents = standard_agents(rec, tool_versions(), flow_run_id, run_id)
    run = rec.activity(f"extract_project {run_id}", tool=agents[0], associated=agents[1:], started=started,
                       ended=ended or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       parameters={"run_id": run_id, **parameters})
    members = [rec.file_entity(root, p, generated_by=run, attributed_to=agents[0])
               for p in _records_of_run(root, run_id)]
    rec.entity(f"urn:pacs2bids:dataset-version:{run_id}", "BIDS dataset version", location=".",
               generated_by=run, attributed_to=agents[0], HadMember=members)
    return rec.write(root / "prov" / f"prov-run-{run_id}.jsonld")
