"""Staging through a store (issue 14): each study works in its worker's own scratch folder and uploads its
part to S3 (a real SeaweedFS on loopback); the flow's machine assembles the parts and publishes. The Dask
workers (2 processes, each with its own scratch root) are refused every write under the flow's folder (an
audit hook, in them and in the processes they start), so nothing they do can depend on it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import write_spec
from pacs2bids.config import load_spec
from pacs2bids.errors import SpecError
from pacs2bids.testing_servers import SeaweedS3

SECRET = "staging-secret-0123456789abcdef"
PACS = "{dimse: {ae_title: A, host: 127.0.0.1, port: 104}}"
BUCKET = "staging"

#: installed in each Dask worker (as a preload) and, through PYTHONPATH, in every Python process it starts
#: (sitecustomize): a write under $PACS2BIDS_TEST_FORBID is refused and logged
HOOK = r'''
import os, sys

def _install():
    root = os.environ.get("PACS2BIDS_TEST_FORBID")
    if not root or getattr(sys, "_pacs2bids_forbid", False):
        return
    sys._pacs2bids_forbid = True
    root = os.path.realpath(root) + os.sep
    log = os.environ["PACS2BIDS_TEST_VIOLATIONS"]
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    events = {"os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate",
              "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.utime"}

    def under(p):
        if isinstance(p, int) or p is None:
            return False
        try:
            return (os.path.realpath(os.fsdecode(os.fspath(p))) + os.sep).startswith(root)
        except TypeError:
            return False

    def hook(event, args):
        if event == "open":
            if not (isinstance(args[2], int) and args[2] & writes):
                return
            paths = args[:1]
        elif event in events:
            paths = args[:2]
        else:
            return
        bad = [p for p in paths if under(p)]
        if bad:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {event} {bad[0]}\n")
            raise PermissionError(f"a worker wrote under the flow's folder: {bad[0]}")

    sys.addaudithook(hook)
    if os.environ.get("PACS2BIDS_TEST_SCRATCH_BASE") and not os.environ.get("PACS2BIDS_SCRATCH"):
        os.environ["PACS2BIDS_SCRATCH"] = os.path.join(os.environ["PACS2BIDS_TEST_SCRATCH_BASE"],
                                                       f"worker-{os.getpid()}")

_install()
'''


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    server.make_bucket(BUCKET)
    yield server
    server.kill()


def _staging(s3) -> str:
    return (f"{{url: 's3://{BUCKET}/runs', endpoint_url: '{s3.endpoint}', access_key_id_env: ST_KEY, "
            "secret_access_key_env: ST_SECRET}")


def test_staging_setting_is_typed_off_by_default_and_never_holds_secrets(tmp_path, monkeypatch):
    from pacs2bids.config.staging import SCRATCH_ENV

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)

    def spec(name: str, staging: str | None):
        folder = tmp_path / name
        folder.mkdir()
        keys = {"staging": staging} if staging else {}
        return load_spec(write_spec(folder, "patient_id,subject\nP1,01\n", project="stg", pacs=PACS,
                                    output=str(folder / "out"), **keys))

    assert spec("default", None).staging is None
    s = spec("s3", "{url: 's3://bucket/runs/', endpoint_url: 'http://127.0.0.1:9000', access_key_id_env: K, "
                   "secret_access_key_env: S, scratch_dir: /var/tmp}").staging
    assert s.url == "s3://bucket/runs" and s.store_settings().kind == "s3"
    assert s.scratch_root({}) == Path("/var/tmp") and s.scratch_root({SCRATCH_ENV: "/scratch"}) == Path("/scratch")
    assert spec("folder", "{url: 'file:///mnt/staging'}").staging.store_settings().kind == "folder"
    for bad, says in [("{url: 'http://host/x'}", "s3:// .* or file://"),
                      ("{url: 's3://u:pw@bucket/x'}", "password"),
                      ("{url: 's3://bucket/x', access_key_id_env: 'AKIA 123'}", "NAME of an environment variable"),
                      ("{url: 's3://bucket/x', scratch_dir: relative/dir}", "absolute"),
                      ("{url: 's3://bucket/x', bucket: b}", "bucket")]:
        with pytest.raises((SpecError, ValueError), match=says):
            spec(f"bad{len(list(tmp_path.iterdir()))}", bad)


def _left(s3) -> list[str]:
    """What the staging prefix holds (SeaweedFS may list the prefix itself, as a folder)."""
    return [p for p in s3.filesystem().find(f"{BUCKET}/runs", withdirs=True) if p != f"{BUCKET}/runs"]


def _files(root: Path) -> dict[str, str]:
    """The dataset's files (run-specific metadata left out): path -> SHA-256 of images and DICOM."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel.startswith(".pacs2bids/") or rel.startswith("prov/") or rel.endswith("_scans.tsv"):
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.name.endswith((".nii.gz", ".dcm")) else ""
    return out


def _key_store(spec) -> dict:
    from pacs2bids.deid.keystore import KeyStore

    store = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    return {"identifiers": store.identifiers(),
            "subjects": {s: store.reidentify(s, reason="test: the staged run's key equals the shared one")
                         for s in store.subjects()}}


def _hooks(folder: Path, forbid: Path, scratch: Path, violations: Path) -> dict:
    """Dask configuration: the hook in each worker (preload) and in the processes it starts."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(HOOK)
    (folder / "forbid_writes.py").write_text(HOOK)
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {"distributed.worker.preload": [str(folder / "forbid_writes.py")],
            "distributed.nanny.environ": {"PYTHONPATH": path, "PACS2BIDS_TEST_FORBID": str(forbid),
                                          "PACS2BIDS_TEST_VIOLATIONS": str(violations),
                                          "PACS2BIDS_TEST_SCRATCH_BASE": str(scratch)}}


@pytest.mark.slow
def test_dask_workers_without_a_shared_folder_publish_what_a_shared_folder_run_does(
        tmp_path, orthanc_factory, sample_dir, prefect_harness, monkeypatch, s3):
    import dask
    from importlib import import_module

    import_module("distributed")  # its defaults enter dask's config now: leaving dask.config.set below
    #                                before they are there would drop them all, and the next Dask run would fail

    from pacs2bids.demo import sample_patients
    from pacs2bids.dicomfiles import iter_dicom_files
    from pacs2bids.flows.extract import extract_project
    from pacs2bids.validate import validate_dataset
    from test_dask import _worker_pids

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.setenv("ST_KEY", s3.access_key)
    monkeypatch.setenv("ST_SECRET", s3.secret_key)
    monkeypatch.delenv("PACS2BIDS_TASK_RUNNER", raising=False)
    monkeypatch.delenv("PACS2BIDS_SCRATCH", raising=False)
    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir))
    rows = "patient_id,subject\n" + "".join(f"{p},{n:02d}\n" for n, p in enumerate(sample_patients(sample_dir), 1))
    specs, summaries = {}, {}
    scratch, violations = tmp_path / "workers", tmp_path / "violations.log"
    for kind in ("shared", "staged"):
        folder = tmp_path / kind
        folder.mkdir()
        keys = {"staging": _staging(s3), "task_runner": "{kind: dask, dask_workers: 2}"} if kind == "staged" else {}
        path = write_spec(folder, rows, project="sample", pacs=pacs, output=str(folder / "ds"),
                          selection="{inclusions: inclusions.csv, modalities: [MR]}", **keys)
        config = _hooks(tmp_path / "hooks", folder, scratch, violations) if kind == "staged" else {}
        with dask.config.set(config):
            state = extract_project(str(path), return_state=True)
        summaries[kind] = state.result()
        assert summaries[kind]["published"] and summaries[kind]["state"] == "completed", (
            summaries[kind]["errors"], summaries[kind]["study_failures"])
        specs[kind] = load_spec(path)
    staged = specs["staged"].output
    assert not violations.exists(), violations.read_text()  # the workers never wrote under the flow's folder
    workers = _worker_pids(state.state_details.flow_run_id)
    assert len(set(workers.values())) == 2 and os.getpid() not in set(workers.values())
    roots = sorted(scratch.iterdir())  # each worker its own scratch root, left empty
    assert len(roots) == 2 and all(list(r.iterdir()) == [] for r in roots), roots
    assert validate_dataset(staged).errors == []
    shared = _files(specs["shared"].output)
    assert len([f for f in shared if f.endswith(".nii.gz")]) >= 5 and _files(staged) == shared
    assert summaries["staged"]["studies"] == summaries["shared"]["studies"] >= 5
    assert _key_store(specs["staged"]) == _key_store(specs["shared"])
    assert _left(s3) == []  # every part assembled and deleted
    assert not any((specs["staged"].resolved_work_dir / "raw").iterdir())


@pytest.mark.slow
def test_a_corrupted_part_fails_its_study_clearly_and_the_others_publish(
        tmp_path, orthanc_factory, sample_dir, prefect_harness, monkeypatch, s3):
    from pacs2bids import staging
    from pacs2bids.dicomfiles import iter_dicom_files
    from pacs2bids.flows.extract import extract_project

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.setenv("ST_KEY", s3.access_key)
    monkeypatch.setenv("ST_SECRET", s3.secret_key)
    monkeypatch.delenv("PACS2BIDS_TASK_RUNNER", raising=False)
    monkeypatch.setenv("PACS2BIDS_SCRATCH", str(tmp_path / "scratch"))
    pacs = orthanc_factory(dicomweb=False)
    for name in ("dcm_qa_philips", "dcm_qa_nih"):
        pacs.upload(iter_dicom_files(sample_dir / name))
    upload, corrupted = staging.upload_part, []

    def corrupting(remote, ctx, part, offset):  # the store changes one byte of sub-01's first image
        upload(remote, ctx, part, offset)
        if part == "sub-01":
            manifest = json.loads(remote.fs.cat_file(remote.at(f"{part}/{staging.MANIFEST}")))
            rel = next(r for r in sorted(manifest["files"]) if r.endswith(".nii.gz"))
            data = bytearray(remote.fs.cat_file(remote.at(f"{part}/{rel}")))
            data[len(data) // 2] ^= 0xFF
            remote.fs.pipe_file(remote.at(f"{part}/{rel}"), bytes(data))
            corrupted.append(rel)

    monkeypatch.setattr(staging, "upload_part", corrupting)
    stale = f"{BUCKET}/runs/stg/20200101T000000Z-stopped0/sub-09/{staging.MANIFEST}"
    s3.filesystem().pipe_file(stale, b"{}")  # left by a run stopped before assembling: the next run removes it
    path = write_spec(tmp_path, "patient_id,subject\nphantom,01\nDEV,02\n", project="stg", pacs=pacs,
                      output=str(tmp_path / "ds"), staging=_staging(s3))
    summary = extract_project(str(path))
    assert corrupted and summary["published"], summary["errors"]
    [failure] = summary["study_failures"]
    assert failure["label"] == "sub-01" and "SHA-256 differs from the manifest" in failure["reason"]
    assert corrupted[0].removeprefix("files/") in failure["reason"]
    assert "next run extracts it again" in failure["reason"]
    output = load_spec(path).output
    assert (output / "sub-02").is_dir() and not (output / "sub-01").exists()
    assert not (output / "sourcedata" / "sub-01").exists()
    assert _left(s3) == []
    assert list((tmp_path / "scratch").iterdir()) == []  # the worker's scratch went, raw files included


def test_a_part_carries_quarantine_and_key_records_encrypted_and_they_merge_as_on_one_machine(
        tmp_path, sample_dir, monkeypatch, s3):
    import pydicom

    from pacs2bids import quarantine, staging
    from pacs2bids.deid.keystore import KeyStore
    from pacs2bids.dicomfiles import iter_dicom_files
    from pacs2bids.model import StudyRef
    from pacs2bids.run import RunContext
    from pacs2bids.study import StudyResult

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.setenv("ST_KEY", s3.access_key)
    monkeypatch.setenv("ST_SECRET", s3.secret_key)
    spec = load_spec(write_spec(tmp_path, "patient_id,subject\nphantom,01\n", project="mrg", pacs=PACS,
                                output=str(tmp_path / "ds"), staging=_staging(s3)))
    ctx = RunContext(spec, "20260101T000000Z-merge000", None, tmp_path / "work-staging", {})
    for d in (ctx.quarantine, ctx.scratch, ctx.staging):
        d.mkdir(parents=True)
    clinical = next(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    patient_id = str(pydicom.dcmread(clinical, stop_before_pixels=True).PatientID)
    central = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    central.record_series("00", patient_ids=["EARLIER-PID"], patient_names=[], studies={}, identifiers=["EARLIER-PID"])
    quarantine.hold(ctx.quarantine, "q1", clinical, "earlier", subject="00", session=None, series_folder="001-a")

    staging.share_key_store(ctx, [1])  # the flow's machine, before the studies
    remote = staging._Remote(spec, ctx.run_id)
    (tmp_path / "worker").mkdir()
    local_spec, local_ctx, offset = staging._local(spec, ctx, tmp_path / "worker", remote)  # a worker
    quarantine.hold(local_ctx.quarantine, "q1", clinical, "pixels at risk", subject="01", session=None,
                    series_folder="001-b")
    KeyStore(local_spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes).record_series(
        "01", patient_ids=[patient_id], patient_names=["DOE^JANE"], studies={"1.2.3": {"study_date": "20200101"}},
        identifiers=[patient_id, "DOE^JANE"])
    written = local_ctx.staging / "sub-01" / "anat" / "sub-01_T1w.json"
    written.parent.mkdir(parents=True)
    written.write_text("{}")
    staging.upload_part(remote, local_ctx, "sub-01", offset)
    fs = s3.filesystem()
    stored = {p: fs.cat_file(p) for p in fs.find(f"{BUCKET}/runs")}
    assert any(p.endswith("sub-01/manifest.json") for p in stored)
    for p, data in stored.items():  # nothing identifying in clear on the store
        assert patient_id.encode() not in data and b"DOE^JANE" not in data, p
        assert clinical.read_bytes()[:4096] not in data

    study = StudyRef(inclusion_row=1, subject="01", session=None, study_instance_uid="1.2.3", series=[])
    [result] = staging.assemble(ctx, [study], [StudyResult("sub-01", part="s3://somewhere/sub-01")])
    assert result.retrieval.study_failures == []
    item = json.loads((ctx.quarantine / "q1-2.json").read_text())  # the id taken here: suffixed, as hold() does
    assert item["id"] == "q1-2" and item["subject"] == "01" and item["reason"] == "pixels at risk"
    assert (ctx.quarantine / "q1-2.dcm").read_bytes() == clinical.read_bytes()
    assert json.loads((ctx.quarantine / "q1.json").read_text())["reason"] == "earlier"
    assert (ctx.staging / "sub-01" / "anat" / "sub-01_T1w.json").read_text() == "{}"
    KeyStore.forget_cache()
    central = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    assert central.subjects() == ["00", "01"] and {patient_id, "DOE^JANE", "EARLIER-PID"} <= central.identifiers()
    assert central.study_dates("01") == {"20200101"}
    assert _left(s3) == []


def test_a_store_that_cannot_be_used_is_named_with_the_fix(tmp_path, monkeypatch):
    from pacs2bids import staging
    from pacs2bids.model import StudyRef
    from pacs2bids.run import RunContext

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.delenv("ST_KEY", raising=False)
    monkeypatch.setenv("ST_SECRET", "not-used")
    monkeypatch.setenv("PACS2BIDS_SCRATCH", str(tmp_path / "scratch"))
    spec = load_spec(write_spec(tmp_path, "patient_id,subject\nP1,01\n", project="bad", pacs=PACS,
                                output=str(tmp_path / "ds"), staging="{url: 's3://bucket/runs', access_key_id_env: "
                                "ST_KEY, secret_access_key_env: ST_SECRET, endpoint_url: 'http://127.0.0.1:9'}"))
    ctx = RunContext(spec, "20260101T000000Z-bad00000", None, tmp_path / "staging", {})
    with pytest.raises(staging.StagingError, match=r"staging store s3:bucket/runs cannot be used: .*ST_KEY .*is not "
                       r"set; check staging: in the spec"):
        staging.share_key_store(ctx, [1])
    study = StudyRef(inclusion_row=1, subject="01", session=None, study_instance_uid="1.2.3", series=[])
    result = staging.extract_staged(spec, study, ctx)  # on a worker: the study fails, named, nothing raised
    [failure] = result.retrieval.study_failures
    assert failure["label"] == "sub-01" and "ST_KEY" in failure["reason"] and result.part is None
    assert list((tmp_path / "scratch").iterdir()) == []


def _folder_parts(tmp_path, monkeypatch, subjects: list[str]):
    """Parts of ``subjects`` (one image each) staged on a folder store by workers of their own: returns
    the flow's run context, the studies, their results and the run's prefix on the store."""
    from pacs2bids import staging
    from pacs2bids.model import StudyRef
    from pacs2bids.run import RunContext
    from pacs2bids.study import StudyResult

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    store = tmp_path / "store"
    rows = "patient_id,subject\n" + "".join(f"P{n},{n}\n" for n in subjects)
    spec = load_spec(write_spec(tmp_path, rows, project="fld", pacs=PACS, output=str(tmp_path / "ds"),
                                staging=f"{{url: 'file://{store}'}}"))
    ctx = RunContext(spec, "20260101T000000Z-folder00", None, tmp_path / "work-staging", {})
    for d in (ctx.quarantine, ctx.scratch, ctx.staging):
        d.mkdir(parents=True, exist_ok=True)
    staging.share_key_store(ctx, [1])
    remote = staging._Remote(spec, ctx.run_id)
    studies, results = [], []
    for n in subjects:
        root = tmp_path / f"worker-{n}"
        root.mkdir()
        _, local_ctx, offset = staging._local(spec, ctx, root, remote)
        image = local_ctx.staging / f"sub-{n}" / "anat" / f"sub-{n}_T1w.nii.gz"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"image " + n.encode())
        staging.upload_part(remote, local_ctx, f"sub-{n}", offset)
        studies.append(StudyRef(inclusion_row=int(n), subject=n, session=None, study_instance_uid=f"1.2.{n}",
                                series=[]))
        results.append(StudyResult(f"sub-{n}", part=f"file://{store}/sub-{n}"))
    return ctx, studies, results, store / "fld" / ctx.run_id


def test_a_part_missing_a_file_or_its_manifest_fails_its_study_on_a_folder_store(tmp_path, monkeypatch):
    from pacs2bids import staging

    ctx, studies, results, part = _folder_parts(tmp_path, monkeypatch, ["01", "02", "03"])
    (part / "sub-01" / "files" / "sub-01" / "anat" / "sub-01_T1w.nii.gz").unlink()
    (part / "sub-02" / staging.MANIFEST).unlink()  # an upload stopped before its end
    out = staging.assemble(ctx, studies, results)
    assert "sub-01_T1w.nii.gz" in out[0].retrieval.study_failures[0]["reason"]
    assert "its manifest is missing" in out[1].retrieval.study_failures[0]["reason"]
    assert out[2] is results[2] and (ctx.staging / "sub-03" / "anat" / "sub-03_T1w.nii.gz").read_bytes() == b"image 03"
    assert not (ctx.staging / "sub-01").exists() and not (ctx.staging / "sub-02").exists()
    assert not part.exists()


def test_a_session_converted_again_replaces_its_earlier_conversion_in_staging(tmp_path, monkeypatch):
    from pacs2bids import staging

    earlier = tmp_path / "work-staging"  # seeded from the published dataset: an earlier conversion of sub-01
    (earlier / "sub-01" / "anat").mkdir(parents=True)
    (earlier / "sub-01" / "anat" / "sub-01_acq-old_T1w.nii.gz").write_bytes(b"old")
    (earlier / "sub-01" / "sub-01_scans.tsv").write_text("filename\tacq_time\nanat/sub-01_acq-old_T1w.nii.gz\tn/a\n")
    (earlier / "sourcedata" / "sub-01").mkdir(parents=True)
    (earlier / "sourcedata" / "sub-01" / "kept.dcm").write_bytes(b"dicom")  # never cleared (as on one machine)
    ctx, studies, results, _ = _folder_parts(tmp_path, monkeypatch, ["01"])
    assert staging.assemble(ctx, studies, results) == results
    anat = sorted(p.name for p in (ctx.staging / "sub-01" / "anat").iterdir())
    assert anat == ["sub-01_T1w.nii.gz"] and not (ctx.staging / "sub-01" / "sub-01_scans.tsv").exists()
    assert (ctx.staging / "sourcedata" / "sub-01" / "kept.dcm").read_bytes() == b"dicom"
