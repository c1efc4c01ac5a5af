"""Where each study's work runs (issue 14): a thread pool in the flow's process, or a Dask cluster.

:func:`study_runner` opens the task runner the spec's ``task_runner`` asks for
(:class:`pacs2bids.config.operations.TaskRunnerSettings`, ``PACS2BIDS_TASK_RUNNER`` and
``PACS2BIDS_DASK_ADDRESS`` override it): ``threads`` (default, ``max_workers`` studies at once) or
``dask`` (prefect-dask: the cluster at ``dask_address``, else a ``LocalCluster`` of
``dask_workers`` processes). :func:`submit_study` submits one study to it.

On Dask a study runs in another process, perhaps on another machine: its inputs (spec, study,
run context) and its result are pickled, and it writes to the run's raw, quarantine and staging
folders and to the key store, which must therefore be on storage every worker mounts at the same
path (a shared file system), unless the spec sets ``staging`` (:mod:`pacs2bids.staging`: no shared
file). Such a worker installs the PACS's Prefect concurrency limit itself
(:func:`pacs2bids.tasks.pacs_limit.use_pacs_limit`) before its first connection, so the per-PACS
bound holds across every worker; this needs a Prefect server every worker reaches
(``PREFECT_API_URL``), refused otherwise. The spec travels to the workers with its secret:
run the cluster on a trusted network (TLS: ``tls://`` addresses). Each worker keeps its
de-identification pool and pooled associations across the run's studies; they are released on every
worker when the run's Dask part ends (:mod:`pacs2bids.tasks.workerpools`).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Iterator

from prefect import task
from prefect.task_runners import ThreadPoolTaskRunner

from pacs2bids.config import ProjectSpec
from pacs2bids.errors import SpecError
from pacs2bids.model import StudyRef
from pacs2bids.pacs import gate
from pacs2bids.run import RunContext
from pacs2bids.study import StudyResult

from . import TASK_DEFAULTS
from .study import extract_study


@task(name="extract_study", task_run_name="extract_study-sub-{study.subject}", **TASK_DEFAULTS)
def extract_study_on_worker(spec: ProjectSpec, study: StudyRef, ctx: RunContext) -> StudyResult:
    """:func:`pacs2bids.tasks.study.extract_study` in a worker process: the PACS's limit is
    installed in this process first (once), so that its connections hold slots like the flow's."""
    import os
    import socket

    from prefect.logging import get_run_logger

    from .pacs_limit import use_pacs_limit

    settings = spec.pacs.dimse or spec.pacs.dicomweb
    if gate.gate_for(settings) is None:
        use_pacs_limit(spec)
    get_run_logger().info("sub-%s: on worker %s, process %d", study.subject, socket.gethostname(), os.getpid())
    try:
        return extract_study.fn(spec, study, ctx)
    finally:
        # the pools stay for the worker's next study; the run releases them on every worker when its Dask
        # part ends (tasks/workerpools.py). Released here only where that cannot reach: no run plugin on
        # this worker (not a Dask worker, or the run ended while this study ran), or associations that
        # would hold a slot other workers wait for (PACS limit below the number of workers)
        from .workerpools import after_study

        after_study()

def _dask_runner(settings):
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    if not api.url:
        raise SpecError("task_runner: dask needs a Prefect server that every worker reaches (the per-PACS limit is "
                        "kept there): set PREFECT_API_URL, or use kind: threads")
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # the worker processes get this process's Prefect API in their environment (a Prefect setting held in a
    # context, as tests and profiles do, does not reach a new process); its key stays out of every log
    env = {"PREFECT_API_URL": str(api.url)}
    if api.key is not None:
        env["PREFECT_API_KEY"] = api.key.get_secret_value()
    if api.auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = api.auth_string.get_secret_value()
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": settings.dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None, "env": env})


@contextmanager
def study_runner(spec: ProjectSpec, studies: list | tuple = (1,)) -> Iterator[tuple[object, object]]:
    """The task runner for the studies, started; yields ``(runner, task)``: the task to submit.
    With no ``studies`` nothing is started (a run with nothing new starts no cluster)."""
    if not studies:
        yield None, None
        return
    try:
        settings = spec.task_runner.from_environment()
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    if settings.kind == "threads":
        with ThreadPoolTaskRunner(max_workers=settings.max_workers) as runner:
            yield runner, extract_study
        return
    import dask
    # distributed's defaults first: leaving dask.config.set would else drop them all, and the next
    # Dask run of this process would fail (KeyError: 'comm')
    importlib.import_module("distributed")

    # a study pseudonymises in child processes (pacs2bids.deid.pool): Dask's workers must not be daemonic
    # (set here for a LocalCluster; an existing cluster's nannies need DASK_DISTRIBUTED__WORKER__DAEMON=False)
    with dask.config.set({"distributed.worker.daemon": False}), _dask_runner(settings) as runner:
        with _worker_pools(runner, spec, settings):
            yield runner, extract_study_on_worker


@contextmanager
def _worker_pools(runner, spec: ProjectSpec, settings) -> Iterator[None]:
    """Every worker keeps its de-identification pool and associations across the run's studies; they
    are released on every worker (waited for) when the run's Dask part ends, before the cluster closes."""
    from .workerpools import keep_pools, release_pools

    client = runner.client
    workers = settings.dask_workers if not settings.dask_address else len(client.nthreads())  # worker processes
    keep_pools(client, spec.pacs.max_associations, workers)
    try:
        yield
    finally:
        release_pools(client)


def submit_study(runner_and_task, spec: ProjectSpec, study: StudyRef, ctx: RunContext):
    """Submit one study; returns its future (``.result()`` is the :class:`StudyResult`)."""
    runner, what = runner_and_task
    return runner.submit(what, parameters={"spec": spec, "study": study, "ctx": ctx})
