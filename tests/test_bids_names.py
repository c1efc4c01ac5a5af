"""pacs2bids.bids: names built from entities in the schema's order and parsed back; scans.tsv's one writer."""

from __future__ import annotations

import pytest

from pacs2bids.bids import bids_path, build_name, parse_name, update_scans


def test_entities_follow_the_schema_order_whatever_the_given_order():
    assert build_name({"run": "2", "task": "rest", "sub": "01", "ses": "a", "echo": "1"}, "bold", ".nii.gz") == \
        "sub-01_ses-a_task-rest_run-2_echo-1_bold.nii.gz"
    assert bids_path("sub-01", None, "anat", {"acq": "mprage", "run": None}, "T1w") == "sub-01/anat/sub-01_acq-mprage_T1w"
    with pytest.raises(ValueError, match="not BIDS entities: foo"):
        build_name({"sub": "01", "foo": "x"}, "T1w")


def test_parse_name_round_trips_and_reads_entities_after_the_suffix():
    n = parse_name("sub-01/fmap/sub-01_ses-a_acq-b0_fieldmap2.json")
    assert n.entities == {"sub": "01", "ses": "a", "acq": "b0"} and (n.suffix, n.extension) == ("fieldmap2", ".json")
    assert str(n.with_(suffix="magnitude")) == "sub-01_ses-a_acq-b0_magnitude.json"
    odd = parse_name("sub-01_T1w_part-mag.nii.gz")  # heudiconv puts part- after the suffix
    assert odd.suffix == "T1w" and odd.entities["part"] == "mag" and odd.extension == ".nii.gz"


def test_scans_rows_renamed_added_and_dropped_other_columns_kept(tmp_path):
    scans = tmp_path / "sub-01_scans.tsv"
    (tmp_path / "anat").mkdir()
    for name in ("sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz"):
        (tmp_path / "anat" / name).write_bytes(b"")
    scans.write_text("filename\tacq_time\toperator\n"
                     "anat/sub-01_old.nii.gz\t2020-01-01T10:00:00\tx\n"
                     "anat/sub-01_gone.nii.gz\tn/a\ty\n")
    update_scans(scans, {"anat/sub-01_T2w.nii.gz": "n/a"}, renames={"sub-01_old.nii.gz": "sub-01_T1w.nii.gz"})
    assert scans.read_text() == ("filename\tacq_time\toperator\n"
                                 "anat/sub-01_T1w.nii.gz\t2020-01-01T10:00:00\tx\n"
                                 "anat/sub-01_T2w.nii.gz\tn/a\tn/a\n")
    for f in (tmp_path / "anat").iterdir():
        f.unlink()
    assert update_scans(scans) is None and not scans.exists()
