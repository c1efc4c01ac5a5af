"""Thin Prefect tasks over the stage logic in :mod:`pacs2bids`.

Each task has the name of the function it wraps and works per study or per series. Results
are neither persisted nor cached: records may hold original UIDs in memory, and Prefect's
default serializer would otherwise write them to disk.
"""

from prefect.cache_policies import NONE

TASK_DEFAULTS = dict(persist_result=False, cache_policy=NONE)
