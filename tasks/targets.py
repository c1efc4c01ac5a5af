"""Publishing the local version to the spec's secondary targets (S3, SFTP, folders): one task per
target, so each shows as its own step; the work is :mod:`pacs2bids.targets.step`."""

import json
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from pacs2bids.config import ProjectSpec
from pacs2bids.targets.step import publish_to_target

from . import TASK_DEFAULTS


def _block_secrets(name: str | None) -> dict[str, dict[str, str]] | None:
    """The credentials a Prefect ``Secret`` block holds (a JSON object), by block name."""
    if not name:
        return None
    from prefect.blocks.system import Secret

    value = Secret.load(name).get()
    return {name: value if isinstance(value, dict) else json.loads(value)}


@task(name="publish_target", **TASK_DEFAULTS)
def publish_target(spec: ProjectSpec, index: int, version: Path) -> dict:
    """The published ``version`` to target ``index`` of the spec; returns its report (counts only)."""
    secrets = _block_secrets(spec.targets[index].credentials_block)
    return publish_to_target(spec, index, version, log=get_run_logger(), secrets=secrets).to_dict()
