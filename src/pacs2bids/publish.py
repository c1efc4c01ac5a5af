"""Publishing: the dataset appears in ``output`` only once it is complete.

The dataset is built in a staging folder beside ``output`` (same file system), then moved in
with ``rename``, which is atomic: a reader sees the previous dataset or the new one, never
half of one. Remote targets (S3, SFTP, research PACS) will add publishers beside this one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from .errors import PublishError

log = logging.getLogger(__name__)


def staging_dir(output: Path, work_dir: Path, run_id: str) -> Path:
    """Where a run builds its dataset. It must be on ``output``'s file system for the final
    rename; the work folder sits beside ``output`` by default, so it is."""
    return work_dir / f"staging-{run_id}"


def seed_staging(output: Path, staging: Path) -> None:
    """Start the staging folder from the published dataset, if any, so that a run adds to it.

    A full copy, not hard links: conversion tools overwrite files in place, and a link would
    let them change the published dataset before the swap.
    """
    if staging.exists():
        shutil.rmtree(staging)
    if output.is_dir() and any(output.iterdir()):
        shutil.copytree(output, staging, symlinks=True)
    else:
        staging.mkdir(parents=True)


def publish_local(staging: Path, output: Path) -> Path:
    """Move ``staging`` to ``output``. An existing dataset is swapped out, then removed.

    Raises :class:`PublishError` if the rename fails; the previous dataset is then put back.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(staging).st_dev != os.stat(output.parent).st_dev:
        raise PublishError(
            f"staging folder {staging} and output {output} are on different file systems; "
            "set work_dir in the spec to a folder on the output's file system"
        )
    old: Path | None = None
    if output.exists():
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()
        else:
            old = output.with_name(f".{output.name}.previous-{int(time.time())}")
            os.rename(output, old)
    try:
        os.rename(staging, output)
    except OSError as exc:
        if old is not None:
            os.rename(old, output)
        raise PublishError(f"cannot move {staging} to {output}: {exc.strerror}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("published dataset at %s", output)
    return output
