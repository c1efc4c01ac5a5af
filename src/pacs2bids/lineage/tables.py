"""Lineage: where each output file came from, one Parquet file per run, kept with the dataset.

Rows hold pseudonymised identifiers only (subject and session codes, pseudonymised Study and
Series Instance UIDs), stage statuses and checksums. All lineage goes through :data:`SCHEMA`.
The table lives in ``<dataset>/.pacs2bids/lineage/run-<run_id>.parquet``; a later run adds its
own file next to the earlier ones, and readers see the union.

Per instance, a second table, :data:`INSTANCE_SCHEMA`, in ``instances-<run_id>.parquet``: one
row per pseudonymised DICOM file the run published under ``sourcedata/`` (its pseudonymised
SOP Instance UID, path, SHA-256 and size), with the transport that brought the received file
and that file's checksum as recorded on receipt. That checksum is keyed
(:meth:`pacs2bids.deid.keyed.Keyed.received_digest`, HMAC-SHA256 under a key derived from the
project secret): a plain SHA-256 would let anyone holding the clinical file link it to its
pseudonym; with the key, the holder can check which clinical file a research file came from.
The digest is of the file as received: over WADO-RS, the PACS's file as it serves it; over
C-GET and C-MOVE, pynetdicom writes the File Meta Information itself, so it matches what the
same transport delivers, not the PACS's own copy byte for byte.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..checksum import sha256_file
from ..memory import arrow_system_pool, give_back

arrow_system_pool()  # the tables' buffers go back to the system with the rest (pacs2bids.memory)
LINEAGE_DIR = Path(".pacs2bids") / "lineage"


def table_path(dataset_root: Path, kind: str, run_id: str) -> Path:
    """Where a run's lineage table of ``kind`` (``run``: a row per output; ``instances``: a row per
    instance) is in the dataset."""
    return dataset_root / LINEAGE_DIR / f"{kind}-{run_id}.parquet"

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
    out = table_path(dataset_root, "run", run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return out


INSTANCE_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("project", pa.string(), nullable=False),
        pa.field("recorded_at", pa.timestamp("s", tz="UTC"), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("session", pa.string()),
        pa.field("pseudo_study_uid", pa.string()),
        pa.field("pseudo_series_uid", pa.string()),
        pa.field("pseudo_sop_instance_uid", pa.string()),
        pa.field("path", pa.string(), nullable=False),  # the sourcedata file, relative to the dataset root
        pa.field("sha256", pa.string()),  # of the published (pseudonymised) file
        pa.field("size", pa.int64()),
        pa.field("transport", pa.string()),  # c-get, c-move, wado-rs (null: recovered after a killed run)
        pa.field("received_sha256_hmac", pa.string()),  # keyed digest of the received file's SHA-256
    ]
)
_BATCH = 4096  # instance rows per Parquet row group: memory stays flat however large the run


@dataclass(slots=True)
class InstanceRecord:
    """One published sourcedata file and the received file it was made from (compact: one per
    instance of the run)."""

    subject: str
    session: str | None
    pseudo_study_uid: str
    pseudo_series_uid: str
    pseudo_sop_instance_uid: str
    path: str
    transport: str | None
    received_sha256_hmac: str | None


def instance_records(
    dataset_root: Path,
    written: Iterable[Path],
    sources: Iterable[str],
    ledger: dict[str, dict],
    *,
    subject: str,
    session: str | None,
    pseudo_study_uid: str,
    pseudo_series_uid: str,
    received_digest,
) -> list[InstanceRecord]:
    """Pair each pseudonymised file of a series (``written``, under ``dataset_root``) with the
    raw file it came from (``sources``, same order) and that file's retrieval ledger entry.
    ``received_digest(sha256_hex)`` keys the received checksum. A source missing from the ledger
    gets no digest (null), never a plain checksum."""
    out = []
    for target, source in zip(written, sources, strict=True):
        entry = ledger.get(Path(source).stem) or {}
        target = Path(target)
        sha = entry.get("sha256")
        out.append(
            InstanceRecord(
                subject=subject,
                session=session,
                pseudo_study_uid=pseudo_study_uid,
                pseudo_series_uid=pseudo_series_uid,
                # pseudonymised files are named <SOPInstanceUID>.dcm, or <SOPInstanceUID>-<n>.dcm
                pseudo_sop_instance_uid=target.stem.split("-")[0],
                path=target.relative_to(dataset_root).as_posix(),
                transport=entry.get("transport"),
                received_sha256_hmac=received_digest(sha) if sha else None,
            )
        )
    return out


def write_instances(
    dataset_root: Path, records: Iterable[InstanceRecord], *, run_id: str, project: str
) -> Path | None:
    """Write this run's instance table, ``_BATCH`` rows at a time, computing each published
    file's SHA-256 and size as it goes (streamed). Returns its path, or None if no record."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    out = table_path(dataset_root, "instances", run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".parquet.tmp")
    writer = None
    rows: list[dict] = []

    def flush() -> None:
        nonlocal writer
        if writer is None:
            writer = pq.ParquetWriter(tmp, INSTANCE_SCHEMA)
        writer.write_table(pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA))
        rows.clear()

    try:
        for r in records:
            f = dataset_root / r.path
            sha, size = (sha256_file(f), f.stat().st_size) if f.is_file() else (None, None)
            rows.append({"run_id": run_id, "project": project, "recorded_at": now, "subject": r.subject,
                         "session": r.session, "pseudo_study_uid": r.pseudo_study_uid,
                         "pseudo_series_uid": r.pseudo_series_uid,
                         "pseudo_sop_instance_uid": r.pseudo_sop_instance_uid, "path": r.path, "sha256": sha,
                         "size": size, "transport": r.transport, "received_sha256_hmac": r.received_sha256_hmac})
            if len(rows) >= _BATCH:
                flush()
        if rows:
            flush()
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        return None
    tmp.replace(out)
    return out


PARTS_DIR = Path(".pacs2bids") / "instance-parts"  # in staging only: merged, then removed, before publishing
_PART_SCHEMA = pa.schema([INSTANCE_SCHEMA.field(n) for n in InstanceRecord.__slots__])


def write_instance_part(staging: Path, name: str, records: list[InstanceRecord]) -> str | None:
    """Write one unit of work's instance records (a study's, say) as a part file in ``staging``;
    returns its path relative to ``staging``, or None if no record. :func:`write_instances`
    takes them back with :func:`read_instance_parts`."""
    if not records:
        return None
    out = staging / PARTS_DIR / f"{name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{n: getattr(r, n) for n in InstanceRecord.__slots__} for r in records]
    pq.write_table(pa.Table.from_pylist(rows, schema=_PART_SCHEMA), out)
    return out.relative_to(staging).as_posix()


def read_instance_parts(staging: Path, parts: Iterable[str]) -> Iterable[InstanceRecord]:
    """The records of the part files ``parts`` (relative to ``staging``), in order, a batch at a time."""
    for part in parts:
        for batch in pq.ParquetFile(staging / part).iter_batches(batch_size=_BATCH):
            for row in batch.to_pylist():
                yield InstanceRecord(**row)


def record_lineage(dataset_root: Path, records: Iterable[LineageRecord], instance_parts: Iterable[str], *,
                   run_id: str, project: str, **run) -> Path:
    """Append this run's lineage tables to the dataset: one row per output file (``run``: the
    keywords of :func:`write_run`), and one per instance, merged from the ``instance_parts``
    the units of work wrote (:func:`write_instance_part`), which are then removed."""
    write_instances(dataset_root, read_instance_parts(dataset_root, instance_parts), run_id=run_id, project=project)
    shutil.rmtree(dataset_root / PARTS_DIR, ignore_errors=True)
    try:
        return write_run(dataset_root, records, run_id=run_id, project=project, **run)
    finally:
        give_back()  # what the tables used, before the leak scan builds its rules (pacs2bids.memory)
