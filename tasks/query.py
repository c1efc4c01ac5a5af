from prefect import task

from pacs2bids import query
from pacs2bids.config import ProjectSpec

from . import TASK_DEFAULTS


@task(name="find_studies", **TASK_DEFAULTS)
def find_studies(spec: ProjectSpec) -> query.QueryResult:
    """C-FIND or QIDO-RS: the studies and series the inclusion list and filters select."""
    return query.find_studies(spec)
