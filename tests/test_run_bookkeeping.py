"""Sessions, atomic publishing and lineage, without Prefect or a PACS."""

from __future__ import annotations

import json
import os
import threading

import pytest

from pacs2bids.lineage import LineageRecord, format_chain, lineage_of, read_lineage, write_run
from pacs2bids.model import StudyRef
from pacs2bids.publish import publish_local, seed_staging
from pacs2bids.run import RunSummary, SeriesLine, assign_sessions


def _study(subject, date, uid, session=None):
    return StudyRef(inclusion_row=2, subject=subject, session=session, study_instance_uid=uid, study_date=date)


def test_sessions_numbered_by_date_only_when_a_subject_has_several_studies():
    studies = assign_sessions(
        [_study("01", "20200301", "1.2"), _study("01", "20190101", "1.1"), _study("02", "20200101", "2.1")]
    )
    assert [(s.subject, s.study_date, s.session) for s in studies] == [
        ("01", "20200301", "02"),
        ("01", "20190101", "01"),
        ("02", "20200101", None),
    ]


def test_given_sessions_are_kept_and_not_reused():
    studies = assign_sessions([_study("01", "20200301", "1.2", session="01"), _study("01", "20190101", "1.1")])
    assert sorted(s.session for s in studies) == ["01", "02"]


def test_publish_is_a_rename_and_replaces_previous_dataset(tmp_path):
    out = tmp_path / "out"
    staging = tmp_path / "work" / "staging-1"
    staging.mkdir(parents=True)
    (staging / "dataset_description.json").write_text("{}")
    inode = os.stat(staging).st_ino
    publish_local(staging, out)
    assert os.stat(out).st_ino == inode and not staging.exists()

    seed_staging(out, staging)  # a second run starts from the published dataset
    assert (staging / "dataset_description.json").exists()
    (staging / "new.txt").write_text("x")
    assert not (out / "new.txt").exists()  # the copy is independent of the published dataset
    publish_local(staging, out)
    assert (out / "new.txt").exists()
    assert not list(tmp_path.glob(".out.previous-*"))


def test_reader_never_sees_a_half_dataset(tmp_path):
    """While a large staging folder is filled and published, a reader polling ``output`` sees it
    absent, then whole: never part of it. The reader is running before publishing starts and
    is stopped only after it has seen the dataset, so its checks are never vacuous."""
    import sys

    out, staging = tmp_path / "out", tmp_path / "staging"
    staging.mkdir()
    absent, seen = [], []
    started, stop = threading.Event(), threading.Event()

    def watch():
        while not stop.is_set():
            if out.exists():
                try:
                    seen.append(len([p for p in out.iterdir() if p.name != ".pacs2bids"]))  # + the manifest
                except FileNotFoundError:  # gone between the two calls: a reader's race, not a half dataset
                    continue
            else:
                absent.append(1)
            started.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the reader run between any two steps of the publisher
    t = threading.Thread(target=watch)
    t.start()
    try:
        assert started.wait(10)
        for i in range(200):
            (staging / f"f{i}").write_text("x")
        publish_local(staging, out)
        waited = 0
        while not seen and waited < 1000:
            stop.wait(0.01)
            waited += 1
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert absent, "the reader never ran before the dataset was published"
    assert seen, "the reader never saw the published dataset"
    assert set(seen) == {200}, f"the reader saw a partial dataset: {sorted(set(seen))[:10]}"


def test_lineage_roundtrip_and_chain(tmp_path):
    root = tmp_path / "ds"
    f = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"nifti")
    rec = LineageRecord(
        subject="01", session=None, pseudo_study_uid="2.25.1", pseudo_series_uid="2.25.2", series_number=3,
        instances_announced=10, instances_received=10, retrieve_status="complete", pseudonymise_status="pseudonymised",
        convert_status="converted", validate_status="valid", publish_status="published",
        path="sub-01/anat/sub-01_T1w.nii.gz",
    )
    write_run(root, [rec], run_id="r1", project="p", flow_run_id="fr", pacs2bids_version="0.1", heuristic_sha256="h")
    write_run(root, [LineageRecord(subject="02", session=None, retrieve_status="failed", reason="x")],
              run_id="r2", project="p", flow_run_id=None, pacs2bids_version="0.1", heuristic_sha256="h")
    assert read_lineage(root).num_rows == 2
    found_root, rows = lineage_of(f)
    assert found_root == root.resolve() and len(rows) == 1
    import hashlib

    assert rows[0]["sha256"] == hashlib.sha256(b"nifti").hexdigest()
    text = format_chain(found_root, f, rows)
    assert "2.25.2" in text and "convert=converted" in text and "sub-01" in text
    # a sidecar of the same image finds the image's series
    _, rows = lineage_of(f.with_name("sub-01_T1w.json"))
    assert rows and rows[0]["pseudo_series_uid"] == "2.25.2"


def test_lineage_outside_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not inside a pacs2bids dataset"):
        lineage_of(tmp_path)


def test_summary_states_and_text():
    s = RunSummary(project="p", run_id="r", output="/o")
    s.subjects = {"01"}
    s.series = [SeriesLine("01", None, 3, "T1", "converted"), SeriesLine("01", None, 4, "odd", "skipped", "unclassified")]
    s.unmatched = [{"row": 3, "subject": "02"}]
    s.finish()
    assert s.state == "completed"
    text = s.format()
    assert "inclusion row 3 (sub-02): no study matched" in text and "'odd': skipped (unclassified)" in text
    s.series.append(SeriesLine("01", None, 5, "", "incomplete", "2 missing"))
    s.finish()
    assert s.state == "completed with failures"


def test_a_refused_release_is_a_failure_of_the_run():
    """A quarantine release that does not count (unsigned, broken chain) or fails is not a quiet success."""
    s = RunSummary(project="p", run_id="r", output="/o")
    s.series = [SeriesLine("01", None, 3, "T1", "converted")]
    s.released = [{"file": "sub-01/abc", "status": "included in this run"}]
    s.finish()
    assert s.state == "completed"
    s.released.append({"file": "quarantine/decisions.jsonl", "status": "not included: the chain is broken at entry 2"})
    s.finish()
    assert s.state == "completed with failures"


def test_instance_lineage_pairs_written_files_with_keyed_received_checksums(tmp_path, monkeypatch):
    """One row per published sourcedata file: its own checksum, the transport, and the received
    file's checksum keyed with the project key (never plain), written in bounded row groups."""
    import hashlib
    import hmac

    import pyarrow.parquet as pq

    from pacs2bids.lineage import tables as lineage_tables
    from pacs2bids.deid.keyed import Keyed, derive_key
    from pacs2bids.lineage import format_instances, instance_records, instances_of, read_instances, write_instances

    secret = b"s" * 32
    keyed = Keyed(secret, "proj")
    root = tmp_path / "ds"
    series = root / "sourcedata" / "sub-01" / "003-abcdef"
    series.mkdir(parents=True)
    written, sources, ledger = [], [], {}
    for i in range(7):
        f = series / (f"2.25.{100 + i}.dcm" if i != 6 else "2.25.105-1.dcm")
        f.write_bytes(b"pseudonymised %d" % i)
        raw_sha = hashlib.sha256(b"received %d" % i).hexdigest()
        written.append(f)
        sources.append(f"raw{i}.dcm")
        if i != 3:  # recovered after a killed run: no ledger entry, so no digest at all
            ledger[f"raw{i}"] = {"sha256": raw_sha, "size": 10, "transport": "c-get"}
    recs = instance_records(root, written, sources, ledger, subject="01", session=None, pseudo_study_uid="2.25.1",
                            pseudo_series_uid="2.25.2", received_digest=keyed.received_digest)
    monkeypatch.setattr(lineage_tables, "_BATCH", 3)
    out = write_instances(root, iter(recs), run_id="r1", project="proj")
    assert out.name == "instances-r1.parquet" and pq.ParquetFile(out).metadata.num_row_groups == 3
    rows = {r["path"]: r for r in read_instances(root).to_pylist()}
    assert len(rows) == 7
    k = derive_key(secret, "proj", "received-sha256")
    for i, f in enumerate(written):
        r = rows[f.relative_to(root).as_posix()]
        assert r["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and r["size"] == f.stat().st_size
        assert r["pseudo_sop_instance_uid"] == ("2.25.105" if i == 6 else f"2.25.{100 + i}")
        plain = hashlib.sha256(b"received %d" % i).hexdigest()
        if i == 3:
            assert r["received_sha256_hmac"] is None and r["transport"] is None
        else:
            assert r["received_sha256_hmac"] == hmac.new(k, bytes.fromhex(plain), hashlib.sha256).hexdigest()
            assert r["received_sha256_hmac"] != plain and r["transport"] == "c-get"
    # another project key gives other digests
    assert Keyed(b"t" * 32, "proj").received_digest(plain) != keyed.received_digest(plain)
    # the CLI's view of one file, and of the series folder
    found_root, one = instances_of(written[0])
    assert found_root == root.resolve() and len(one) == 1
    _, every = instances_of(series)
    assert len(every) == 7
    text = format_instances(found_root, written[0], one)
    assert "2.25.100" in text and "c-get" in text and one[0]["received_sha256_hmac"] in text
    assert write_instances(root, [], run_id="r2", project="proj") is None


def test_summary_times_stages_and_adds_study_seconds(tmp_path):
    """stage_seconds (issue 12's benchmark reads it): timed stages and the studies' sums, in run-*.json."""
    s = RunSummary(project="p", run_id="r", output=str(tmp_path / "out"))
    with s.timed("query"):
        pass
    s.add_seconds({"retrieve": 1.25, "convert": 2.0})
    s.add_seconds({"retrieve": 0.75})
    with pytest.raises(RuntimeError):
        with s.timed("publish"):  # a failed stage still counts its time
            raise RuntimeError("boom")
    written = json.loads(s.write(tmp_path / "run-r.json").read_text())
    assert written["stage_seconds"]["retrieve"] == 2.0 and written["stage_seconds"]["convert"] == 2.0
    assert set(written["stage_seconds"]) == {"query", "retrieve", "convert", "publish"}
    assert 0 <= written["stage_seconds"]["query"] < 1


def test_one_recorder_call_writes_the_summary_line_and_the_lineage_rows():
    """Each event is one call: the summary entry and its lineage row(s) come out together."""
    from types import SimpleNamespace

    from pacs2bids.deid.keyed import Keyed
    from pacs2bids.model import SeriesRef
    from pacs2bids.recorder import Outcomes, Recorder

    keyed = Keyed(b"k" * 32, "p")
    study = StudyRef(inclusion_row=1, subject="01", session=None, study_instance_uid="1.2.3",
                     series=[SeriesRef("1.2.3", "1.2.3.4", series_number=5, announced_instances=3)])
    rs = SimpleNamespace(series=study.series[0], received=2, status="incomplete", reason="1 missing")
    rec = Recorder(keyed, Outcomes())
    rec.not_retrieved_whole(study, rs)
    res = SimpleNamespace(pseudo_study_uid="2.25.1", pseudo_series_uid="2.25.2", series_number=5,
                          series_description="t1")
    rs_ok = SimpleNamespace(series=study.series[0], received=3, status="complete", reason="")
    rec.converted(study, rs_ok, res, "converted", "", ["sub-01/anat/sub-01_T1w.nii.gz"], "prov.json")
    rec.study_failed(study, "PacsError: refused")
    o = rec.outcomes
    assert [(line.status, line.reason) for line in o.series] == [("incomplete", "1 missing"), ("converted", "")]
    assert o.series[1].outputs == ["sub-01/anat/sub-01_T1w.nii.gz"]  # provenance: lineage only
    assert [r.path for r in o.records[1:3]] == ["sub-01/anat/sub-01_T1w.nii.gz", "prov.json"]
    assert o.records[0].pseudo_series_uid == keyed.uid("1.2.3.4") and o.records[0].retrieve_status == "incomplete"
    assert o.records[1].reason is None and o.records[1].pseudonymise_status == "pseudonymised"
    assert o.study_failures == [{"label": "sub-01", "reason": "PacsError: refused"}]
    assert o.records[3].pseudo_study_uid == keyed.uid("1.2.3") and o.records[3].retrieve_status == "failed"
