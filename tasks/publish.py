from pathlib import Path

from prefect import task

from pacs2bids import publish

from . import TASK_DEFAULTS


@task(name="publish_dataset", **TASK_DEFAULTS)
def publish_dataset(staging: Path, output: Path) -> Path:
    """Atomic move of the finished dataset into ``output``."""
    return publish.publish_local(staging, output)
