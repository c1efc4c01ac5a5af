"""The run's outcomes: each event is one call that writes both the summary line and the lineage row(s).

A :class:`Recorder` appends to an :class:`Outcomes`, a dataclass of plain lists (the summary's
``series``, ``quarantined``, ``study_failures`` and ``released``, and the lineage records): a
study records into its own and returns it (small, serialisable); the flow extends the run's with
it. Only pseudonymised identifiers are recorded: before pseudonymisation, the UIDs of a series
are computed with the project key (:class:`pacs2bids.deid.keyed.Keyed`), so that a failed series
is still named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .lineage import LineageRecord
from .model import StudyRef
from .run import SeriesLine, label


@dataclass
class Outcomes:
    """What happened, in the order it was recorded: summary entries and lineage records."""

    series: list[SeriesLine] = field(default_factory=list)
    records: list[LineageRecord] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)  # {"file": "<label>/<name>", "reason"}
    study_failures: list[dict] = field(default_factory=list)  # {"label", "reason"}
    released: list[dict] = field(default_factory=list)  # {"file", "status"}
    derivatives: list[dict] = field(default_factory=list)  # {"derivative", "label", "source", "file", "status", ...}

    def extend(self, other: "Outcomes") -> None:
        self.series += other.series
        self.records += other.records
        self.quarantined += other.quarantined
        self.study_failures += other.study_failures
        self.released += other.released
        self.derivatives += other.derivatives


def reason(exc: BaseException) -> str:
    """An exception as one summary line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


class Recorder:
    """Records the outcomes of one study (or of the released-files step) into ``outcomes``.

    ``keyed`` (a :class:`~pacs2bids.deid.keyed.Keyed`) names a series that has no pseudonymised
    result (yet); it is never part of the outcomes."""

    def __init__(self, keyed=None, outcomes: Outcomes | None = None):
        self.keyed = keyed
        self.outcomes = outcomes if outcomes is not None else Outcomes()

    def _record(self, study: StudyRef, rs, res=None, **kw) -> LineageRecord:
        record = LineageRecord(
            subject=study.subject,
            session=study.session,
            pseudo_study_uid=res.pseudo_study_uid if res else self.keyed.uid(study.study_instance_uid),
            pseudo_series_uid=res.pseudo_series_uid if res else self.keyed.uid(rs.series.series_instance_uid),
            series_number=rs.series.series_number,
            instances_announced=rs.series.announced_instances,
            instances_received=rs.received,
            retrieve_status=kw.pop("retrieve_status", rs.status),
            pseudonymise_status=kw.pop("pseudonymise_status", "pseudonymised" if res else None),
            **kw,
        )
        self.outcomes.records.append(record)
        return record

    def _line(self, study: StudyRef, number, description: str, status: str, why: str, **kw) -> None:
        self.outcomes.series.append(SeriesLine(study.subject, study.session, number, description, status, why, **kw))

    def study_failed(self, study: StudyRef, why: str) -> None:
        """The study could not be retrieved at all."""
        self.outcomes.study_failures.append({"label": label(study.subject, study.session), "reason": why})
        self.outcomes.records.append(LineageRecord(study.subject, study.session, self.keyed.uid(study.study_instance_uid),
                                                   retrieve_status="failed", reason=why))

    def quarantined(self, study: StudyRef, name: str, why: str) -> None:
        """A received file held in quarantine (by retrieval or pseudonymisation)."""
        self.outcomes.quarantined.append({"file": f"{label(study.subject, study.session)}/{name}", "reason": why})

    def not_retrieved_whole(self, study: StudyRef, rs) -> None:
        """A series that arrived incomplete, or not at all."""
        self._line(study, rs.series.series_number, "", rs.status, rs.reason)
        self._record(study, rs, retrieve_status=rs.status, reason=rs.reason)

    def pseudonymisation_failed(self, study: StudyRef, rs, why: str) -> None:
        self._line(study, rs.series.series_number, "", "failed", why)
        self._record(study, rs, pseudonymise_status="failed", reason=why)

    def nothing_left(self, study: StudyRef, rs, res, why: str) -> None:
        """Every file of the series was dropped or quarantined by pseudonymisation."""
        self._line(study, res.series_number, res.series_description, "skipped", why)
        self._record(study, rs, res, convert_status="skipped", reason=why)

    def conversion_failed(self, study: StudyRef, rs, res, why: str) -> None:
        self._line(study, res.series_number, res.series_description, "failed", why,
                   pseudo_series_uid=res.pseudo_series_uid)
        self._record(study, rs, res, convert_status="failed", reason=why)

    def converted(self, study: StudyRef, rs, res, status: str, why: str, outputs: list[str],
                  provenance: str | None = None) -> None:
        """The converter's outcome for a series (converted or skipped): one lineage row per output
        file (``provenance``, the series' provenance JSON, included), or one without a path."""
        self._line(study, res.series_number, res.series_description, status, why, outputs=list(outputs),
                   pseudo_series_uid=res.pseudo_series_uid)
        for o in [*outputs, *([provenance] if provenance else [])] or [None]:
            self._record(study, rs, res, convert_status=status, reason=why or None, path=o)

    def derived(self, entries: list[dict]) -> None:
        """Derivatives of a study's images (defaced, or failed with the reason): summary only."""
        self.outcomes.derivatives += entries

    def release_status(self, file: str, status: str) -> None:
        """A released quarantine item: included, or why not (summary only)."""
        self.outcomes.released.append({"file": file, "status": status})

    def released_included(self, subject: str, session: str | None, res, written: list[Path], root: Path) -> None:
        """Released files published as DICOM: one lineage row per file."""
        for f in written:
            self.outcomes.records.append(LineageRecord(
                subject, session, pseudo_study_uid=res.pseudo_study_uid, pseudo_series_uid=res.pseudo_series_uid,
                series_number=res.series_number, retrieve_status="quarantined", pseudonymise_status="pseudonymised",
                convert_status="released", reason="released from quarantine after review; published as DICOM",
                path=f.relative_to(root).as_posix(),
            ))

    def mark_published(self) -> None:
        """Every record of the run passed the validator and is published with the dataset."""
        for r in self.outcomes.records:
            r.validate_status = "valid"
            r.publish_status = "published"
