"""Convert one pseudonymised study (one BIDS session) to BIDS.

``convert_session`` reads only ``dicom_dir`` (the pseudonymised copy, one folder per series).
With ``heuristic: auto`` (:mod:`.auto`) it runs dcm2niix once on the session in a private scratch
folder (:mod:`.dcm2niix`), maps each image back to its DICOM series, has
:func:`pacs2bids.convert.classify.classify_session` name every image from its sidecar, and places
the kept ones through :mod:`pacs2bids.bids`. With a project's own heudiconv heuristic
(:mod:`.heudiconv`) it runs heudiconv's command line on the session in a private output folder and
moves the session's files into the dataset. Objects dcm2niix cannot convert (SR, presentation
states, raw data) are reported as skipped. Requirements C1, C2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pacs2bids.convert.auto import NO_IMAGE, Verdict, convert_auto, judge_session
from pacs2bids.convert.dcm2niix import Dcm2niixRun, SessionSeries, child_env, dcm2niix_exe, dcm2niix_session
from pacs2bids.convert.heudiconv import convert_heudiconv
from pacs2bids.convert.series import ConversionResult, ConvertedSeries
from pacs2bids.sopclasses import is_image_sop_class

__all__ = [
    "NO_IMAGE", "ConversionResult", "ConvertedSeries", "Dcm2niixRun", "SessionSeries", "Verdict", "child_env",
    "convert_session", "dcm2niix_exe", "dcm2niix_session", "is_auto", "is_image_sop_class", "judge_session",
]


def is_auto(heuristic: str | None) -> bool:
    """``auto`` (the default): classify dcm2niix's sidecars (pacs2bids.convert.classify), no heudiconv."""
    return heuristic in (None, "", "auto")


def convert_session(dicom_dir: Path, bids_root: Path, *, subject: str, session: str | None,
                    heuristic: str, work_dir: Path, log_dir: Path | None = None,
                    sidecar_fields: Mapping[str, Mapping[str, Any]] | None = None) -> ConversionResult:
    """Convert the series under ``dicom_dir`` (one study) into ``bids_root``.

    Takes the pseudonymised DICOM folder of one study, the BIDS root being built, the subject
    and session labels (without ``sub-``/``ses-``; give a session whenever the subject has
    several studies), a heuristic (``auto``: dcm2niix once on the session, each output named by
    :func:`pacs2bids.convert.classify.classify_session`; any other name or path: a heudiconv heuristic
    run through heudiconv), and a private working folder. Logs of failed conversions are kept in
    ``log_dir`` (default ``bids_root/.pacs2bids/logs``) and named in the reasons. With ``auto``,
    ``sidecar_fields`` (per BIDS suffix, the spec's ``sidecar_fields``) fills sidecar fields the
    images do not hold, never those they do. Returns one
    :class:`ConvertedSeries` per series found (non-image objects and series left out are
    ``skipped`` with their reason). Raises :class:`~pacs2bids.errors.ConversionError` when the
    converter fails as a whole, FileNotFoundError for an unknown heuristic.
    """
    log_dir = Path(log_dir) if log_dir is not None else Path(bids_root) / ".pacs2bids" / "logs"
    if is_auto(heuristic):
        return convert_auto(dicom_dir, bids_root, subject=subject, session=session, work_dir=work_dir,
                            log_dir=log_dir, fills=sidecar_fields or {})
    return convert_heudiconv(dicom_dir, bids_root, subject=subject, session=session, heuristic=heuristic,
                             work_dir=work_dir, log_dir=log_dir)
