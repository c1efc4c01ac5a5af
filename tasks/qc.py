from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from pacs2bids.config.qc import QcSettings
from pacs2bids.derivatives import qc

from . import TASK_DEFAULTS


@task(name="run_qc", **TASK_DEFAULTS)
def run_qc(bids_root: Path, settings: QcSettings, generated_by: dict) -> dict:
    """Protocol conformity QC of every session → derivatives/pacs2bids-qc (validated); returns the counts
    of sessions per status and the QC seconds per session."""
    result = qc.run_qc(bids_root, settings, generated_by)
    qc.check_qc_dataset(result.folder)
    summary = result.summary()
    get_run_logger().info("protocol QC of %d session(s) (%d kept from the last run): %s; report %s/index.html",
                          summary["sessions"], summary["reused"],
                          ", ".join(f"{n} {k}" for k, n in sorted(summary["statuses"].items())) or "none",
                          qc.QC_DIR.as_posix())
    return summary
