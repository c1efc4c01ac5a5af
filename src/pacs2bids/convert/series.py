"""What conversion reports per DICOM series, and which objects it converts at all."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# PS3.4 B.5 storage SOP classes holding images dcm2niix can convert (MR, CT, PET, SC, ...).
# Anything else (SR, presentation states, raw data, encapsulated documents) is filtered out.
IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR family
    "1.2.840.10008.5.1.4.1.1.2",  # CT family
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.20",  # NM
)
_NON_IMAGE_EXACT = {"1.2.840.10008.5.1.4.1.1.4.2"}  # MR Spectroscopy


@dataclass
class ConvertedSeries:
    """What happened to one (pseudonymised) series."""

    series_uid: str
    series_number: int | None
    series_description: str
    status: str  # "converted" | "skipped" | "failed"
    outputs: list[str] = field(default_factory=list)  # relative to bids_root
    reason: str = ""


@dataclass
class ConversionResult:
    series: list[ConvertedSeries]


def is_image_sop_class(uid: str) -> bool:
    """True for the storage SOP classes whose pixel data dcm2niix turns into NIfTI (PS3.4 B.5)."""
    uid = str(uid)
    if uid in _NON_IMAGE_EXACT:
        return False
    return any(uid == p or uid.startswith(p + ".") for p in IMAGE_SOP_PREFIXES)


def keep_log(log_dir: Path, name: str, text: str, bids_root: Path) -> str:
    """Write a failed conversion's log under ``log_dir`` (the run's records, leak-scanned before
    publishing); returns its path relative to ``bids_root`` when inside it, for the reason."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    path.write_text(text)
    try:
        return path.relative_to(bids_root).as_posix()
    except ValueError:
        return str(path)


