from pathlib import Path

from prefect import task

from pacs2bids import publish

from . import TASK_DEFAULTS


@task(name="publish_local", **TASK_DEFAULTS)
def publish_local(staging: Path, output: Path, run_id: str | None = None) -> Path:
    """The finished dataset becomes the version ``output`` names, in one atomic symlink swap."""
    return publish.publish_local(staging, output, run_id)
