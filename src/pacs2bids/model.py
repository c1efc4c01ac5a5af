"""Small records passed between stages and tasks.

They hold what a stage needs to find its input (UIDs, counts, paths), never pixel data.
Records that still hold original identifiers (``StudyRef``, ``SeriesRef``) stay inside one
run's process: tasks run with result persistence and caching off, and their ``repr`` keeps
the original UIDs and patient identifiers out of logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeriesRef:
    """A series announced by the PACS."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    announced_instances: int | None = None
    sop_class: str = ""  # the SOPClassUID the series query answered (QIDO-RS, some servers), else ""

    def __repr__(self) -> str:
        return f"SeriesRef(#{self.series_number}, {self.modality}, {self.announced_instances} instances)"


@dataclass
class StudyRef:
    """A study matched by an inclusion row, with its series after filtering."""

    inclusion_row: int
    subject: str
    session: str | None
    study_instance_uid: str
    study_date: str = ""
    study_description: str = ""
    series: list[SeriesRef] = field(default_factory=list)
    excluded_series: int = 0
    sop_classes: tuple[str, ...] = ()  # SOPClassesInStudy (0008,0062), when the PACS answered it

    def __repr__(self) -> str:
        return f"StudyRef(row {self.inclusion_row}, sub-{self.subject}, {len(self.series)} series)"
