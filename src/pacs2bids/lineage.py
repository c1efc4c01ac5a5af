"""Lineage: where each output file came from, one Parquet file per run, kept with the dataset.

Rows hold pseudonymised identifiers only (subject and session codes, pseudonymised Study and
Series Instance UIDs), stage statuses and checksums. All lineage goes through :data:`SCHEMA`.
The table lives in ``<dataset>/.pacs2bids/lineage/run-<run_id>.parquet``; a later run adds its
own file next to the earlier ones, and readers see the union.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .checksum import sha256_file

LINEAGE_DIR = Path(".pacs2bids") / "lineage"

SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("flow_run_id", pa.string()),
        pa.field("project", pa.string(), nullable=False),
        pa.field("recorded_at", pa.timestamp("s", tz="UTC"), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("session", pa.string()),
        pa.field("pseudo_study_uid", pa.string()),
        pa.field("pseudo_series_uid", pa.string()),
        pa.field("series_number", pa.int32()),
        pa.field("instances_announced", pa.int32()),
        pa.field("instances_received", pa.int32()),
        pa.field("retrieve_status", pa.string()),
        pa.field("pseudonymise_status", pa.string()),
        pa.field("convert_status", pa.string()),
        pa.field("validate_status", pa.string()),
        pa.field("publish_status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("path", pa.string()),  # relative to the dataset root; null for a series with no output
        pa.field("sha256", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("pacs2bids_version", pa.string()),
        pa.field("heuristic_sha256", pa.string()),
    ]
)


@dataclass
class LineageRecord:
    subject: str
    session: str | None
    pseudo_study_uid: str | None = None
    pseudo_series_uid: str | None = None
    series_number: int | None = None
    instances_announced: int | None = None
    instances_received: int | None = None
    retrieve_status: str | None = None
    pseudonymise_status: str | None = None
    convert_status: str | None = None
    validate_status: str | None = None
    publish_status: str | None = None
    reason: str | None = None
    path: str | None = None
    sha256: str | None = None
    size: int | None = None
    extra: dict = field(default_factory=dict)


def write_run(
    dataset_root: Path,
    records: Iterable[LineageRecord],
    *,
    run_id: str,
    project: str,
    flow_run_id: str | None,
    pacs2bids_version: str,
    heuristic_sha256: str | None,
) -> Path:
    """Write this run's lineage table; returns its path. Checksums are computed here for
    records whose ``path`` exists and has no ``sha256`` yet."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    rows = []
    for r in records:
        if r.path and r.sha256 is None:
            f = dataset_root / r.path
            if f.is_file():
                r.sha256, r.size = sha256_file(f), f.stat().st_size
        rows.append(
            {
                "run_id": run_id,
                "flow_run_id": flow_run_id,
                "project": project,
                "recorded_at": now,
                "subject": r.subject,
                "session": r.session,
                "pseudo_study_uid": r.pseudo_study_uid,
                "pseudo_series_uid": r.pseudo_series_uid,
                "series_number": r.series_number,
                "instances_announced": r.instances_announced,
                "instances_received": r.instances_received,
                "retrieve_status": r.retrieve_status,
                "pseudonymise_status": r.pseudonymise_status,
                "convert_status": r.convert_status,
                "validate_status": r.validate_status,
                "publish_status": r.publish_status,
                "reason": r.reason,
                "path": r.path,
                "sha256": r.sha256,
                "size": r.size,
                "pacs2bids_version": pacs2bids_version,
                "heuristic_sha256": heuristic_sha256,
            }
        )
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    out = dataset_root / LINEAGE_DIR / f"run-{run_id}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return out


def find_dataset_root(path: Path) -> Path:
    """The dataset holding ``path``: the nearest parent with a lineage folder."""
    p = path.resolve()
    for candidate in (p, *p.parents):
        if (candidate / LINEAGE_DIR).is_dir():
            return candidate
    raise FileNotFoundError(f"{path} is not inside a pacs2bids dataset (no {LINEAGE_DIR} above it)")


def read_lineage(dataset_root: Path) -> pa.Table:
    """Every run's lineage of a dataset, as one table."""
    folder = dataset_root / LINEAGE_DIR
    files = sorted(folder.glob("run-*.parquet"))
    if not files:
        return SCHEMA.empty_table()
    return ds.dataset(files, schema=SCHEMA, format="parquet").to_table()


def lineage_of(path: Path) -> tuple[Path, list[dict]]:
    """The lineage rows of one file (or of every file of the series it belongs to), newest run first.

    ``path`` may be a NIfTI, sidecar, bval/bvec, a provenance JSON, or a pseudonymised DICOM
    folder under ``sourcedata/``; rows of the same series are returned for a folder.
    """
    root = find_dataset_root(path)
    rel = path.resolve().relative_to(root).as_posix()
    table = read_lineage(root)
    rows = [r for r in table.to_pylist() if r["path"] == rel]
    if not rows:
        # a folder or a file not listed itself: match rows whose path lies under it,
        # or the series that a sibling file (same stem) belongs to
        stem = rel
        for suffix in (".nii.gz", ".nii", ".json", ".bval", ".bvec"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        rows = [
            r
            for r in table.to_pylist()
            if r["path"] and (r["path"].startswith(rel.rstrip("/") + "/") or r["path"].startswith(stem + "."))
        ]
    rows.sort(key=lambda r: r["recorded_at"], reverse=True)
    return root, rows


def format_chain(root: Path, path: Path, rows: list[dict]) -> str:
    """Human-readable chain for ``pacs2bids lineage``."""
    if not rows:
        return f"{path}: no lineage record in {root / LINEAGE_DIR}"
    lines = [f"{path}"]
    for r in rows:
        ses = f" ses-{r['session']}" if r["session"] else ""
        lines += [
            f"  run {r['run_id']} (Prefect flow run {r['flow_run_id'] or '-'}) at {r['recorded_at']:%Y-%m-%d %H:%M:%S} UTC",
            f"    project {r['project']}, sub-{r['subject']}{ses}",
            f"    study  {r['pseudo_study_uid'] or '-'} (pseudonymised)",
            f"    series {r['pseudo_series_uid'] or '-'} #{r['series_number'] if r['series_number'] is not None else '-'}"
            f" ({r['instances_received']}/{r['instances_announced']} instances)",
            "    stages: "
            + ", ".join(
                f"{s}={r[s + '_status'] or '-'}" for s in ("retrieve", "pseudonymise", "convert", "validate", "publish")
            ),
            f"    file   {r['path']} sha256={r['sha256'] or '-'} ({r['size'] if r['size'] is not None else '-'} bytes)",
            f"    pacs2bids {r['pacs2bids_version']}, heuristic sha256 {r['heuristic_sha256'] or '-'}",
        ]
        if r["reason"]:
            lines.append(f"    note   {r['reason']}")
    return "\n".join(lines)
