"""Operations settings of a spec (issue 14): retention of published versions, and the task runner.

``retention`` (optional; without it nothing expires)::

    retention:
      keep_days: 365          # a version that is no longer current goes this many days after it was published
      project_end: 2030-12-31 # from this day on, everything goes (the current version, the work area,
                              # the quarantine and the matching key); the audit log stays

``task_runner`` (optional; default: a pool of 4 threads in the flow's process)::

    task_runner:
      kind: dask              # threads | dask
      max_workers: 4          # threads: studies extracted at once
      dask_address: tcp://scheduler:8786   # dask: an existing cluster; without it, a LocalCluster
      dask_workers: 2         # dask without an address: the LocalCluster's worker processes

The environment variables ``PACS2BIDS_TASK_RUNNER`` (threads | dask) and ``PACS2BIDS_DASK_ADDRESS``
override the spec (a site runs every project on its cluster without editing each spec).
"""

from __future__ import annotations

import os
from datetime import date
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetentionSettings(_Model):
    """How long published versions, and the project's private data, are kept."""

    keep_days: int = Field(ge=0, le=36500, description="Days a version that is no longer current is kept after it "
                           "was published; then ``pacs2bids purge`` deletes it locally and on every target.")
    project_end: date | None = Field(
        None, description="The project's last day: from the day after, purge deletes every version (current one "
        "included) everywhere, the work area, the quarantine and the matching key. The audit log is kept.")


class TaskRunnerSettings(_Model):
    """Where each study's work (retrieve, pseudonymise, convert) runs."""

    kind: Literal["threads", "dask"] = Field("threads", description="threads: a pool in the flow's process; dask: "
                                              "a Dask cluster (prefect-dask), an existing one or a LocalCluster.")
    max_workers: int = Field(4, ge=1, le=64, description="threads: studies extracted at once.")
    dask_address: str | None = Field(None, description="dask: the scheduler of an existing cluster "
                                     "(tcp://host:8786); without it a LocalCluster of dask_workers processes.")
    dask_workers: int = Field(2, ge=1, le=64, description="dask without an address: LocalCluster worker processes.")

    @model_validator(mode="after")
    def _address(self) -> "TaskRunnerSettings":
        if self.dask_address is not None and not self.dask_address.startswith(("tcp://", "tls://", "inproc://")):
            raise ValueError("task_runner.dask_address: give the Dask scheduler's address, e.g. tcp://host:8786")
        return self

    def from_environment(self, environ: Mapping[str, str] | None = None) -> "TaskRunnerSettings":
        """These settings with ``PACS2BIDS_TASK_RUNNER`` / ``PACS2BIDS_DASK_ADDRESS`` applied."""
        environ = os.environ if environ is None else environ
        update: dict = {}
        kind = environ.get("PACS2BIDS_TASK_RUNNER")
        if kind:
            if kind not in ("threads", "dask"):
                raise ValueError(f"PACS2BIDS_TASK_RUNNER={kind!r}: use threads or dask")
            update["kind"] = kind
        if environ.get("PACS2BIDS_DASK_ADDRESS"):
            update["dask_address"] = environ["PACS2BIDS_DASK_ADDRESS"]
        return TaskRunnerSettings(**{**self.model_dump(), **update}) if update else self
