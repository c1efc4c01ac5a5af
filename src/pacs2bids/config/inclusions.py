"""The inclusion list: which patients (or accession numbers) enter the project, as which subject.

Rows that would split one person or merge two are refused, naming the rows, never the identifiers.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ..errors import SpecError
from .settings import Inclusion

_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def read_inclusions(path: Path, *, merged_records: bool = False) -> tuple[Inclusion, ...]:
    """Read the inclusion CSV (columns: patient_id or accession_number, subject[, session]).

    Subject and session labels must be BIDS labels (letters and digits); a leading ``sub-``
    or ``ses-`` is accepted and removed. Rows that would split one person or merge two are
    refused: one patient ID (or accession number) under two subjects always, several patient IDs
    under one subject unless ``merged_records`` (``selection.merged_records``) says they are
    one person's records. Raises :class:`SpecError` naming the rows (never the identifiers).
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise SpecError(f"selection.inclusions: cannot read {path}: {exc.strerror}") from None
    with handle:
        sample = handle.read(4096)
        handle.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(handle, dialect=dialect)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "subject" not in fields or not ({"patient_id", "accession_number"} & set(fields)):
            raise SpecError(
                f"selection.inclusions: {path} needs a 'subject' column and a 'patient_id' or "
                f"'accession_number' column; found {fields}"
            )
        rows: list[Inclusion] = []
        seen: dict[tuple, int] = {}
        for n, raw in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            if not any(row.values()):
                continue
            subject = row.get("subject", "").removeprefix("sub-")
            session = row.get("session", "").removeprefix("ses-") or None
            pid = row.get("patient_id") or None
            acc = row.get("accession_number") or None
            if not _LABEL.match(subject):
                raise SpecError(f"selection.inclusions: {path} row {n}: subject must be letters and digits only")
            if session is not None and not _LABEL.match(session):
                raise SpecError(f"selection.inclusions: {path} row {n}: session must be letters and digits only")
            if not pid and not acc:
                raise SpecError(f"selection.inclusions: {path} row {n}: give a patient_id or an accession_number")
            key = (pid, acc, session)
            if key in seen:
                raise SpecError(f"selection.inclusions: {path} row {n} repeats row {seen[key]}")
            seen[key] = n
            rows.append(Inclusion(row=n, subject=subject, session=session, patient_id=pid, accession_number=acc))
    if not rows:
        raise SpecError(f"selection.inclusions: {path} has no rows")
    _refuse_split_or_merged(path, rows, merged_records)
    return tuple(rows)


def _refuse_split_or_merged(path: Path, rows: list[Inclusion], merged_records: bool) -> None:
    """One identifier under two subjects publishes one person twice; two patient IDs under one
    subject publishes two people as one, unless they are one person's merged records."""
    def rows_text(found: list[Inclusion]) -> str:
        return ", ".join(f"{r.row} (sub-{r.subject})" for r in found)

    for attr, what in (("patient_id", "patient ID"), ("accession_number", "accession number")):
        by_value: dict[str, list[Inclusion]] = {}
        for r in rows:
            if getattr(r, attr):
                by_value.setdefault(getattr(r, attr), []).append(r)
        for found in by_value.values():
            if len({r.subject for r in found}) > 1:
                raise SpecError(
                    f"selection.inclusions: {path} rows {rows_text(found)} give one {what} to "
                    f"{len({r.subject for r in found})} subjects: one person would be published as several. "
                    "Keep one subject per person (sessions tell the visits apart)"
                )
    if merged_records:
        return
    by_subject: dict[str, list[Inclusion]] = {}
    for r in rows:
        if r.patient_id:
            by_subject.setdefault(r.subject, []).append(r)
    for subject, found in by_subject.items():
        if len({r.patient_id for r in found}) > 1:
            raise SpecError(
                f"selection.inclusions: {path} rows {rows_text(found)} give {len({r.patient_id for r in found})} "
                f"different patient IDs to sub-{subject}: two people would be published as one. Fix the rows, "
                "or, if they are one person's merged hospital records, set selection.merged_records: true"
            )
