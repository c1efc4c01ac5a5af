from pathlib import Path

from prefect import task

from pacs2bids import bids

from . import TASK_DEFAULTS


@task(name="finalise_dataset", **TASK_DEFAULTS)
def finalise_dataset(bids_root: Path, name: str, participants: list[str], generated_by: dict) -> None:
    """dataset_description.json, participants.tsv, README and the other top-level BIDS files."""
    bids.finalise_dataset(bids_root, name=name, participants=participants, generated_by=generated_by)
