"""A version's manifest: built once, saved inside the version, safe to build from several targets at once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pacs2bids.lineage.tables import LINEAGE_DIR, InstanceRecord, LineageRecord, write_instances, write_run
from pacs2bids.publish import publish_local, seed_staging
from pacs2bids.targets.manifest import (CARRIED_PATH, MANIFEST_PATH, build_manifest, check_copy, ensure_manifest,
                                       file_sha256)
from targets_helpers import make_version


def test_manifest_lists_every_file_but_itself_and_tells_a_changed_copy(tmp_path):
    v = make_version(tmp_path, "20260101T000000Z-aaaa", subjects=2)
    m = ensure_manifest(v)
    assert (v / MANIFEST_PATH).is_file() and MANIFEST_PATH not in m["files"]
    assert set(m["files"]) == {p.relative_to(v).as_posix() for p in v.rglob("*") if p.is_file()} - {MANIFEST_PATH}
    assert check_copy(v, m) == []
    (v / "participants.tsv").write_text("participant_id\nsub-999\n")
    (v / "extra.txt").write_text("x")
    assert check_copy(v, m) == ["differs: participants.tsv", "not in the manifest: extra.txt"]


def test_a_manifest_copied_from_another_version_is_rebuilt_and_a_saved_one_is_read_back(tmp_path):
    v1 = make_version(tmp_path, "20260101T000000Z-aaaa")
    ensure_manifest(v1)
    v2 = make_version(tmp_path, "20260102T000000Z-bbbb", base=v1)
    (v2 / MANIFEST_PATH).write_bytes((v1 / MANIFEST_PATH).read_bytes())  # as a seeded staging would carry it
    m2 = ensure_manifest(v2)
    assert m2["version"] == v2.name and m2 == build_manifest(v2)
    (v2 / "participants.tsv").write_text("changed\n")  # a saved manifest is not recomputed (no dataset byte read)
    assert ensure_manifest(v2) == m2


def test_targets_building_the_manifest_at_once_do_not_trip_on_each_other(tmp_path):
    for i in range(15):
        v = make_version(tmp_path, f"20260101T0000{i:02d}Z-race", subjects=2, size=200)
        barrier, results, errors = threading.Barrier(3), [], []

        def build():
            try:
                barrier.wait()
                results.append(ensure_manifest(v))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=build) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors and len(results) == 3 and all(r == results[0] for r in results)
        assert sorted(p.name for p in (v / ".pacs2bids").iterdir()) == ["dataset.json", "manifest.json"]


def _hashed(monkeypatch) -> list[str]:
    """The files the manifest reads and hashes, by name, from now on."""
    from pacs2bids.targets import manifest as m

    seen, real = [], m.file_sha256
    monkeypatch.setattr(m, "file_sha256", lambda p: seen.append(Path(p).name) or real(p))
    return seen


def _record_lineage(version: Path, run_id: str) -> list[str]:
    """The run's lineage tables, as the run writes them after its files (real writers): its output
    files in the run table, a sourcedata instance in the instances table. Returns the paths recorded."""
    source = version / "sourcedata" / "sub-000" / "1.2.3.dcm"
    source.parent.mkdir(parents=True)
    source.write_bytes(os.urandom(3000))
    outputs = sorted(p.relative_to(version).as_posix() for p in version.glob("sub-*/anat/*.nii.gz"))
    time.sleep(0.05)  # the tables written after the files, as a run does (inode times are kernel ticks)
    write_run(version, [LineageRecord("sub-000", None, path=rel) for rel in outputs], run_id=run_id, project="p",
              flow_run_id=None, pacs2bids_version="0", heuristic_sha256=None)
    instance = InstanceRecord("sub-000", None, "2.25.1", "2.25.2", "2.25.3", "sourcedata/sub-000/1.2.3.dcm",
                              "dicomweb", None)
    write_instances(version, [instance], run_id=run_id, project="p")
    return [*outputs, "sourcedata/sub-000/1.2.3.dcm"]


def test_the_files_the_runs_lineage_hashed_are_not_read_again_and_the_manifest_is_the_same(tmp_path, monkeypatch):
    v = make_version(tmp_path, "20260101T000000Z-aaaa", subjects=3)
    recorded = _record_lineage(v, v.name)
    expected = {rel: file_sha256(v / rel) for rel in recorded}
    seen = _hashed(monkeypatch)
    m = build_manifest(v)
    assert {rel: m["files"][rel]["sha256"] for rel in recorded} == expected
    assert set(m["files"]) == {p.relative_to(v).as_posix() for p in v.rglob("*") if p.is_file()}
    # read: what the tables do not list (the tables themselves, the description, participants.tsv...)
    assert seen and not {Path(rel).name for rel in recorded} & set(seen)
    assert all(m["files"][rel]["sha256"] == file_sha256(v / rel) for rel in m["files"])


def test_a_file_changed_after_the_lineage_or_of_another_size_is_hashed_again(tmp_path, monkeypatch):
    v = make_version(tmp_path, "20260101T000000Z-aaaa", subjects=3)
    first, second, source = _record_lineage(v, v.name)[:3]
    table = v / LINEAGE_DIR / f"run-{v.name}.parquet"
    rows = pq.read_table(table).to_pylist()
    for row in rows:  # a table whose size disagrees with the file (written by hand, say)
        row["size"] = row["size"] + 1 if row["path"] == second else row["size"]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(table)), table)
    time.sleep(0.05)
    (v / first).write_bytes(os.urandom((v / first).stat().st_size))  # same size, other bytes, after the table
    seen = _hashed(monkeypatch)
    m = build_manifest(v)
    assert {Path(first).name, Path(second).name} <= set(seen) and Path(source).name not in seen
    assert all(m["files"][rel]["sha256"] == file_sha256(v / rel) for rel in m["files"])


def test_an_earlier_runs_tables_carried_with_the_dataset_are_not_trusted(tmp_path, monkeypatch):
    v1 = make_version(tmp_path, "20260101T000000Z-aaaa", subjects=2)
    recorded = _record_lineage(v1, v1.name)
    v2 = make_version(tmp_path, "20260102T000000Z-bbbb", base=v1, subjects=1)  # copied, as staging is seeded
    (v2 / recorded[0]).write_bytes(os.urandom((v2 / recorded[0]).stat().st_size))  # changed by the later run
    seen = _hashed(monkeypatch)
    m = build_manifest(v2)
    assert {Path(rel).name for rel in recorded} <= set(seen)
    assert all(m["files"][rel]["sha256"] == file_sha256(v2 / rel) for rel in m["files"])


def _published_with_manifest(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset published locally (real publish) whose version a target had: its manifest saved."""
    output = tmp_path / "out" / "dataset"
    output.parent.mkdir()
    first = make_version(tmp_path / "work", "staging-20260101T000000Z-aaaa", subjects=3)
    version = publish_local(first, output, "20260101T000000Z-aaaa")
    ensure_manifest(version)
    return output, version


def test_files_carried_unchanged_from_the_version_before_are_not_read_again(tmp_path, monkeypatch):
    output, v1 = _published_with_manifest(tmp_path)
    staging = tmp_path / "work" / "staging-20260102T000000Z-bbbb"
    seed_staging(output, staging)  # the next run starts from the published dataset
    images = sorted(p.relative_to(staging).as_posix() for p in staging.glob("sub-*/anat/*.nii.gz"))
    carried = set(pq.read_table(staging / CARRIED_PATH).column("path").to_pylist())
    assert carried == set(ensure_manifest(v1)["files"]) - {".pacs2bids/published.json"}  # that one is not copied
    time.sleep(0.05)  # the run's work comes after the seed (inode times are kernel ticks)
    in_place, replaced, kept = images
    with open(staging / in_place, "r+b") as f:  # rewritten in place, same size
        f.write(os.urandom(16))
    tmp = staging / f"{replaced}.new"
    tmp.write_bytes((staging / replaced).read_bytes()[::-1])
    os.replace(tmp, staging / replaced)  # replaced by another file of the same size
    (staging / "sub-009" / "anat").mkdir(parents=True)
    (staging / "sub-009" / "anat" / "sub-009_T1w.nii.gz").write_bytes(os.urandom(100))
    (staging / "participants.tsv").write_text("participant_id\nsub-000\nsub-001\nsub-002\nsub-009\n")
    v2 = publish_local(staging, output, "20260102T000000Z-bbbb")
    seen = _hashed(monkeypatch)
    m = build_manifest(v2)
    assert Path(kept).name not in seen and "dataset.json" not in seen  # carried, unchanged: not read
    assert {Path(in_place).name, Path(replaced).name, "sub-009_T1w.nii.gz", "participants.tsv"} <= set(seen)
    assert set(m["files"]) == {p.relative_to(v2).as_posix() for p in v2.rglob("*") if p.is_file()} - {MANIFEST_PATH}
    assert all(m["files"][rel]["sha256"] == file_sha256(v2 / rel) for rel in m["files"])


def test_nothing_is_carried_without_the_earlier_manifest_and_an_old_record_is_not_trusted(tmp_path, monkeypatch):
    output, v1 = _published_with_manifest(tmp_path)
    s2 = tmp_path / "work" / "staging-20260102T000000Z-bbbb"
    seed_staging(output, s2)
    (s2 / MANIFEST_PATH).unlink()  # this version had no target: no manifest to carry from
    v2 = publish_local(s2, output, "20260102T000000Z-bbbb")
    assert (v2 / CARRIED_PATH).is_file()  # v1's files recorded when v2 was seeded
    s3 = tmp_path / "work" / "staging-20260103T000000Z-cccc"
    seed_staging(output, s3)
    assert not (s3 / CARRIED_PATH).exists()  # the record copied from v2 described v2's copies: removed
    v3 = publish_local(s3, output, "20260103T000000Z-cccc")
    (v3 / CARRIED_PATH).parent.mkdir(exist_ok=True)
    (v3 / CARRIED_PATH).write_bytes((v2 / CARRIED_PATH).read_bytes())  # an old record, put back by hand
    seen = _hashed(monkeypatch)
    m = build_manifest(v3)
    assert {p.name for p in v3.glob("sub-*/anat/*.nii.gz")} <= set(seen)  # their copies are newer: read
    assert all(m["files"][rel]["sha256"] == file_sha256(v3 / rel) for rel in m["files"])
