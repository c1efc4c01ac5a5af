"""The project spec: typed, validated on load, resolved once at the flow's entry.

A spec is a YAML file. Relative paths in it are relative to the spec file. Unknown keys are
refused, naming the key. The project secret is read from the environment variable the spec
names and is never written anywhere: it is held as a :class:`pydantic.SecretStr`, whose
``repr`` hides it, and it is excluded from every dump of the spec.

- :mod:`.settings`: the settings models (:class:`ProjectSpec` and its parts);
- :mod:`.inclusions`: reading the inclusion list, refusing rows that split or merge people;
- :mod:`.locations`: where output, the work folder and the key store may be;
- :mod:`.load`: :func:`load_spec`, which puts them together.
"""

from .inclusions import read_inclusions
from .load import MIN_SECRET_CHARS, load_spec
from .settings import (
    DateRange,
    DicomwebSettings,
    DimseSettings,
    Inclusion,
    PacsSettings,
    ProjectSpec,
    PseudonymizationSettings,
    RetrySettings,
    SelectionSettings,
    TimeWindow,
)

__all__ = [
    "DateRange",
    "DicomwebSettings",
    "DimseSettings",
    "Inclusion",
    "MIN_SECRET_CHARS",
    "PacsSettings",
    "ProjectSpec",
    "PseudonymizationSettings",
    "RetrySettings",
    "SelectionSettings",
    "TimeWindow",
    "load_spec",
    "read_inclusions",
]
