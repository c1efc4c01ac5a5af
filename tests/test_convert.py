"""convert_session on the shipped sample and the real corpus: BIDS names, validity, voxel identity."""

from __future__ import annotations


import json
import os
import sys
from pathlib import Path

import pytest

from _bidscheck import assert_same_images, copy_decompressed, direct_dcm2niix, files_by_series
from pacs2bids.bids import finalise_dataset
from pacs2bids.convert import ConversionResult, convert_session, is_image_sop_class
from pacs2bids.errors import ConversionError
from pacs2bids.validate import validate_dataset

SAMPLE_SESSIONS = {"PACSMAN_data": "pacsman", "dcm_qa_fmap": "gefmap", "dcm_qa_ge": "gedwi",
                   "dcm_qa_nih": "nih", "dcm_qa_philips": "philips"}


@pytest.fixture(scope="module")
def sample_bids(sample_dir, tmp_path_factory):
    """The sample converted through convert_session (one session per study) and finalised."""
    root = tmp_path_factory.mktemp("bids")
    work = tmp_path_factory.mktemp("work")
    results: dict[str, ConversionResult] = {}
    for folder, ses in SAMPLE_SESSIONS.items():
        results[ses] = convert_session(sample_dir / folder, root, subject="01", session=ses,
                                       heuristic="auto", work_dir=work)
    finalise_dataset(root, name="pacs2bids sample", participants=["01"], generated_by={"Name": "pacs2bids"})
    return root, results


def test_sample_names(sample_bids):
    root, results = sample_bids
    names = {Path(o).name for r in results.values() for s in r.series for o in s.outputs}
    expected = {
        "sub-01_ses-gefmap_fieldmap.nii.gz", "sub-01_ses-gefmap_magnitude.nii.gz",
        "sub-01_ses-gedwi_dwi.nii.gz", "sub-01_ses-gedwi_dwi.bval", "sub-01_ses-gedwi_dwi.bvec",
        "sub-01_ses-nih_dir-AP_epi.nii.gz", "sub-01_ses-nih_dir-PA_epi.nii.gz",
        "sub-01_ses-nih_dir-RL_epi.nii.gz", "sub-01_ses-nih_dir-LR_epi.nii.gz",
        "sub-01_ses-philips_task-unknown_bold.nii.gz",
    }
    assert expected <= names
    for ses, r in results.items():
        for s in r.series:
            assert s.status == ("skipped" if ses == "pacsman" else "converted"), s
            for o in s.outputs:
                assert (root / o).is_file()
    # PACSMAN has no SeriesNumber and no sequence parameters: reported, with its reason, not guessed
    (pacsman,) = results["pacsman"].series
    assert pacsman.series_number is None and not pacsman.outputs and "contrast unknown" in pacsman.reason
    fmap = json.loads((root / "sub-01/ses-gefmap/fmap/sub-01_ses-gefmap_fieldmap.json").read_text())
    assert fmap.get("Units") == "Hz"
    scans = (root / "sub-01/ses-gefmap/sub-01_ses-gefmap_scans.tsv").read_text()
    assert "fmap/sub-01_ses-gefmap_fieldmap.nii.gz" in scans and "fieldmap1" not in scans


def test_sample_is_valid_bids(sample_bids):
    root, _ = sample_bids
    report = validate_dataset(root)
    assert report.ok, report.summary()
    assert not (root / ".heudiconv").exists()
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["GeneratedBy"][0]["Name"] == "pacs2bids"
    assert not list(root.glob("task-*_bold.json"))  # heudiconv's TODO templates are gone


def test_sample_voxel_identity(sample_bids, sample_dir, tmp_path):
    root, results = sample_bids
    checked = 0
    for folder, ses in SAMPLE_SESSIONS.items():
        by_uid = files_by_series(sample_dir / folder)
        for s in results[ses].series:
            if s.status == "skipped":
                continue
            direct = direct_dcm2niix(by_uid[s.series_uid], tmp_path / s.series_uid)
            assert_same_images(root, s.outputs, direct)
            checked += 1
    # every converted series of the sample was compared (GE field map, GE DWI, 4 NIH EPI, Philips EPI)
    assert checked == 7, checked


def test_second_run_is_identical(sample_dir, tmp_path):
    root = tmp_path / "bids"
    first = convert_session(sample_dir / "dcm_qa_ge", root, subject="02", session=None, heuristic="auto",
                            work_dir=tmp_path / "w")
    before = {p: p.read_bytes() for p in root.rglob("*.nii.gz")}
    second = convert_session(sample_dir / "dcm_qa_ge", root, subject="02", session=None, heuristic="auto",
                             work_dir=tmp_path / "w")
    assert [s.outputs for s in first.series] == [s.outputs for s in second.series]
    assert {p: p.read_bytes() for p in root.rglob("*.nii.gz")} == before


def test_failing_heuristic_raises_with_stderr_tail(sample_dir, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def infotodict(seqinfo):\n    raise RuntimeError('heuristic exploded on purpose')\n")
    with pytest.raises(ConversionError, match="heuristic exploded on purpose") as err:
        convert_session(sample_dir / "dcm_qa_ge", tmp_path / "bids", subject="01", session=None,
                        heuristic=str(bad), work_dir=tmp_path / "w")
    # the log stays with the run's records (not in the scratch folder deleted at the end of a run)
    kept = tmp_path / "bids" / ".pacs2bids" / "logs" / "heudiconv-sub-01.log"
    assert ".pacs2bids/logs/heudiconv-sub-01.log" in str(err.value)
    assert "heuristic exploded on purpose" in kept.read_text()


# A project's own heudiconv heuristic (heudiconv's format stays the interface for those)
PROJECT_HEURISTIC = """
def create_key(template, outtype=("nii.gz",), annotation_classes=None):
    return template, outtype, annotation_classes


def infotodict(seqinfo):
    dwi = create_key("{bids_subject_session_dir}/dwi/{bids_subject_session_prefix}_acq-project_dwi")
    info = {dwi: []}
    for s in seqinfo:
        if "DWI" in s.series_description:
            info[dwi].append(s.series_id)
    return info
"""


def test_project_heudiconv_heuristic(sample_dir, tmp_path):
    """A heudiconv heuristic file still goes through heudiconv; heudiconv works in a folder of
    its own and only the session's files reach the dataset (sessions converted in parallel no
    longer share heudiconv's top-level files and tables: the intermittent gre_field_magph failure)."""
    heur = tmp_path / "project.py"
    heur.write_text(PROJECT_HEURISTIC)
    root = tmp_path / "bids"
    (root).mkdir()
    (root / "participants.tsv").write_text("not a table heudiconv wrote\n")
    # another session's sidecar, half written at that moment (heudiconv reads every *_bold.json of
    # the dataset at the end of its run, and failed after 10 s of retries on such a file)
    other = root / "sub-99" / "func" / "sub-99_task-rest_bold.json"
    other.parent.mkdir(parents=True)
    other.write_text('{"RepetitionTime": 2.0, "Task')
    result = convert_session(sample_dir / "dcm_qa_ge", root, subject="01", session="p", heuristic=str(heur),
                             work_dir=tmp_path / "w")
    (s,) = result.series
    assert s.status == "converted"
    assert "sub-01/ses-p/dwi/sub-01_ses-p_acq-project_dwi.nii.gz" in s.outputs
    assert sorted(p.name for p in root.iterdir()) == ["participants.tsv", "sub-01", "sub-99"]
    assert (root / "participants.tsv").read_text() == "not a table heudiconv wrote\n"
    assert other.read_text() == '{"RepetitionTime": 2.0, "Task' and not list(other.parent.glob("*events*"))
    assert (root / "sub-01/ses-p/sub-01_ses-p_scans.tsv").is_file()
    assert not list((tmp_path / "w").iterdir())


def test_sop_class_filter():
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.4")  # MR
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.4.1")  # Enhanced MR
    assert not is_image_sop_class("1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
    assert not is_image_sop_class("1.2.840.10008.5.1.4.1.1.11.1")  # GSPS
    assert not is_image_sop_class("1.3.46.670589.11.0.0.12.4")  # Philips private


CORPUS_SESSIONS = [
    ("dcm_qa_xa30i", "xa30", {"T1w", "bold", "dwi", "magnitude1", "magnitude2", "phasediff"}),
    ("dcm_qa_fmap/In/Siemens", "sie11fmap", {"magnitude1", "magnitude2", "phasediff"}),
    ("dcm_qa_fmap/In/Philips", "phfmap", {"fieldmap", "magnitude"}),
    ("dcm_qa_nih/In/20180918GE", "gebold", {"bold"}),
    ("dcm_qa_philips_dwi", "phdwi", {"dwi"}),
]


@pytest.mark.corpus
@pytest.mark.slow
@pytest.mark.parametrize("folder,ses,suffixes", CORPUS_SESSIONS, ids=[c[1] for c in CORPUS_SESSIONS])
def test_corpus_conversion(corpus_dir, tmp_path, folder, ses, suffixes):
    src = copy_decompressed(corpus_dir / folder, tmp_path / "dicom")
    root = tmp_path / "bids"
    result = convert_session(src, root, subject="c1", session=ses, heuristic="auto", work_dir=tmp_path / "w")
    got = {Path(o).name.split(".")[0].rsplit("_", 1)[-1] for s in result.series for o in s.outputs}
    assert suffixes <= got, (got, [(s.series_description, s.status, s.reason) for s in result.series])
    by_uid = files_by_series(src)
    checked = set()
    for s in result.series:
        if s.status != "converted":
            assert s.reason
            continue
        if tuple(s.outputs) in checked:
            continue
        checked.add(tuple(s.outputs))
        uids = [x.series_uid for x in result.series if x.outputs == s.outputs]
        files = [f for u in uids for f in by_uid[u]]
        direct = direct_dcm2niix(files, tmp_path / "direct" / s.series_uid)
        assert_same_images(root, s.outputs, direct)
    finalise_dataset(root, name="corpus", participants=["c1"], generated_by={})
    report = validate_dataset(root)
    assert report.ok, report.summary()


@pytest.mark.corpus
def test_xa30_non_image_and_scouts_reported(corpus_dir, tmp_path):
    src = tmp_path / "dicom"
    for sub in ("99_Phoenix_Document", "2001_AAHead_Scout"):
        copy_decompressed(corpus_dir / "dcm_qa_xa30i" / "In" / sub, src / sub)
    result = convert_session(src, tmp_path / "bids", subject="c1", session=None, heuristic="auto",
                             work_dir=tmp_path / "w")
    by_desc = {s.series_description: s for s in result.series}
    assert by_desc["PhoenixZIPReport"].status == "skipped" and "non-image" in by_desc["PhoenixZIPReport"].reason
    scout = by_desc["AAHead_Scout_MPR_sag"]
    assert scout.status == "skipped" and "derived" in scout.reason


@pytest.mark.corpus
def test_series_split_by_dcm2niix_is_failed_and_removed(corpus_dir, tmp_path):
    """dcm_qa_ts: one image in nine transfer syntaxes under one SeriesInstanceUID. dcm2niix
    writes _bold1 ... _bold9, names BIDS refuses: the series is failed with the reason and
    nothing of it stays (no file, no scans.tsv row, no empty subject folder)."""
    result = convert_session(corpus_dir / "dcm_qa_ts" / "In", tmp_path / "bids", subject="ts", session=None,
                             heuristic="auto", work_dir=tmp_path / "w")
    (series,) = result.series
    assert series.status == "failed" and "split this series into 9 images" in series.reason
    assert series.outputs == [] and not (tmp_path / "bids" / "sub-ts").exists()


def test_split_check_accepts_numbered_field_map_echoes(tmp_path):
    from pacs2bids.convert.heudiconv import _split_outputs

    fmap = tmp_path / "sub-01" / "fmap"
    fmap.mkdir(parents=True)
    mags = [fmap / f"sub-01_magnitude{n}{ext}" for n in (1, 2) for ext in (".nii.gz", ".json")]
    bolds = [tmp_path / f"sub-01_task-x_bold{n}.nii.gz" for n in (1, 2, 3)]
    assert _split_outputs(mags, "sub-01/fmap/sub-01_magnitude") == 0
    assert _split_outputs(bolds, "sub-01/func/sub-01_task-x_bold") == 3


def test_split_check_keeps_other_series_of_the_session(sample_dir, corpus_dir, tmp_path):
    import shutil

    import pydicom

    src = tmp_path / "dicom"
    shutil.copytree(sample_dir / "dcm_qa_nih" / "In", src / "nih")
    study = pydicom.dcmread(next((src / "nih").rglob("*.dcm"))).StudyInstanceUID
    (src / "ts").mkdir()
    for f in (corpus_dir / "dcm_qa_ts" / "In").glob("*.dcm"):  # one session: the split series joins the nih study
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study
        ds.save_as(src / "ts" / f.name)
    result = convert_session(src, tmp_path / "bids", subject="ts", session=None, heuristic="auto",
                             work_dir=tmp_path / "w")
    status = sorted(s.status for s in result.series)
    assert status.count("failed") == 1 and status.count("converted") >= 2, result.series
    kept = [o for s in result.series for o in s.outputs]
    assert kept and all((tmp_path / "bids" / o).exists() for o in kept)
    scans = (tmp_path / "bids" / "sub-ts" / "sub-ts_scans.tsv").read_text()
    assert "bold1" not in scans and all(o.split("/", 1)[1] in scans for o in kept if o.endswith(".nii.gz"))


def test_series_provenance(sample_bids, tmp_path):
    from datetime import datetime, timezone

    from pacs2bids.checksum import sha256_file
    from pacs2bids.bids.provenance import write_series_provenance
    from pacs2bids.versions import tool_versions

    root, results = sample_bids
    s = results["gedwi"].series[0]
    now = datetime.now(timezone.utc)
    path = write_series_provenance(tmp_path / "prov" / "series.json", pseudo_study_uid="2.25.1", pseudo_series_uid="2.25.2",
                                   instance_count=14, outputs=[Path(o) for o in s.outputs], bids_root=root,
                                   heuristic="auto", flow_run_id="run-1", started=now, finished=now, extra={"k": 1})
    rec = json.loads(path.read_text())["Records"]  # W3C PROV (tests/test_provenance.py)
    files = [e for e in rec["Entities"] if e["Id"].startswith("bids::")]
    assert {e["AtLocation"] for e in files} == set(s.outputs)
    for e in files:
        assert e["Digest"]["sha256"] == sha256_file(root / e["AtLocation"])
    dcm2niix = next(sw for sw in rec["Software"] if sw["Label"] == "dcm2niix")
    assert dcm2niix["Version"] == tool_versions()["dcm2niix"] and dcm2niix["Version"].startswith("v1.0.")
    convert = next(a for a in rec["Activities"] if a["Label"] == "convert")
    assert len(convert["Parameters"]["heuristic_sha256"]) == 64 and convert["Parameters"]["k"] == 1
    assert next(e for e in rec["Entities"] if e["Id"] == "urn:dicom:uid:2.25.2")["InstanceCount"] == 14


# -- heuristic auto: dcm2niix once per session ----------------------------------------------------
def test_auto_writes_only_the_session_and_its_scans(sample_dir, tmp_path):
    """No heudiconv: nothing but the session's files (no .heudiconv tables, no TODO templates),
    and a scans.tsv whose rows are the session's images with a BIDS datetime or n/a."""
    import re

    root = tmp_path / "bids"
    result = convert_session(sample_dir / "dcm_qa_nih", root, subject="01", session="a", heuristic="auto",
                             work_dir=tmp_path / "w")
    assert sorted(p.name for p in root.iterdir()) == ["sub-01"]
    images = sorted(o.split("/", 2)[2] for s in result.series for o in s.outputs if o.endswith(".nii.gz"))
    assert len(images) == 4
    lines = (root / "sub-01/ses-a/sub-01_ses-a_scans.tsv").read_text().splitlines()
    assert lines[0] == "filename\tacq_time" and sorted(l.split("\t")[0] for l in lines[1:]) == images
    for line in lines[1:]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?", line.split("\t")[1]), line
    assert not list((tmp_path / "w").iterdir())  # the private scratch is removed


def test_auto_child_gets_no_secret(monkeypatch):
    from pacs2bids.convert import child_env

    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", "do-not-pass-me-0123456789")
    monkeypatch.setenv("MY_SPEC_SECRET", "nor-me-0123456789")
    monkeypatch.setenv("PROJECTKEY", "innocent-name-0123456789")  # a secret_env with a harmless name
    env = child_env()
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # pip's dcm2niix first
    assert "innocent-name-0123456789" not in env.values()
    assert "do-not-pass-me-0123456789" not in env.values() and "nor-me-0123456789" not in env.values()


def test_auto_failed_series_keeps_dcm2niix_log(sample_dir, tmp_path):
    """A series dcm2niix writes nothing for is failed, and its reason names the kept log."""
    import shutil

    import pydicom

    src = tmp_path / "dicom"
    shutil.copytree(sample_dir / "dcm_qa_ge" / "In", src / "dwi")
    broken = src / "broken"
    broken.mkdir()
    ds = pydicom.dcmread(next(p for p in sorted((src / "dwi").rglob("*")) if p.is_file()))
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesNumber = 77
    del ds.PixelData  # an image object without pixels: nothing dcm2niix can write
    ds.save_as(broken / "x.dcm")
    root = tmp_path / "bids"
    result = convert_session(src, root, subject="01", session=None, heuristic="auto", work_dir=tmp_path / "w")
    by_number = {s.series_number: s for s in result.series}
    assert by_number[1].status == "converted"
    bad = by_number[77]
    assert bad.status == "failed" and ".pacs2bids/logs/dcm2niix-sub-01.log" in bad.reason, bad
    assert "dcm2niix" in (root / ".pacs2bids/logs/dcm2niix-sub-01.log").read_text()


def test_auto_sessions_in_parallel_share_nothing(sample_dir, tmp_path):
    """Two sessions of one subject converted at once into one dataset, with one work folder."""
    from concurrent.futures import ThreadPoolExecutor

    root, work = tmp_path / "bids", tmp_path / "w"
    jobs = [("dcm_qa_ge", "a"), ("dcm_qa_nih", "b"), ("dcm_qa_fmap", "c"), ("dcm_qa_philips", "d")]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda j: convert_session(sample_dir / j[0], root, subject="01", session=j[1],
                                                          heuristic="auto", work_dir=work), jobs))
    for (_, ses), r in zip(jobs, results):
        assert r.series and all(s.status == "converted" for s in r.series), r
        assert all(o.startswith(f"sub-01/ses-{ses}/") for s in r.series for o in s.outputs)
    assert not list(work.iterdir())


@pytest.mark.corpus
def test_xa30_stacked_series_and_fmap(corpus_dir, tmp_path):
    """XA30: 20 one-volume series stacked by dcm2niix into one bold run (every series reported
    with it), the GRE field map named, IntendedFor on the phase difference. (Its speed beside dcm2niix alone is measured by
    benchmarks/bench_convert.py, not by a timed test.)"""
    src = copy_decompressed(corpus_dir / "dcm_qa_xa30i", tmp_path / "dicom")
    root = tmp_path / "bids"
    result = convert_session(src, root, subject="x", session="1", heuristic="auto", work_dir=tmp_path / "w")
    bold = [s for s in result.series if 7001 <= (s.series_number or 0) <= 7020]
    assert len(bold) == 20 and all(s.status == "converted" for s in bold)
    assert len({tuple(s.outputs) for s in bold}) == 1
    run = root / next(o for o in bold[0].outputs if o.endswith(".nii.gz"))
    import nibabel as nib

    assert nib.load(run).shape[3] == 20
    pd = json.loads((root / "sub-x/ses-1/fmap/sub-x_ses-1_phasediff.json").read_text())
    assert "bids::" + run.relative_to(root).as_posix() in pd["IntendedFor"]
    for uri in pd["IntendedFor"]:
        assert (root / uri.removeprefix("bids::")).is_file()


@pytest.mark.parametrize("layout", ["unique", "stems-collide", "shared-names"])
def test_auto_maps_each_output_to_its_series(sample_dir, tmp_path, layout):
    """Whatever the file names (distinct: dcm2niix reads the folder in place; equal but for the
    extension, or equal across folders: linked under names of their own), each image lands
    under the series it came from."""
    import shutil

    src = tmp_path / "dicom"
    files = sorted(p for p in (sample_dir / "dcm_qa_nih").rglob("*.dcm"))
    folders = sorted({f.parent.name for f in files})
    for n, f in enumerate(files):
        series = f.parent.name
        if layout == "unique":
            dest = src / series / f"{n:04d}.dcm"
        elif layout == "stems-collide":  # distinct names, equal once dcm2niix drops the extension
            dest = src / series / f"{n % 2:04d}.{['dcm', 'ima', 'img', 'dc3'][folders.index(series)]}"
        else:
            dest = src / series / f"{n % 2:04d}.dcm"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    root = tmp_path / "bids"
    result = convert_session(src, root, subject="01", session=None, heuristic="auto", work_dir=tmp_path / "w")
    assert len(result.series) == 4
    for s in result.series:
        assert s.status == "converted", s
        (side,) = [o for o in s.outputs if o.endswith(".json")]
        assert json.loads((root / side).read_text())["SeriesNumber"] == s.series_number


@pytest.mark.parametrize("time_,date,expected", [
    ("19:40:15.687500", "20230113", "2023-01-13T19:40:15.687500"),
    ("08:00:01", "20230113", "2023-01-13T08:00:01"),
    ("08:00:01", "", "n/a"),  # no date left after pseudonymisation
    ("08:00:01", "***", "n/a"),  # an unreadable date is not invented
    ("08:00:01", "20231341", "n/a"),
    (None, "20230113", "n/a"),
])
def test_acq_time(time_, date, expected):
    from pacs2bids.bids.scans import acq_time as _acq_time

    assert _acq_time({"AcquisitionTime": time_} if time_ else {}, date) == expected


def test_asl_without_its_context_is_left_out(sample_dir, tmp_path):
    """An image named asl with no label/control order would fail the validator for the whole
    dataset: it is left out with that reason; with the order given, aslcontext.tsv is written."""
    from dataclasses import dataclass

    from pacs2bids.convert import classify
    from pacs2bids.convert import judge_session, dcm2niix_session
    from pacs2bids.convert.auto import _move_kept

    run = dcm2niix_session([sample_dir / "dcm_qa_philips"], tmp_path / "p")
    (out,) = run.outputs
    plain = classify.Decision(out, "perf", "asl", {}, "said asl")
    (v,) = judge_session(run, [plain], "01", None)
    assert v.status == "skipped" and "aslcontext.tsv" in v.reason

    @dataclass(frozen=True)
    class WithContext(classify.Decision):
        aslcontext: tuple = ("control", "label", "control")

    given = WithContext(out, "perf", "asl", {}, "said asl")
    (v,) = judge_session(run, [given], "01", None)
    assert v.status == "converted" and v.kept == [given]
    files = _move_kept(given, given.relpath("01", None), tmp_path / "bids")
    ctx = tmp_path / "bids" / "sub-01" / "perf" / "sub-01_aslcontext.tsv"
    assert "sub-01/perf/sub-01_aslcontext.tsv" in files
    assert ctx.read_text() == "volume_type\ncontrol\nlabel\ncontrol\n"


@pytest.mark.parametrize("heuristic", ["auto", "project"])
def test_reconversion_leaves_no_stale_images(sample_dir, tmp_path, heuristic):
    """A session converted again (the staging starts from the published dataset) replaces what
    its earlier conversion wrote, even under other names; other sessions and sourcedata stay."""
    if heuristic == "project":
        heuristic = str(tmp_path / "project.py")
        Path(heuristic).write_text(PROJECT_HEURISTIC)
    root = tmp_path / "bids"
    convert_session(sample_dir / "dcm_qa_ge", root, subject="01", session="a", heuristic=heuristic, work_dir=tmp_path / "w")
    convert_session(sample_dir / "dcm_qa_nih", root, subject="01", session="b", heuristic="auto", work_dir=tmp_path / "w")
    stale = root / "sub-01/ses-a/func/sub-01_ses-a_task-old_bold.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    scans = root / "sub-01/ses-a/sub-01_ses-a_scans.tsv"
    scans.write_text(scans.read_text() + "func/sub-01_ses-a_task-old_bold.nii.gz\tn/a\n")
    keep = root / "sourcedata/sub-01/ses-a/001-x/a.dcm"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"dicom")
    before_b = sorted(p.relative_to(root) for p in (root / "sub-01/ses-b").rglob("*"))
    result = convert_session(sample_dir / "dcm_qa_ge", root, subject="01", session="a", heuristic=heuristic,
                             work_dir=tmp_path / "w")
    assert not stale.exists() and "task-old" not in scans.read_text()
    assert all((root / o).exists() for s in result.series for o in s.outputs) and result.series[0].outputs
    assert keep.exists() and sorted(p.relative_to(root) for p in (root / "sub-01/ses-b").rglob("*")) == before_b


@pytest.mark.corpus
def test_image_missing_required_fields_is_left_out_and_dataset_valid(vendors_dir, tmp_path):
    """Philips pCASL deltaM (dcm_qa_philips_asl 201): classified asl, but its sidecar lacks what BIDS
    requires of an asl image (ArterialSpinLabelingType, PostLabelingDelay...). Published as is, the
    validator would refuse the whole dataset; it is left out with the fields named, the rest of the
    session is converted, and the dataset validates."""
    import shutil

    src = tmp_path / "dicom"
    shutil.copytree(vendors_dir / "dcm_qa_philips_asl" / "In" / "Classic" / "201_pCASL", src / "201")
    shutil.copytree(vendors_dir / "dcm_qa_mosaic" / "In" / "ep2d_Int_4", src / "004")  # a bold beside it
    root = tmp_path / "bids"
    result = convert_session(src, root, subject="01", session=None, heuristic="auto", work_dir=tmp_path / "w")
    by_number = {s.series_number: s for s in result.series}
    asl = by_number[201]
    assert asl.status == "skipped" and not asl.outputs, asl
    assert "ArterialSpinLabelingType" in asl.reason and "validator" in asl.reason
    assert not list(root.rglob("*_asl.*")) and not list(root.rglob("*_aslcontext.tsv"))
    assert by_number[4].status == "converted"
    finalise_dataset(root, name="asl guard", participants=["01"], generated_by={"Name": "pacs2bids"})
    assert validate_dataset(root).errors == []


ASL_PROTOCOL = {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.8, "LabelingDuration": 1.8,
                "BackgroundSuppression": False, "M0Type": "Absent", "TotalAcquiredPairs": 1,
                "RepetitionTimePreparation": 4.55}


@pytest.mark.corpus
def test_sidecar_fields_given_by_the_project_make_asl_publishable(vendors_dir, tmp_path):
    """The same Philips 2D pCASL deltaM: with the protocol's ASL fields given (spec sidecar_fields) but not
    SliceTiming (BIDS requires it of 2D ASL; dcm2niix does not write it here), it is still left out,
    naming SliceTiming; with it too, it is converted, its sidecar carries them, what the images say is
    never replaced, and the dataset validates."""
    import shutil

    import pydicom

    from pacs2bids.config import ProjectSpec

    src = tmp_path / "dicom"
    shutil.copytree(vendors_dir / "dcm_qa_philips_asl" / "In" / "Classic" / "201_pCASL", src / "201")
    positions = {tuple(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient) for f in (src / "201").iterdir()}
    given = {"asl": {**ASL_PROTOCOL, "EchoTime": 99.0}}  # EchoTime is in the images: not replaced

    def convert(name: str):
        (asl,) = convert_session(src, tmp_path / name, subject="01", session=None, heuristic="auto",
                                 work_dir=tmp_path / "w", sidecar_fields=given).series
        return asl

    asl = convert("without-timing")
    assert asl.status == "skipped" and "SliceTiming" in asl.reason and "ArterialSpinLabelingType" not in asl.reason
    given["asl"]["SliceTiming"] = [round(i * 0.05, 3) for i in range(len(positions))]
    asl = convert("bids")
    root = tmp_path / "bids"
    assert asl.status == "converted", asl
    side = json.loads((root / "sub-01" / "perf" / "sub-01_asl.json").read_text())
    assert {k: side[k] for k in ASL_PROTOCOL} == ASL_PROTOCOL and side["SliceTiming"] == given["asl"]["SliceTiming"]
    assert side["EchoTime"] != 99.0
    assert (root / "sub-01" / "perf" / "sub-01_aslcontext.tsv").is_file()
    finalise_dataset(root, name="asl given", participants=["01"], generated_by={"Name": "pacs2bids"})
    report = validate_dataset(root)
    assert report.errors == [], report.summary()
    # the spec refuses what cannot be a field name
    with pytest.raises(ValueError, match="not a BIDS sidecar field"):
        ProjectSpec.model_validate({"project": "p", "pacs": {"dicomweb": {"url": "http://127.0.0.1:1/dicom-web"}},
                                    "selection": {"inclusions": "x.csv"}, "output": str(tmp_path / "o"),
                                    "sidecar_fields": {"asl": {"post labeling delay": 1}}})


@pytest.mark.corpus
@pytest.mark.parametrize("whole", [True, False])
def test_series_sent_classic_and_enhanced_is_converted_once(vendors_dir, tmp_path, whole):
    """Philips field map 2001 (dcm_qa_philips_enh) exported both as 212 classic MR images and as one
    enhanced MR object of 212 frames, under one Series Instance UID, as a PACS holds it. Given both,
    dcm2niix made 8 images (2 echoes x magnitude/phase, twice) and the series failed as split; now
    the classic images are converted (4 images, BIDS-valid) and the enhanced object is named as not
    converted. With a classic image missing, the two forms are not the same frames: both stay."""
    import gzip

    src = tmp_path / "dicom" / "2001"
    src.mkdir(parents=True)
    root_in = vendors_dir / "dcm_qa_philips_enh" / "In"
    classic = sorted((root_in / "cl").glob("2001_*.dcm.gz"))
    for p in classic[: None if whole else -1] + sorted((root_in / "enh").glob("2001_*.dcm.gz")):
        (src / f"{p.parent.name}-{p.name[:-3]}").write_bytes(gzip.decompress(p.read_bytes()))
    root = tmp_path / "bids"
    (fmap,) = [s for s in convert_session(src.parent, root, subject="01", session=None, heuristic="auto",
                                          work_dir=tmp_path / "w").series if s.series_number == 2001]
    if not whole:
        assert fmap.status == "failed" and "split" in fmap.reason, fmap
        return
    assert fmap.status == "converted", fmap
    assert "212 classic MR images; the 1 enhanced MR object(s)" in fmap.reason, fmap.reason
    assert len([o for o in fmap.outputs if o.endswith(".nii.gz")]) == 4, fmap.outputs
    finalise_dataset(root, name="classic and enhanced", participants=["01"], generated_by={"Name": "pacs2bids"})
    assert validate_dataset(root).errors == []
