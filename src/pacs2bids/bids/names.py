"""BIDS file names built from entities and parsed back into them (BIDS 1.10).

A name is ``<key>-<label>`` pairs joined by ``_`` in the schema's entity order, then the suffix and
the extension. The order below is the BIDS 1.10 schema's (``schema/rules/entities.yaml``, the
"Entity table" appendix of the specification). A table rather than ``bidsschematools``: this is
all of the schema that naming needs, and the package would bring its YAML loader and command-line
dependencies for one tuple.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Every BIDS 1.10 entity, by its key, in the order a file name lists them.
ENTITY_ORDER = ("sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
                "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
                "recording", "chunk", "seg", "res", "den", "label", "desc")

#: What a name may end with (longest first, so ``.nii.gz`` wins over ``.gz``).
EXTENSIONS = (".nii.gz", ".tsv.gz", ".nii", ".json", ".bval", ".bvec", ".tsv")


@dataclass(frozen=True)
class BidsName:
    """One parsed file name: its entities (in name order), suffix and extension ("" when none)."""

    entities: dict[str, str] = field(default_factory=dict)
    suffix: str = ""
    extension: str = ""

    @property
    def stem(self) -> str:
        return build_name(self.entities, self.suffix)

    def with_(self, *, suffix: str | None = None, extension: str | None = None, **entities: str | None) -> BidsName:
        """A copy with another suffix, extension or entities (None drops an entity)."""
        merged = {**self.entities, **entities}
        return BidsName({k: v for k, v in merged.items() if v not in (None, "")},
                        self.suffix if suffix is None else suffix,
                        self.extension if extension is None else extension)

    def __str__(self) -> str:
        return self.stem + self.extension


def _label(key: str, value: str) -> str:
    prefix = f"{key}-"
    return value[len(prefix):] if value.startswith(prefix) else value


def build_name(entities: dict[str, str | None], suffix: str, extension: str = "") -> str:
    """``sub-01_ses-a_task-rest_run-1_bold.nii.gz`` from {"sub": "01", "ses": "a", ...}, in schema
    order; empty entities are dropped. Raises ValueError naming an entity the schema does not know."""
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"not BIDS entities: {', '.join(sorted(unknown))} (known: {', '.join(ENTITY_ORDER)})")
    parts = [f"{k}-{_label(k, str(entities[k]))}" for k in ENTITY_ORDER if entities.get(k) not in (None, "")]
    return "_".join(parts + ([suffix] if suffix else [])) + extension


def parse_name(name: str) -> BidsName:
    """The entities, suffix and extension of a file name (a path's last part). Entities are kept in
    the name's order, whatever it is; the suffix is the last part without a ``-``."""
    name = Path(name).name
    extension = next((e for e in EXTENSIONS if name.endswith(e)), "")
    base = name[: len(name) - len(extension)]
    entities: dict[str, str] = {}
    suffix = ""
    for part in base.split("_"):
        key, dash, value = part.partition("-")
        if dash:
            entities[key] = value
        else:
            suffix = part
    return BidsName(entities, suffix, extension)


def session_dir(subject: str, session: str | None) -> Path:
    """``sub-X/ses-Y`` (or ``sub-X``), relative to the dataset root."""
    sub = Path(f"sub-{_label('sub', subject)}")
    return sub / f"ses-{_label('ses', session)}" if session else sub


def session_entities(subject: str, session: str | None) -> dict[str, str]:
    return {"sub": _label("sub", subject), **({"ses": _label("ses", session)} if session else {})}


def bids_path(subject: str, session: str | None, datatype: str, entities: dict[str, str], suffix: str) -> str:
    """``sub-01/ses-01/anat/sub-01_ses-01_run-1_T1w`` (no extension), relative to the dataset root."""
    name = build_name({**session_entities(subject, session), **entities}, suffix)
    return f"{session_dir(subject, session).as_posix()}/{datatype}/{name}"
