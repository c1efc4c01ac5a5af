"""A Dask worker's process-wide pools, kept across the studies of a run and released when it ends (issue 14).

A study pseudonymises in the process's de-identification pool (:mod:`pacs2bids.deid.pool`) and
retrieves through its pooled associations (:mod:`pacs2bids.pacs.pool`). On the thread runner both
live as long as the flow's process. A Dask worker is stopped without its ``atexit`` hooks: the pool's
processes would outlive it, orphaned (holding the run's output open), and an idle association would
keep its slot of the PACS limit (the next run waited for ever). Stopping both after every study cost
seconds per study; instead :func:`keep_pools` registers :class:`KeepPools` on every worker of the
run's cluster when the runner starts, and :func:`release_pools` unregisters it when the run's Dask
part ends: each worker's ``teardown`` releases its pools, and the runner waits for every worker's
answer before the cluster closes. A worker stopped earlier (an adaptive cluster retiring it) runs the
same teardown as it closes. Imported only on the Dask path (it imports ``distributed``).
"""

from __future__ import annotations

import logging

from distributed import WorkerPlugin, get_worker

from pacs2bids.deid import pool as deid_pool
from pacs2bids.pacs.pool import close_pools

NAME = "pacs2bids-pools"
log = logging.getLogger("prefect.pacs2bids.workerpools")  # never the dataset's run log


def release() -> None:
    """Stop this process's de-identification pool (its processes exit) and release its pooled
    associations (each gives back its slot of the PACS limit)."""
    deid_pool.shutdown()
    close_pools()


class KeepPools(WorkerPlugin):
    """On a worker: the studies keep the process's pools; ``teardown`` releases them.

    ``keep_associations`` is False when the PACS limit is lower than the number of workers: an
    association kept idle between one worker's studies would hold a slot another worker waits for
    (the pool's reaper frees it only after 5 s idle), so such a worker releases its associations
    after each study, as before, and keeps only the de-identification pool."""

    def __init__(self, keep_associations: bool):
        self.keep_associations = keep_associations

    def teardown(self, worker) -> None:
        release()


def on_this_worker() -> KeepPools | None:
    """The run's :class:`KeepPools` of the worker this code runs on; None outside a Dask worker or
    when the run did not register it (or has already released it)."""
    try:
        plugins = get_worker().plugins
    except ValueError:
        return None
    found = plugins.get(NAME)
    return found if isinstance(found, KeepPools) else None


def after_study() -> None:
    """At the end of a study on a worker: release what the run-level release cannot reach.
    Without the run's plugin (not on a Dask worker, or the run ended while this study ran) both pools
    stop now; with it, only the associations when the plugin says they are not kept."""
    plugin = on_this_worker()
    if plugin is None:
        release()
    elif not plugin.keep_associations:
        close_pools()


def keep_pools(client, limit: int, workers: int) -> None:
    """Register :class:`KeepPools` on every worker of ``client``'s cluster (and on any that joins)."""
    client.register_plugin(KeepPools(keep_associations=limit >= workers), name=NAME)


def release_pools(client) -> None:
    """Release every worker's pools, waiting for each worker's answer; a failure is logged, not raised
    (the run's own outcome stands; a worker that cannot answer releases its pools as it closes)."""
    try:
        client.unregister_worker_plugin(NAME)
    except Exception as exc:  # noqa: BLE001 - the cluster may be going away already
        log.warning("the Dask workers' pools could not be released at the end of the run (%s): each worker "
                    "releases them when it stops", type(exc).__name__)
