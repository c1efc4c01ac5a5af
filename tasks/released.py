from prefect import task
from prefect.logging import get_run_logger

from pacs2bids import released
from pacs2bids.config import ProjectSpec
from pacs2bids.run import RunContext

from . import TASK_DEFAULTS


@task(name="include_released", **TASK_DEFAULTS)
def include_released(spec: ProjectSpec, ctx: RunContext) -> released.ReleasedResult:
    """Files a reviewer released from quarantine, pseudonymised into the staging ``sourcedata/``."""
    return released.include_released(spec, ctx, log=get_run_logger())
