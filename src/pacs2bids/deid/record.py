"""What de-identification did: the per-series result, its record, and the dry run (P8).

Nothing here holds an original value: the result and the record are safe to log, to return
from a task and to archive; the dry run masks what it shows (first character and length).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pydicom

from . import pixels
from .context import FileContext, tool_version
from .identifiers import collect
from .patterns import compile_identifiers, date_tokens, looks_like_uid
from .profile import Profile
from .walk import apply

if TYPE_CHECKING:  # pragma: no cover
    from .series import Pseudonymiser


@dataclass
class SeriesDeidResult:
    """What :meth:`Pseudonymiser.pseudonymise_series` did to one series. Holds no original
    values: it is safe to log, to return from a task and to archive (P8)."""

    pseudo_study_uid: str = ""
    pseudo_series_uid: str = ""
    series_number: int | None = None
    series_description: str = ""
    modality: str = ""
    written: list[Path] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # per written file: the name of the file it was made from
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["written"] = [str(p) for p in self.written]
        d["quarantined"] = [list(t) for t in self.quarantined]
        d["dropped"] = [list(t) for t in self.dropped]
        return d


def build_record(profile: Profile, notes: Counter, pixel_log: list[dict], result: SeriesDeidResult, count: int) -> dict:
    """The de-identification record of one series: the profile, how pseudonyms are made, and
    per attribute what was done, why, to how many files."""
    attributes: dict[str, list[dict]] = {}
    for (name, action, why), n in sorted(notes.items()):
        attributes.setdefault(name, []).append({"action": action, "why": why, "files": n})
    return {
        "tool": f"pacs2bids {tool_version()}",
        "pydicom": pydicom.__version__,
        "profile": profile.describe(),
        "pseudonyms": {
            "PatientName/PatientID": "the study's subject code",
            "UIDs": "2.25. + decimal HMAC-SHA256 of the original UID under a per-project key (HKDF), cut to 64 characters",
            "dates": "shifted back by a whole number of days (1 to 3650) from HMAC-SHA256 of the subject code; times kept",
            "PatientBirthDate": "shifted with the subject's dates, then cut to 1 January",
        },
        "files_in": count,
        "files_written": len(result.written),
        "quarantined": len(result.quarantined),
        "dropped": [reason for _, reason in result.dropped],
        "attributes": attributes,
        "pixels": pixel_log,
    }


def dry_run(p: "Pseudonymiser", files_sample: Iterable[Path], *, subject: str = "dryrun") -> list[dict]:
    """What pseudonymisation would change, per file and attribute, writing nothing.

    Original values are masked (first character and length); replaced values are shown.
    Returns a list of ``{"file": n, "attribute", "action", "why", "before", "after"}``.
    """
    out: list[dict] = []
    for n, path in enumerate(files_sample, start=1):
        try:
            ds = pydicom.dcmread(Path(path))
        except Exception as exc:
            out.append({"file": n, "attribute": "*", "action": "quarantined", "why": type(exc).__name__, "before": "", "after": ""})
            continue
        reason = p.drop_reason(ds)
        if reason:
            out.append({"file": n, "attribute": "*", "action": "dropped", "why": reason, "before": "", "after": ""})
            continue
        file_dates: set[str] = set()
        ids = {v for v in collect(ds, p.profile, file_dates) if not looks_like_uid(v)} | p.known_values
        changes: list[dict] = []
        ctx = FileContext(p.keyed, p.profile, subject, compile_identifiers(frozenset(ids)), Counter(), changes,
                          dates=date_tokens(file_dates))
        risk = pixels.risk_reason(ds)
        if risk:
            changes.append({"attribute": "PixelData", "action": "ocr-and-mask", "why": risk, "before": "", "after": ""})
        apply(ds, ctx, pixels_cleaned=False)
        for c in changes:
            c["file"] = n
        out.extend(changes)
    return out
