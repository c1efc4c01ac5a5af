"""Incremental replication (issue 14) against a real Orthanc: the watermark bounds the query, a
series that reaches the PACS late is extracted on the next replication, a replication with
nothing new changes nothing, and the flow run is named and tagged after the project."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import write_spec
from pacs2bids.config import load_spec
from pacs2bids.deid.keyed import Keyed
from pacs2bids.lineage import read_lineage
from pacs2bids.pacs import close_pools
from pacs2bids.publish import current_version
from pacs2bids.query import find_studies
from pacs2bids.replicate import query_since, state_path

import test_query
from test_retrieve import make_spec

pacs, transport = test_query.pacs, test_query.transport  # fixtures: a real Orthanc with planted studies, per transport

SECRET = "replication-test-secret-0123456789"
NIH = Path("dcm_qa_nih") / "In" / "20180918Si"


def plant(sample_dir: Path, out: Path, pid: str, study: str, day: date, series: str, number: int) -> str:
    """Copies of one real NIH series as series ``number`` of ``study`` (patient ``pid``, StudyDate ``day``),
    new instance UIDs; returns the new SeriesInstanceUID."""
    se_uid = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted((sample_dir / NIH / series).glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName = pid, f"DOE^{pid}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, se_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate, ds.SeriesNumber = day.strftime("%Y%m%d"), number
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm")
    return se_uid


def test_a_bounded_row_is_asked_from_its_day_on_and_then_for_all_its_studies(transport, tmp_path):
    """PLANTED1 has studies on the 15th of January to May 2021 (test_query.planted_studies)."""
    spec = make_spec(tmp_path, transport, [("patient_id", "PLANTED1", "C"), ("patient_id", "NOBODY", "D")])
    every = find_studies(spec)
    assert len(every.studies) == 5 and [i.subject for i in every.unmatched] == ["D"]
    # nothing from June on: the row is done, and not listed as unmatched; the other row is asked as before
    quiet = find_studies(spec, {2: date(2021, 6, 1)})
    assert quiet.studies == [] and [i.subject for i in quiet.unmatched] == ["D"]
    # a study in the window (May): the row is asked for all its studies, so sessions number as in a full run
    recent = find_studies(spec, {2: date(2021, 5, 1)})
    assert sorted(s.study_instance_uid for s in recent.studies) == sorted(s.study_instance_uid for s in every.studies)
    close_pools()


def flow_run_named(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return run


def published_series(spec) -> set[str]:
    return {r["pseudo_series_uid"] for r in read_lineage(spec.output).to_pylist() if r["publish_status"] == "published"}


@pytest.mark.slow
def test_replication_asks_from_the_watermark_takes_late_series_and_is_a_noop_when_nothing_is_new(
        prefect_harness, orthanc_factory, sample_dir, tmp_path, monkeypatch):
    from pacs2bids.flows.replicate import replicate_project

    monkeypatch.setenv("P2B_REPL_SECRET", SECRET)
    today = date.today()
    orthanc = orthanc_factory()
    study_a, study_e = generate_uid(), generate_uid()
    a1 = plant(sample_dir, tmp_path / "up1", "RP-1", study_a, today - timedelta(days=3), "mr_0003", 3)
    e1 = plant(sample_dir, tmp_path / "up1", "RP-3", study_e, date(2020, 3, 1), "mr_0003", 3)
    orthanc.upload(sorted((tmp_path / "up1").iterdir()))
    out, mirror = tmp_path / "out" / "ds", tmp_path / "mirror"
    spec_path = write_spec(tmp_path, "patient_id,subject\nRP-1,01\nRP-2,02\nRP-3,03\n", project="repl-proj",
                           pacs=orthanc, selection="{inclusions: inclusions.csv, modalities: [MR]}",
                           pseudonymization="{secret_env: P2B_REPL_SECRET}", output=out,
                           retries="{attempts: 0, backoff_seconds: 0.1}",
                           targets=f"[{{kind: folder, url: 'file://{mirror}'}}]")
    spec = load_spec(spec_path)
    keyed = Keyed(spec.secret_bytes, spec.project)
    assert query_since(spec) == {}  # never replicated: every row is asked for everything

    first = replicate_project(str(spec_path))
    assert first["published"] and first["state"] == "completed", first["errors"]
    assert first["replication"] == {"incremental_rows": 0, "rows_advanced": 3}
    assert published_series(spec) == {keyed.uid(a1), keyed.uid(e1)}
    state = state_path(spec).read_text()
    assert "RP-1" not in state and "RP-3" not in state  # keyed rows, no original identifier
    run = flow_run_named(f"repl-proj/{first['run_id']}")
    assert "repl-proj" in run.tags and run.name.startswith("repl-proj/")

    # after the first replication: a series completes study A late (in the window), a new study
    # of RP-2 arrives, and an old study of RP-3 (before the window) is stored
    a2 = plant(sample_dir, tmp_path / "up2", "RP-1", study_a, today - timedelta(days=3), "mr_0004", 4)
    b1 = plant(sample_dir, tmp_path / "up2", "RP-2", generate_uid(), today, "mr_0003", 3)
    c1 = plant(sample_dir, tmp_path / "up2", "RP-3", generate_uid(), date(2019, 6, 1), "mr_0004", 4)
    orthanc.upload(sorted((tmp_path / "up2").iterdir()))
    since = query_since(spec)
    assert since == {r: (today - timedelta(days=7)).isoformat() for r in (2, 3, 4)}  # CSV line numbers
    full = find_studies(spec)  # the old study is on the PACS: a full extraction finds it
    close_pools()
    assert c1 in {s.series_instance_uid for st in full.studies for s in st.series}

    from pacs2bids.targets import manifest as target_manifest

    hashed, file_sha256 = [], target_manifest.file_sha256
    monkeypatch.setattr(target_manifest, "file_sha256", lambda p: hashed.append(Path(p)) or file_sha256(p))
    second = replicate_project(str(spec_path))
    assert second["published"] and second["state"] == "completed", second["errors"]
    assert [(t["state"], t["verified"]) for t in second["targets"]] == [("published", True)]
    # the target's manifest took the checksums of what the run carried unchanged from the first version
    carried = current_version(spec.output) / target_manifest.CARRIED_PATH
    sub03 = {p.relative_to(carried.parents[1]) for p in carried.parents[1].glob("sub-03/**/*") if p.is_file()}
    assert sub03 and not sub03 & {p.relative_to(carried.parents[1]) for p in hashed}
    assert second["studies"] == 2 and second["replication"]["incremental_rows"] == 3
    assert published_series(spec) == {keyed.uid(u) for u in (a1, a2, e1, b1)}  # not c1: before the window
    assert keyed.uid(c1) not in json.dumps(second)
    version = current_version(spec.output)

    third = replicate_project(str(spec_path))  # nothing new
    assert third["unchanged"] and not third["published"] and third["state"] == "completed"
    assert third["studies"] == 0 and current_version(spec.output) == version
