from pathlib import Path

from prefect import task

from pacs2bids import lineage

from . import TASK_DEFAULTS


@task(name="record_lineage", **TASK_DEFAULTS)
def record_lineage(
    dataset_root: Path,
    records: list[lineage.LineageRecord],
    run_id: str,
    project: str,
    flow_run_id: str | None,
    pacs2bids_version: str,
    heuristic_sha256: str | None,
    instances: list[lineage.InstanceRecord] = (),
) -> Path:
    """Append this run's lineage tables (Parquet) to the dataset: one row per output file, and
    one per published sourcedata instance (with its received file's keyed checksum)."""
    lineage.write_instances(dataset_root, instances, run_id=run_id, project=project)
    return lineage.write_run(
        dataset_root,
        records,
        run_id=run_id,
        project=project,
        flow_run_id=flow_run_id,
        pacs2bids_version=pacs2bids_version,
        heuristic_sha256=heuristic_sha256,
    )
