"""End to end: a real Orthanc loaded with real DICOM carrying planted identities, one
``extract_project`` run, then the published dataset is checked: bids-validator passes, every
image equals a direct dcm2niix conversion of its original series, and no planted identifier
or original UID appears in any output file, file name, Prefect log or lineage record.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs2bids.dicomfiles import iter_dicom_bytes
from pacs2bids.lineage import read_instances, read_lineage
from pacs2bids.validate import validate_dataset

SECRET = "e2e-secret-0123456789abcdef"
DCM2NIIX = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or "dcm2niix"


# -- planting identities into copies of real files ------------------------------------------
def plant_corpus(src_root: Path, dst: Path, *, groups_at_depth: int = 1) -> dict:
    """Copy every DICOM file under ``src_root`` (gz included) into ``dst``, giving each source
    folder at ``groups_at_depth`` its own planted patient. Returns the planted values and the
    original UIDs, per patient."""
    patients: dict[str, dict] = {}
    originals: set[str] = set()
    by_series: dict[str, list[Path]] = defaultdict(list)
    dst.mkdir(parents=True, exist_ok=True)
    for n, (path, data) in enumerate(iter_dicom_bytes(src_root)):
        group = path.relative_to(src_root).parts[: groups_at_depth][0]
        if group not in patients:
            k = len(patients) + 1
            patients[group] = {
                "patient_id": f"HOSP{k:04d}PLANT",
                "name": f"DUPLANTE^JEANNE{k}",
                "birth": f"197{k}0523",
                "accession": f"ACCPLANT{k:05d}",
                "institution": f"Hopital Plantevin {k}",
                "address": f"{k} rue des Secrets Plantes",
                "physician": f"MEDECIN^PLANTE{k}",
                "station": f"STATPLANT{k}",
                "subject": f"{k:02d}",
            }
        p = patients[group]
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True)
        if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            continue  # not a composite instance (a DICOMDIR, say)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if kw in ds:
                originals.add(str(ds.data_element(kw).value))
        ds.PatientID = p["patient_id"]
        ds.PatientName = p["name"]
        ds.PatientBirthDate = p["birth"]
        ds.AccessionNumber = p["accession"]
        ds.InstitutionName = p["institution"]
        ds.InstitutionAddress = p["address"]
        ds.ReferringPhysicianName = p["physician"]
        ds.PerformingPhysicianName = p["physician"]
        ds.StationName = p["station"]
        ds.StudyDescription = f"IRM cerebrale {p['name'].split('^')[0]}"
        # nested: a request attributes item holding the accession number and the patient's name
        item = Dataset()
        item.AccessionNumber = p["accession"]
        item.RequestedProcedureDescription = f"demande pour {p['name']}"
        ds.RequestAttributesSequence = Sequence([item])
        # a private block of an unknown creator holding the patient ID
        block = ds.private_block(0x0011, "PLANTED HOSPITAL RIS", create=True)
        block.add_new(0x01, "LO", p["patient_id"])
        out = dst / group / f"{n:05d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=False)
        by_series[str(ds.SeriesInstanceUID)].append(out)
    return {"patients": patients, "original_uids": originals, "by_series": by_series}


def identifying_values(planted: dict) -> set[str]:
    values = set(planted["original_uids"])
    for p in planted["patients"].values():
        values |= {p["patient_id"], p["accession"], p["institution"], p["address"], p["station"], p["birth"]}
        values |= {p["name"], p["name"].replace("^", " "), p["name"].split("^")[0], p["physician"].split("^")[1]}
    return values


def assert_nothing_leaks(root: Path, values: set[str], extra_texts: dict[str, str] = {}) -> None:
    needles = sorted({v.lower().encode() for v in values if len(v) >= 6}, key=len, reverse=True)
    leaks = []
    for f in sorted(root.rglob("*")):
        name = f.relative_to(root).as_posix().lower().encode()
        leaks += [(str(f), "path", n) for n in needles if n in name]
        if f.is_file():
            data = f.read_bytes()
            if f.suffix == ".gz":
                data = gzip.decompress(data)
            low = data.lower()
            leaks += [(str(f), "content", n) for n in needles if n in low]
    for label, text in extra_texts.items():
        low = text.lower().encode()
        leaks += [(label, "text", n) for n in needles if n in low]
    assert not leaks, f"identifying values found: {leaks[:10]}"


def voxels(img) -> np.ndarray:
    """Stored voxels with their scaling (RGB images cannot be scaled as floats)."""
    slope, inter = img.dataobj.slope, img.dataobj.inter
    raw = np.asanyarray(img.dataobj.get_unscaled())
    if raw.dtype.names:  # RGB: compare the stored triplets
        return raw
    return raw * slope + inter


# -- a direct dcm2niix conversion of every original series ------------------------------------
def reference_images(by_series: dict[str, list[Path]], tmp: Path) -> list[tuple[np.ndarray, np.ndarray, Path]]:
    refs = []
    for i, files in enumerate(by_series.values()):
        src, out = tmp / f"in{i}", tmp / f"out{i}"
        src.mkdir(parents=True)
        out.mkdir()
        for f in files:
            (src / f.name).symlink_to(f)
        subprocess.run([DCM2NIIX, "-b", "y", "-z", "n", "-f", "%s_%e", "-o", str(out), str(src)],
                       check=False, capture_output=True)  # non-image series give no reference
        for nii in out.glob("*.nii"):
            img = nib.load(nii)
            refs.append((voxels(img), img.affine, nii))
    return refs


def assert_voxels_match_references(dataset: Path, refs) -> int:
    images = [p for p in dataset.glob("sub-*/**/*.nii*")]
    assert images, "no image converted"
    for img_path in images:
        img = nib.load(img_path)
        data = voxels(img)
        matches = [
            r for r in refs
            if r[0].shape == data.shape and np.allclose(r[1], img.affine, atol=1e-4) and np.array_equal(r[0], data)
        ]
        if not matches and data.ndim == 4:
            # a time series stored as one series per volume (Siemens XA "MFSPLIT") is merged into one
            # run: each volume must then equal the direct conversion of its own series
            vols = [
                [r for r in refs if r[0].shape == data.shape[:3] and np.allclose(r[1], img.affine, atol=1e-4)
                 and np.array_equal(r[0], data[..., t])]
                for t in range(data.shape[3])
            ]
            if all(vols):
                continue
        assert matches, f"{img_path.relative_to(dataset)} equals no direct dcm2niix conversion of an original series"
        ref_nii = matches[0][2]
        for ext in (".bval", ".bvec"):
            mine = Path(str(img_path).replace(".nii.gz", ext).replace(".nii", ext))
            theirs = ref_nii.with_suffix(ext)
            assert mine.exists() == theirs.exists(), f"{ext} present in one conversion only for {img_path.name}"
            if mine.exists():
                a, b = np.loadtxt(mine, ndmin=2), np.loadtxt(theirs, ndmin=2)
                assert np.allclose(a, b, atol=1e-5), f"{mine.name} differs from dcm2niix"
    return len(images)


def write_spec(tmp: Path, pacs_block: str, planted: dict, output: Path, extra_rows: str = "") -> Path:
    rows = ["patient_id,subject"] + [f"{p['patient_id']},{p['subject']}" for p in planted["patients"].values()]
    (tmp / "inclusions.csv").write_text("\n".join(rows) + "\n" + extra_rows)
    spec = tmp / "spec.yaml"
    spec.write_text(
        "project: e2e-test\n"
        f"pacs:\n{pacs_block}"
        "selection:\n  inclusions: inclusions.csv\n  modalities: [MR]\n"
        "pseudonymization: {secret_env: PACS2BIDS_PROJECT_SECRET}\n"
        "heuristic: auto\n"
        f"output: {output}\n"
        "retries: {attempts: 1, backoff_seconds: 0.2}\n"
    )
    return spec


def prefect_logs_text() -> str:
    from prefect.client.orchestration import get_client

    async def read():
        messages, offset = [], 0
        async with get_client() as client:
            while True:
                page = await client.read_logs(limit=200, offset=offset)
                messages += [log.message for log in page]
                if len(page) < 200:
                    return "\n".join(messages)
                offset += 200

    return asyncio.run(read())


def prefect_artifacts_text() -> str:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return "\n".join(f"{a.key} {a.description} {a.data}" for a in await client.read_artifacts())

    return asyncio.run(read())


def run_progress_artifacts(run_id: str) -> list:
    """The progress artifacts of one run, under the project's key (the e2e spec's project)."""
    from prefect.client.orchestration import get_client

    from pacs2bids.tasks.progress import progress_key

    async def read():
        async with get_client() as client:
            return await client.read_artifacts()

    return [a for a in asyncio.run(read()) if a.key == progress_key("e2e-test")
            and (a.description or "").startswith(f"pacs2bids run {run_id}:")]


def run_extraction(spec: Path, monkeypatch):
    from pacs2bids.flows.extract import extract_project

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", SECRET)
    monkeypatch.setenv("NIPYPE_NO_ET", "1")
    return extract_project(str(spec))


def received_sha256s(pacs, spec: Path | None, tmp: Path) -> dict[str, str]:
    """Original SOPInstanceUID -> SHA-256 of the file as the run's transport delivers it: the
    PACS's own file for WADO-RS (served as stored); for C-GET and C-MOVE, whose File Meta
    Information pynetdicom writes, the file a fresh retrieval with the same spec receives."""
    import hashlib

    import requests

    from pacs2bids.pacs import close_pools
    from pacs2bids.config import load_spec
    from pacs2bids.query import find_studies
    from pacs2bids.retrieve import retrieve_study

    loaded = load_spec(spec, environ={"PACS2BIDS_PROJECT_SECRET": SECRET})
    out = {}
    if loaded.pacs.chosen == "dicomweb":
        for iid in pacs.get("/instances"):
            data = requests.get(f"{pacs.url}/instances/{iid}/file", timeout=60).content
            sop = str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True).SOPInstanceUID)
            out[sop] = hashlib.sha256(data).hexdigest()
        return out
    raw = tmp / "again-raw"
    try:
        for study in find_studies(loaded).studies:
            retrieve_study(loaded, study, raw)
    finally:
        close_pools()
    for f in raw.rglob("*.dcm"):
        out[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def check_instance_lineage(out: Path, pacs, spec: Path, tmp: Path) -> list[dict]:
    """Every published sourcedata DICOM has exactly one instance row, whose checksum is the
    file's; its received checksum is keyed: HMAC(project key, SHA-256 of the received file),
    never the plain SHA-256. Returns the rows."""
    import hashlib
    import hmac

    from pacs2bids.config import load_spec
    from pacs2bids.deid.keyed import Keyed, derive_key

    rows = read_instances(out).to_pylist()
    files = sorted(f.relative_to(out).as_posix() for f in (out / "sourcedata").rglob("*.dcm"))
    assert files and sorted(r["path"] for r in rows) == files  # exactly one row each, no row without file
    project = load_spec(spec, environ={"PACS2BIDS_PROJECT_SECRET": SECRET}).project
    keyed, key = Keyed(SECRET.encode(), project), derive_key(SECRET.encode(), project, "received-sha256")
    received = {keyed.uid(sop): sha for sop, sha in received_sha256s(pacs, spec, tmp).items()}
    for r in rows:
        f = out / r["path"]
        assert r["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and r["size"] == f.stat().st_size
        assert str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) == r["pseudo_sop_instance_uid"]
        plain = received[r["pseudo_sop_instance_uid"]]
        assert r["received_sha256_hmac"] == hmac.new(key, bytes.fromhex(plain), hashlib.sha256).hexdigest()
        assert r["transport"] in ("c-get", "c-move", "wado-rs")
    text = json.dumps(rows, default=str)
    assert not [sha for sha in received.values() if sha in text]  # no plain checksum of a clinical file
    return rows


def check_published(out: Path, planted: dict, tmp: Path, summary: dict, pacs=None, spec: Path | None = None) -> None:
    report = validate_dataset(out)
    assert report.ok, report.errors
    refs = reference_images(planted["by_series"], tmp / "refs")
    n = assert_voxels_match_references(out, refs)
    assert n >= 1
    lineage = read_lineage(out)
    assert lineage.num_rows >= n
    instances = check_instance_lineage(out, pacs, spec, tmp) if pacs is not None else read_instances(out).to_pylist()
    assert instances
    assert_nothing_leaks(
        out,
        identifying_values(planted),
        {"summary": json.dumps(summary), "lineage": json.dumps(lineage.to_pylist(), default=str),
         "instance lineage": json.dumps(instances, default=str), "prefect logs": prefect_logs_text(),
         "prefect artifacts": prefect_artifacts_text()},
    )
    for sidecar in out.glob("sub-*/**/*.json"):  # the de-identification travels into every sidecar
        meta = json.loads(sidecar.read_text())
        codes = {c.get("CodeValue") for c in meta.get("DeidentificationMethodCodeSequence", [])}
        # Basic profile, Retain Longitudinal with Modified Dates, Clean Descriptors, Retain Safe Private
        assert {"113100", "113107", "113105", "113111"} <= codes, (sidecar.name, codes)
        assert "pacs2bids" in json.dumps(meta.get("DeidentificationMethod")), sidecar.name
    provenance = list((out / "prov").rglob("prov-series*.jsonld"))  # W3C PROV records (tests/test_provenance.py)
    assert provenance, "no PROV record"
    prov = json.loads(provenance[0].read_text())
    text = json.dumps(prov)
    assert "dcm2niix" in text and "pseudonymise" in text and "sha256" in text


# -- the tests ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sample_end_to_end_c_get(prefect_harness, orthanc_factory, sample_dir, tmp_path, monkeypatch):
    planted = plant_corpus(sample_dir, tmp_path / "planted")
    pacs = orthanc_factory()
    assert pacs.upload(f for files in planted["by_series"].values() for f in files) > 0
    out = tmp_path / "out" / "dataset"
    spec = write_spec(
        tmp_path,
        f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs.dicom_port}, retrieve: c-get}}\n",
        planted,
        out,
        extra_rows="NOBODY-HERE,99\n",
    )
    summary = run_extraction(spec, monkeypatch)
    assert summary["published"] and out.is_dir()
    assert summary["counts"]["subjects"] == len(planted["patients"])
    assert summary["counts"]["series_converted"] >= 5
    assert {"row": len(planted["patients"]) + 2, "subject": "99"} in summary["unmatched"]
    check_published(out, planted, tmp_path, summary, pacs, spec)
    # `pacs2bids lineage` on a sourcedata file shows its instance row; on an image, its sources
    row = read_instances(out).to_pylist()[0]
    shown = subprocess.run([sys.executable, "-m", "pacs2bids.cli", "lineage", str(out / row["path"])],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert row["pseudo_sop_instance_uid"] in shown.stdout and row["received_sha256_hmac"] in shown.stdout
    assert "c-get" in shown.stdout
    image = next(out.glob("sub-*/**/*.nii.gz"))
    shown = subprocess.run([sys.executable, "-m", "pacs2bids.cli", "lineage", str(image)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "pseudonymised DICOM instance(s) in sourcedata/" in shown.stdout, shown.stdout
    # the clinical copy does not outlive the run
    work = out.parent / f".{out.name}.pacs2bids-work"
    assert not [f for f in (work / "raw").rglob("*") if f.is_file()]
    assert [f.name for f in (work / "raw").iterdir()] == [".incoming"]  # no emptied study folders either
    assert (out / "sourcedata").is_dir() and list((out / "sourcedata").rglob("*.dcm"))
    assert f"pacs2bids run {summary['run_id']}" in prefect_artifacts_text()  # the UI's copy of the summary
    # the UI's progress: one artifact, at 100 once every study is done, counts only in its text
    (bar,) = run_progress_artifacts(summary["run_id"])
    n = summary["studies"]
    assert bar.type == "progress" and bar.data == 100, (bar.type, bar.data)
    assert f"studies {n}/{n}" in bar.description and bar.description.endswith("· done"), bar.description
    # per-stage timings for the benchmarks, in the summary the work folder keeps
    stages = ["query", "retrieve", "pseudonymise", "convert", "released", "finalise", "validate", "lineage",
              "leak_scan", "publish", "qc", "qc_per_session"]
    kept = json.loads((work / "runs" / f"run-{summary['run_id']}.json").read_text())
    assert sorted(kept["stage_seconds"]) == sorted(stages) and all(v >= 0 for v in kept["stage_seconds"].values())
    assert kept["stage_seconds"]["convert"] > 0 and not (out / ".pacs2bids" / "instance-parts").exists()
    # the protocol QC of every session is published with the dataset (no protocol declared: indices only)
    qc = json.loads(next((out / "derivatives" / "pacs2bids-qc").rglob("sub-*_qc.json")).read_text())
    assert qc["Status"] == "no protocol" and qc["Images"] and (out / "derivatives/pacs2bids-qc/index.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["c-move", "dicomweb"])
def test_other_transports_end_to_end(prefect_harness, orthanc_factory, sample_dir, tmp_path, monkeypatch, transport):
    from pacs2bids.orthanc import free_port

    planted = plant_corpus(sample_dir / "dcm_qa_philips", tmp_path / "planted")
    storage_port = free_port()
    pacs = orthanc_factory(modalities={"PACS2BIDS": ("127.0.0.1", storage_port)})
    pacs.upload(f for files in planted["by_series"].values() for f in files)
    out = tmp_path / "out"
    if transport == "dicomweb":
        block = f"  dicomweb: {{url: {pacs.dicomweb_url}}}\n"
    else:
        block = (f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs.dicom_port}, retrieve: c-move, "
                 f"calling_ae_title: PACS2BIDS, storage_port: {storage_port}}}\n")
    spec = write_spec(tmp_path, block, planted, out)
    summary = run_extraction(spec, monkeypatch)
    assert summary["state"] == "completed", summary
    check_published(out, planted, tmp_path, summary, pacs, spec)
    rows = read_instances(out).to_pylist()
    assert {r["transport"] for r in rows} == {"wado-rs" if transport == "dicomweb" else "c-move"}


@pytest.mark.slow
def test_unreachable_pacs_writes_nothing(prefect_harness, tmp_path, monkeypatch, sample_dir):
    from pacs2bids.flows.extract import RunFailed
    from pacs2bids.orthanc import free_port

    planted = {"patients": {"a": {"patient_id": "HOSP0001", "subject": "01"}}}
    port = free_port()
    out = tmp_path / "out"
    spec = write_spec(
        tmp_path,
        f"  dimse: {{ae_title: NOSUCHPACS, host: 127.0.0.1, port: {port}, calling_ae_title: ME, retrieve: c-get,"
        " timeout: 3}\n",
        planted,
        out,
    )
    with pytest.raises(RunFailed) as err:
        run_extraction(spec, monkeypatch)
    message = str(err.value)
    assert str(port) in message and "127.0.0.1" in message and "NOSUCHPACS" in message and "ME" in message
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.corpus
def test_corpus_end_to_end(prefect_harness, orthanc_factory, corpus_dir, tmp_path, monkeypatch):
    """The fuller multi-vendor corpus: every vendor folder becomes a patient."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for folder in corpus_dir.iterdir():
        if folder.is_dir():
            (corpus / folder.name).symlink_to(folder)
    planted = plant_corpus(corpus, tmp_path / "planted")
    pacs = orthanc_factory()
    pacs.upload(f for files in planted["by_series"].values() for f in files)
    out = tmp_path / "out"
    block = f"  dicomweb: {{url: {pacs.dicomweb_url}}}\n"
    spec = write_spec(tmp_path, block, planted, out)
    summary = run_extraction(spec, monkeypatch)
    assert summary["published"], summary
    check_published(out, planted, tmp_path, summary, pacs, spec)
    # dcm_qa_ts holds one image in nine transfer syntaxes under one SeriesInstanceUID: dcm2niix
    # splits it into images BIDS cannot name, so that series alone fails, with its reason
    failed = [s for s in summary["series"] if s["status"] == "failed"]
    assert summary["state"] == "completed with failures"
    assert len(failed) == 1 and "split this series into 9 images" in failed[0]["reason"], failed
