"""Flow ``reintegrate_derivative``: a researcher's derivative dataset brought back into the project
dataset (:mod:`pacs2bids.reintegrate`), as a Prefect flow run (issue 14): on demand from a
deployment (deployments/prefect.yaml), with the same checks, publish and audit entry as
``pacs2bids reintegrate``.

Its run is named ``<project>/reintegrate-<run id>`` and tagged with the project; the new version
is named by that run id. Side effects: a new published version (and its copies on the targets),
one ``reintegrate`` entry in the operations audit log (published or refused).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from pacs2bids.config import load_spec
from pacs2bids.launch import _project_of, tag_flow_run
from pacs2bids.logsafety import quiet_third_party_loggers
from pacs2bids.reintegrate import Producer
from pacs2bids.run import RunContext
from pacs2bids.tasks.reintegrate import reintegrate

__all__ = ["reintegrate_derivative"]
PREFIX = "reintegrate-"


def reintegrate_run_name() -> str:
    """``<project>/reintegrate-<run id>`` (``flow_run_name=``); the flow takes its run id back from it."""
    from prefect.runtime import flow_run

    spec_path = flow_run.parameters.get("spec_path", "")
    return f"{_project_of(spec_path)}/{PREFIX}{RunContext.new_run_id(str(flow_run.id) if flow_run.id else None)}"


def _run_id() -> str:
    from prefect.runtime import flow_run

    fid = str(flow_run.id) if flow_run.id else ""
    tail = (flow_run.name or "").rpartition("/")[2]
    if fid and tail.startswith(PREFIX) and tail.endswith("-" + fid[:8]):
        return tail[len(PREFIX):]
    return RunContext.new_run_id(fid or None)


@flow(name="reintegrate_derivative", flow_run_name=reintegrate_run_name, log_prints=False)
def reintegrate_derivative(spec_path: str, derivative_path: str = "", producer: str = "", tool: str = "",
                           tool_version: str = "", method: str = "", producer_file: str | None = None,
                           name: str | None = None) -> dict:
    """Check ``derivative_path`` and publish it under ``derivatives/<name>/`` of a new version.

    The producer is given as ``producer`` (person or team), ``tool``, ``tool_version`` and ``method``,
    or as ``producer_file`` (JSON with those keys). Returns ``{"run_id", "version", "derivative",
    "files", "subjects", "targets"}`` (counts and names, no identifier). Raises
    :class:`~pacs2bids.reintegrate.ReintegrationRefused` (or the leak or validation error) with
    nothing published; the refusal is audited.
    """
    quiet_third_party_loggers()
    if not derivative_path:  # the deployment leaves it to each run (-p derivative_path=...)
        raise ValueError("reintegrate_derivative: give derivative_path, the folder of the derivative dataset "
                         "(e.g. prefect deployment run ... -p derivative_path=/data/results/segmentation)")
    spec = load_spec(spec_path)
    tag_flow_run(spec.project)
    who = Producer.from_file(Path(producer_file)) if producer_file else Producer(producer, tool, tool_version, method)
    run_id = _run_id()
    done = reintegrate(spec, Path(derivative_path), who, name, run_id)
    return {"run_id": run_id, "version": done.version.name, "derivative": f"derivatives/{done.name}",
            "files": done.files, "subjects": len(done.subjects),
            "targets": [{"target": getattr(t, "target", None), "state": getattr(t, "state", None)}
                        for t in done.targets]}
