from pathlib import Path

from prefect import task

from pacs2bids import convert

from . import TASK_DEFAULTS


@task(name="convert_session", task_run_name="convert_session-sub-{subject}", **TASK_DEFAULTS)
def convert_session(
    dicom_dir: Path, bids_root: Path, subject: str, session: str | None, heuristic: str, work_dir: Path,
    sidecar_fields: dict | None = None,
) -> convert.ConversionResult:
    """One session's pseudonymised DICOM to BIDS: dcm2niix + pacs2bids.convert.classify (auto) or heudiconv."""
    return convert.convert_session(
        dicom_dir, bids_root, subject=subject, session=session, heuristic=heuristic, work_dir=work_dir,
        sidecar_fields=sidecar_fields,
    )
