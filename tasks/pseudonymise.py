from pathlib import Path

from prefect import task

from pacs2bids.config import ProjectSpec
from pacs2bids.deid import Pseudonymiser, SeriesDeidResult
from pacs2bids.dicomfiles import iter_dicom_files

from . import TASK_DEFAULTS


def _pseudonymiser(spec: ProjectSpec) -> Pseudonymiser:
    return Pseudonymiser(
        project=spec.project, secret=spec.secret_bytes, settings=spec.pseudonymization, key_store=spec.resolved_key_store
    )


@task(name="pseudonymise_series", **TASK_DEFAULTS)
def pseudonymise_series(
    spec: ProjectSpec, raw_series: Path, out_dir: Path, subject: str, session: str | None, quarantine_dir: Path
) -> SeriesDeidResult:
    """PS3.15 Annex E pseudonymisation of one retrieved series into the staging sourcedata/."""
    return _pseudonymiser(spec).pseudonymise_series(
        iter_dicom_files(raw_series), out_dir, subject=subject, session=session, quarantine_dir=quarantine_dir
    )


@task(name="pseudonymise_released", **TASK_DEFAULTS)
def pseudonymise_released(
    spec: ProjectSpec, files: list[Path], out_dir: Path, subject: str, session: str | None, quarantine_dir: Path
) -> SeriesDeidResult:
    """Files of one series released from quarantine by a reviewer: headers pseudonymised like
    any other, pixels kept as reviewed (no OCR), into the staging sourcedata/."""
    return _pseudonymiser(spec).pseudonymise_series(
        files, out_dir, subject=subject, session=session, quarantine_dir=quarantine_dir, pixels_reviewed=True
    )
