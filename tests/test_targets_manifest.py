"""A version's manifest: built once, saved inside the version, safe to build from several targets at once."""

from __future__ import annotations

import threading

from pacs2bids.targets.manifest import MANIFEST_PATH, build_manifest, check_copy, ensure_manifest
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
