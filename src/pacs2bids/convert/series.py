"""What conversion reports per DICOM series (which objects it converts: :mod:`pacs2bids.sopclasses`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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


