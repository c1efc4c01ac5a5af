from datetime import date

from prefect import task

from pacs2bids import query
from pacs2bids.config import ProjectSpec

from . import TASK_DEFAULTS


@task(name="find_studies", **TASK_DEFAULTS)
def find_studies(spec: ProjectSpec, since: dict[int, str] | None = None) -> query.QueryResult:
    """C-FIND or QIDO-RS: the studies and series the inclusion list and filters select (``since``:
    inclusion row -> ISO day, the rows asked only for studies from that day on: replication)."""
    return query.find_studies(spec, {int(r): date.fromisoformat(d) for r, d in (since or {}).items()})
