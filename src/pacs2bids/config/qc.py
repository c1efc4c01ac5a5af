"""The project's declared acquisition protocol, for the conformity QC (issue 15, REMI recommendations).

A protocol lists the series expected in every session, each matched by its BIDS name (suffix and,
optionally, entities: ``T1w``, ``acq-mprage_T1w``, ``dir-AP_epi``) with the number of images expected,
and the parameters each must have. Parameters are read from what researchers receive: the BIDS JSON
sidecar (seconds for times, degrees for angles, as BIDS says) and the NIfTI header (``VoxelSize`` in
mm, ``Matrix`` in voxels, the first three axes). Example (spec.yaml)::

    qc:
      protocol:
        parameters:                      # checked on every series of the protocol
          MagneticFieldStrength: {value: 3, tolerance: 0.1}
          Manufacturer: {regex: "Siemens|GE|Philips"}
        series:
          - match: acq-mprage_T1w
            count: 1
            parameters:
              RepetitionTime: {value: 2.3, tolerance: 0.01}        # absolute: |x - 2.3| <= 0.01
              EchoTime: {value: 0.0029, relative: 0.1}              # relative: within 10 % of 0.0029
              VoxelSize: {value: [1, 1, 1], tolerance: 0.05}        # per axis
              Matrix: {value: [256, 256, 176]}                      # exact
              SoftwareVersions: {value: "syngo MR E11"}             # exact string
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NIFTI_PARAMETERS = ("VoxelSize", "Matrix")
SIDECAR_PARAMETERS = ("RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "MagneticFieldStrength",
                      "Manufacturer", "ManufacturersModelName", "SoftwareVersions")
_ENTITY = re.compile(r"[a-z]+-[A-Za-z0-9]+")


def _compiles(v: str) -> str:
    try:
        re.compile(v)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return v


Regex = Annotated[str, AfterValidator(_compiles)]  # a spec field holding a regular expression, checked on load


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expected(_Model):
    """One parameter's expected value: a number (or a list, per axis) with a tolerance, or a string
    (exact ``value``, or ``regex`` that the whole value must match)."""

    value: float | str | list[float] | None = Field(None, description="Expected value (number, list or string).")
    tolerance: float = Field(0.0, ge=0, description="Absolute tolerance, in the parameter's unit.")
    relative: float = Field(0.0, ge=0, description="Relative tolerance (0.05: within 5 % of value).")
    regex: Regex | None = Field(None, description="For strings: a regular expression the whole value must match.")

    @model_validator(mode="after")
    def _one_kind(self) -> "Expected":
        if (self.value is None) == (self.regex is None):
            raise ValueError("give either value (with tolerance or relative for numbers) or regex")
        if isinstance(self.value, str) and (self.tolerance or self.relative):
            raise ValueError("a tolerance applies to numbers only; for strings use value (exact) or regex")
        return self


def _parameter_names(v: dict) -> dict:
    known = NIFTI_PARAMETERS + SIDECAR_PARAMETERS
    bad = [k for k in v if k not in known and not re.fullmatch(r"[A-Z][A-Za-z0-9]*", k)]
    if bad:
        raise ValueError(f"{', '.join(map(repr, bad))}: not a parameter; use one of {', '.join(known)} "
                         "or another BIDS sidecar field (CamelCase)")
    return v


class ExpectedSeries(_Model):
    """A series every session should hold: its BIDS name pattern, how many images, its parameters."""

    match: str = Field(description="BIDS suffix with optional entities before it, e.g. T1w, acq-mprage_T1w, "
                       "task-rest_bold. An image matches when its suffix is this one and it has these entities.")
    count: int = Field(1, ge=0, description="Images expected per session (more: duplicated; fewer: missing).")
    parameters: dict[str, Expected] = Field(default_factory=dict, description="Parameter name: expected value.")

    @field_validator("parameters")
    @classmethod
    def _names(cls, v: dict) -> dict:
        return _parameter_names(v)

    @field_validator("match")
    @classmethod
    def _match(cls, v: str) -> str:
        *entities, suffix = v.split("_")
        if not re.fullmatch(r"[A-Za-z0-9]+", suffix) or not all(_ENTITY.fullmatch(e) for e in entities):
            raise ValueError(f"{v!r} is not a BIDS name pattern: entities key-value joined by '_', then the "
                             "suffix (e.g. acq-mprage_T1w)")
        return v

    @property
    def suffix(self) -> str:
        return self.match.split("_")[-1]

    @property
    def entities(self) -> dict[str, str]:
        return dict(e.split("-", 1) for e in self.match.split("_")[:-1])


class Protocol(_Model):
    series: list[ExpectedSeries] = Field(default_factory=list, description="The series expected per session.")
    parameters: dict[str, Expected] = Field(
        default_factory=dict, description="Parameters checked on every series of the protocol (a series' own "
        "value for the same parameter wins).")

    @field_validator("parameters")
    @classmethod
    def _names(cls, v: dict) -> dict:
        return _parameter_names(v)

    @field_validator("series")
    @classmethod
    def _distinct(cls, v: list[ExpectedSeries]) -> list[ExpectedSeries]:
        seen = [s.match for s in v]
        dup = sorted({m for m in seen if seen.count(m) > 1})
        if dup:
            raise ValueError(f"series {', '.join(dup)} declared twice: give one entry with its count")
        return v


class QcSettings(_Model):
    """Protocol conformity QC, written to derivatives/pacs2bids-qc/ (issue 15)."""

    enabled: bool = Field(True, description="Run the QC after the dataset is finalised.")
    protocol: Protocol | None = Field(
        None, description="The expected protocol. Without it, image indices and the report are still written, "
                          "each session with status 'no protocol'.")
    snapshots: bool = Field(True, description="PNG middle slices of each image in the report.")
