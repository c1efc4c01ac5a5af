from pathlib import Path

from prefect import task

from pacs2bids import validate

from . import TASK_DEFAULTS


@task(name="validate_dataset", **TASK_DEFAULTS)
def validate_dataset(bids_root: Path) -> validate.ValidationReport:
    """bids-validator-deno on the staged dataset."""
    return validate.validate_dataset(bids_root)
