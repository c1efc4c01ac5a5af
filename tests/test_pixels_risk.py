"""Burned-in text risk (``deid.pixels.risk_reason``) when ImageType holds one value.

ImageType is VM 2-n, but exports write a single value ("SECONDARY", "SCREEN SAVE"). Read as
pydicom or from the raw bytes, a single value is a str: it must be taken as one value, not
iterated letter by letter (which found no risk at all). Planted into copies of a real sample file.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from pacs2bids.deid.pixels import risk_reason


def _copy(sample_dir: Path, tmp_path: Path, image_type, burned: str | None = None) -> Path:
    src = sorted((sample_dir / "PACSMAN_data" / "dicomseries").glob("*.dcm"))[0]  # a real MR image
    ds = pydicom.dcmread(src)
    ds.ImageType = image_type
    if burned is not None:
        ds.BurnedInAnnotation = burned
    elif "BurnedInAnnotation" in ds:
        del ds.BurnedInAnnotation
    out = tmp_path / "planted.dcm"
    ds.save_as(out)
    return out


@pytest.mark.parametrize("value, reason", [
    ("SECONDARY", "ImageType SECONDARY without BurnedInAnnotation NO"),
    ("SCREEN SAVE", "ImageType SCREEN SAVE"),
    (["DERIVED", "SECONDARY"], "ImageType SECONDARY without BurnedInAnnotation NO"),
])
def test_single_or_multiple_image_type_is_at_risk(sample_dir, tmp_path, value, reason):
    path = _copy(sample_dir, tmp_path, value)
    assert risk_reason(pydicom.dcmread(path)) == reason
    ds = pydicom.dcmread(path)
    ds.ImageType  # decoded by pydicom, as the general path reads it
    assert risk_reason(ds) == reason


def test_secondary_with_burned_in_no_is_not_at_risk(sample_dir, tmp_path):
    path = _copy(sample_dir, tmp_path, "SECONDARY", burned="NO")
    assert risk_reason(pydicom.dcmread(path)) is None
