from pathlib import Path

from prefect import task

from pacs2bids import lineage

from . import TASK_DEFAULTS


@task(name="record_lineage", **TASK_DEFAULTS)
def record_lineage(dataset_root: Path, records: list[lineage.LineageRecord], instance_parts: list[str], *,
                   run_id: str, project: str, **run) -> Path:
    """Append this run's lineage tables (Parquet) to the dataset: one row per output file, and
    one per published sourcedata instance (merged from the studies' part files)."""
    return lineage.record_lineage(dataset_root, records, instance_parts, run_id=run_id, project=project, **run)
