"""The spec's ``derivatives`` section: what pacs2bids derives from the converted images (issue 15).

``deface``: which images are defaced into ``derivatives/pacs2bids-deface/`` (pydeface's method,
:mod:`pacs2bids.derivatives.deface`), and whether the defaced image replaces the raw one in the
shared dataset (the original then stays only in the private work area).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DefaceSettings(_Model):
    """Defacing of anatomical images (pydeface's template and face mask)."""

    enabled: bool = Field(True, description="Deface the images chosen below (false: write no deface derivative).")
    suffixes: tuple[str, ...] = Field(
        ("T1w", "T2w", "FLAIR", "PDw"), description="BIDS suffixes of the anat images to deface.")
    only_3d: bool = Field(
        True, description="Only 3D acquisitions (MRAcquisitionType 3D in the sidecar): a 2D stack of thick "
        "slices is rarely enough to rebuild a face, and registers poorly.")
    replace_raw: bool = Field(
        False, description="Put the defaced image in place of the raw one in the shared dataset; the original "
        "stays only in the private work area (deface-originals/). An image that fails defacing is then left out "
        "of the shared dataset.")

    @field_validator("suffixes")
    @classmethod
    def _suffixes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in v if not re.fullmatch(r"[A-Za-z0-9]+", s)]
        if bad:
            raise ValueError(f"deface.suffixes: {', '.join(map(repr, bad))} not BIDS suffixes (e.g. T1w, FLAIR)")
        return v


class DerivativesSettings(_Model):
    """Derivatives written beside the raw dataset, under ``derivatives/``."""

    deface: DefaceSettings | None = Field(
        None, description="Defacing into derivatives/pacs2bids-deface/ (absent: no defacing).")
