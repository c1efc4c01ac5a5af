"""The steps bench_e2e.py times: loading the corpus, the floors, the anchors and pacs2bids runs.

Every step returns its wall time in seconds (and what it produced, where a later step needs it).
Each floor does its one job and nothing else, so a pacs2bids stage can be set beside it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests
from pydicom.uid import generate_uid

import waited
from pacs2bids.dicomfiles import iter_dicom_bytes, iter_dicom_files
from pacs2bids.orthanc import Orthanc

VENV_BIN = Path(sys.executable).parent
SECRET_ENV = "PACS2BIDS_BENCH_SECRET"


@dataclass
class Corpus:
    """What was loaded into Orthanc: per study its patient, and the patient IDs and SOP classes."""

    study_patient: dict[str, str] = field(default_factory=dict)
    sop_classes: set[str] = field(default_factory=set)
    instances: int = 0
    size: int = 0

    @property
    def patients(self) -> list[str]:
        return sorted(set(self.study_patient.values()))


def _copy(data: bytes, k: int) -> pydicom.Dataset | None:
    """The file as copy ``k``: copy 0 is the file itself, others get new Study/Series/SOP Instance
    UIDs and a new PatientID (derived from the old ones and ``k``, so every copy is distinct)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if not (ds.get("PatientID") and ds.get("StudyInstanceUID")):
        return None  # no inclusion row can reach it: left out of the whole comparison
    if k:
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if kw in ds:
                setattr(ds, kw, generate_uid(entropy_srcs=[str(ds[kw].value), f"copy-{k}"]))
        if "MediaStorageSOPInstanceUID" in ds.file_meta:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"{ds.PatientID}C{k}"
    return ds


def load_corpus(o: Orthanc, root: Path, copies: int, studies: int = 0, keep: Path | None = None) -> Corpus:
    """Upload ``copies`` copies of every DICOM file under ``root`` (``*.gz`` opened) to Orthanc;
    with ``studies``, of the files of the first ``studies`` studies met only. With ``keep``, each
    uploaded file is also written as ``keep/<study n>/NNNNNN.dcm`` (as the C-GET floor
    would: the bare pydicom floor's input when the C-GET floor is not run)."""
    corpus = Corpus()
    blobs: list[bytes] = []
    sources, kept = [], set()
    for _path, data in iter_dicom_bytes(root):
        uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                  .get("StudyInstanceUID", ""))
        if studies and uid not in kept and len(kept) >= studies:
            continue
        kept.add(uid)
        sources.append(data)
    for k in range(copies):
        for data in sources:
            ds = _copy(data, k)
            if ds is None:
                continue
            if k:
                buf = io.BytesIO()
                ds.save_as(buf)
                data = buf.getvalue()
            corpus.study_patient[str(ds.StudyInstanceUID)] = str(ds.PatientID)
            corpus.sop_classes.add(str(ds.SOPClassUID))
            corpus.instances += 1
            corpus.size += len(data)
            if keep is not None:
                _keep(keep, corpus, ds, data)
            blobs.append(data)
            if len(blobs) >= 200:  # bounded memory at 10x
                o.upload(blobs)
                blobs.clear()
    o.upload(blobs)
    return corpus


def _keep(keep: Path, corpus: Corpus, ds: pydicom.Dataset, data: bytes) -> None:
    """One uploaded file written under ``keep/<study n>/`` (study numbers in the order first met)."""
    study = list(corpus.study_patient).index(str(ds.StudyInstanceUID))
    folder = keep / f"{study:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{corpus.instances:06d}.dcm").write_bytes(data)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


# -- floors -------------------------------------------------------------------------------
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'  # every floor asks as pacs2bids does


def wado_floor(o: Orthanc, corpus: Corpus) -> tuple[float, int]:
    """Raw WADO-RS of every study, streamed, bytes counted and dropped; returns (seconds, bytes)."""

    def run() -> int:
        n = 0
        with requests.Session() as s:
            for uid in corpus.study_patient:
                with s.get(f"{o.dicomweb_url}/studies/{uid}", headers={"Accept": WADO_ACCEPT}, stream=True,
                           timeout=600) as r:
                    r.raise_for_status()
                    for chunk in r.iter_content(1 << 20):
                        n += len(chunk)
        return n

    return _timed(run)


def wado_keep_floor(o: Orthanc, corpus: Corpus, out: Path) -> tuple[float, int, float]:
    """Raw WADO-RS of every study as :func:`wado_floor`, each part also kept as its own file with
    its SHA-256, in the simplest code that does only that: one thread, the answer split on its
    delimiter as it streams, each part written with one ``os.write`` into ``out/<study n>/`` and
    hashed, no check, no ledger, no rename. What any retrieval that keeps every instance must
    pay at least, beyond the transfer. Returns (seconds, files, CPU seconds of this process)."""
    import hashlib

    from pacs2bids.pacs.multipart import _boundary  # the answer's boundary, as pacs2bids reads it

    def run() -> int:
        files = 0
        with requests.Session() as s:
            for k, uid in enumerate(corpus.study_patient):
                folder = out / f"{k:04d}"
                folder.mkdir(parents=True)
                with s.get(f"{o.dicomweb_url}/studies/{uid}", headers={"Accept": WADO_ACCEPT}, stream=True,
                           timeout=600) as r:
                    r.raise_for_status()
                    delim, buf, at = b"\r\n--" + _boundary(r.headers["Content-Type"]), b"", 0
                    for chunk in r.iter_content(1 << 20):
                        buf, at = buf[at:] + chunk, 0
                        view = memoryview(buf)
                        while True:
                            start = buf.find(b"\r\n\r\n", at)  # the end of a part's headers
                            end = buf.find(delim, start) if start >= 0 else -1
                            if end < 0:
                                break
                            data = view[start + 4:end]  # no copy
                            fd = os.open(folder / f"{files:06d}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                            os.write(fd, data)
                            os.close(fd)
                            hashlib.sha256(data).hexdigest()
                            files += 1
                            at = end + len(delim)
        return files

    c0 = time.process_time()
    seconds, files = _timed(run)
    return seconds, files, time.process_time() - c0


def cget_floor(o: Orthanc, corpus: Corpus, out: Path) -> tuple[float, int]:
    """One pynetdicom association, a study-level C-GET of every study; each instance's file (as
    pynetdicom wrote it while receiving) moved to ``out/<patient n>/<study n>/``. Returns
    (seconds, files). The presentation contexts are pacs2bids's own (same offer, same PACS answer)."""
    from pynetdicom import AE, build_context, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    from pacs2bids.pacs.contexts import accept_ignored_scp_roles, storage_contexts  # the package sets
    from pacs2bids.pacs.scp import register_storage_class  # STORE_RECV_CHUNKED_DATASET: data goes to a file

    for uid in corpus.sop_classes:
        register_storage_class(uid)
    contexts = [build_context(GET), *storage_contexts(frozenset(corpus.sop_classes))]
    roles = [build_role(str(c.abstract_syntax), scp_role=True) for c in contexts[1:]]
    labels = {pid: f"P{i:03d}" for i, pid in enumerate(corpus.patients)}
    target: dict[str, Path] = {}
    count = [0]

    def on_store(event) -> int:
        count[0] += 1
        shutil.move(event.dataset_path, target["dir"] / f"{count[0]:06d}.dcm")
        return 0x0000

    def run() -> int:
        ae = AE(ae_title="BENCH")
        ae.maximum_pdu_size = 0
        assoc = ae.associate("127.0.0.1", o.dicom_port, contexts=contexts, ae_title=o.aet, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        if not assoc.is_established:
            raise RuntimeError(f"C-GET floor: Orthanc on port {o.dicom_port} refused the association")
        accept_ignored_scp_roles(assoc)
        try:
            for n, (uid, pid) in enumerate(corpus.study_patient.items()):
                target["dir"] = out / labels[pid] / f"{n:04d}"
                target["dir"].mkdir(parents=True)
                query = pydicom.Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = uid
                for _status, _ in assoc.send_c_get(query, GET):
                    pass
        finally:
            assoc.release()
        return count[0]

    return _timed(run)


def pydicom_floor(src: Path, out: Path) -> tuple[float, int]:
    """A bare pydicom read + write of every file, written as ``out/<patient>/<study>/<series n>/``
    (the series folders dcm2niix is then given). Returns (seconds, files)."""
    def run() -> int:
        series: dict[str, Path] = {}
        n = 0
        for f in iter_dicom_files(src):
            ds = pydicom.dcmread(f)
            rel = f.parent.relative_to(src)
            folder = series.setdefault(str(ds.get("SeriesInstanceUID", "")), out / rel / f"{len(series):04d}")
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f.name)
            n += 1
        return n

    return _timed(run)


def read_floor(root: Path) -> tuple[float, int]:
    """Every byte of every file under ``root`` read once (the leak scan's floor)."""
    def run() -> int:
        n = 0
        for p in root.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        n += len(chunk)
        return n

    return _timed(run)


def series_folders(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("*.dcm")})


def dcm2niix_floor(src: Path, out: Path) -> tuple[float, int]:
    """The pip dcm2niix, ``-z y``, once per series folder; returns (seconds, folders)."""
    exe = shutil.which("dcm2niix", path=str(VENV_BIN)) or "dcm2niix"
    folders = series_folders(src)

    def run() -> int:
        for n, folder in enumerate(folders):
            dest = out / f"{n:04d}"
            dest.mkdir(parents=True)
            subprocess.run([exe, "-z", "y", "-b", "y", "-o", str(dest), str(folder)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False, timeout=1800)
        return len(folders)

    return _timed(run)


# -- anchors ------------------------------------------------------------------------------
def getscu_anchor(o: Orthanc, corpus: Corpus, out: Path) -> tuple[float, int]:
    """dcmtk getscu, one association per study (as a script would do); returns (seconds, files)."""
    out.mkdir(parents=True)

    def run() -> int:
        for uid in corpus.study_patient:
            subprocess.run(["getscu", "-aet", "BENCH", "-aec", o.aet, "-S", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", f"StudyInstanceUID={uid}", "-od", str(out), "127.0.0.1", str(o.dicom_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=1800)
        return sum(1 for p in out.iterdir() if p.is_file())

    return _timed(run)


def dicognito_anchor(src: Path, out: Path) -> tuple[float, int]:
    """dicognito (``python -m dicognito``: its console script is broken) on a copy of the files
    (it anonymises in place unless given an output folder)."""
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "dicognito", "--output-directory", str(out), str(src)]
    t, done = _timed(lambda: subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=3600))
    if done.returncode:
        raise RuntimeError(f"dicognito exited {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
    return t, sum(1 for p in out.rglob("*") if p.is_file())


def _mr_images_only(src: Path, dest: Path) -> Path:
    """Hard links to the MR files of ``src`` that hold pixels: heudiconv's ``convertall`` hands
    every series to dcm2niix and stops at the first it refuses (a report, a screen capture)."""
    for f in iter_dicom_files(src):
        ds = pydicom.dcmread(f, specific_tags=["Modality", "PixelData", "FloatPixelData"])
        if ds.get("Modality") == "MR" and ("PixelData" in ds or "FloatPixelData" in ds):
            link = dest / f.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, link)
    return dest


def heudiconv_anchor(src: Path, out: Path) -> tuple[float, int]:
    """Plain heudiconv (built-in ``convertall``, ``-c dcm2niix -b``, ``-g all``: one subject's studies
    in one go), one call per subject, on the MR image files of ``src/<subject>/<study>/*.dcm`` (chosen
    before the clock starts). A subject it fails on is reported; its time counts up to the failure."""
    src = _mr_images_only(src, out.parent / f"{out.name}-in")
    exe = shutil.which("heudiconv", path=str(VENV_BIN)) or "heudiconv"
    env = {**os.environ, "NIPYPE_NO_ET": "1", "NO_ET": "1"}
    failed = []

    def run() -> None:
        for subject in sorted(p.name for p in src.iterdir() if p.is_dir()):
            cmd = [exe, "-d", f"{src}/{{subject}}/*/*.dcm", "-s", subject, "-f", "convertall", "-c", "dcm2niix",
                   "-o", str(out), "-b", "-g", "all", "--overwrite"]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=3600)
            if done.returncode:
                failed.append(subject)

    t, _ = _timed(run)
    if failed:
        print(f"bench_e2e: heudiconv failed on {len(failed)} subject(s) (time counted up to the failure)",
              file=sys.stderr)
    return t, len(list(out.rglob("*.nii.gz")))


# -- pacs2bids ----------------------------------------------------------------------------
def write_spec(folder: Path, o: Orthanc, corpus: Corpus, transport: str, storage_port: int) -> Path:
    """A spec naming every patient of the corpus (every modality: the floors handle every file)."""
    folder.mkdir(parents=True)
    rows = [f"{pid},{n:03d}" for n, pid in enumerate(corpus.patients, start=1)]
    (folder / "inclusions.csv").write_text("patient_id,subject\n" + "\n".join(rows) + "\n")
    if transport == "dicomweb":
        pacs = f"  dicomweb: {{url: {o.dicomweb_url}}}\n"
    else:
        pacs = (f"  dimse: {{ae_title: {o.aet}, host: 127.0.0.1, port: {o.dicom_port}, calling_ae_title: PACS2BIDS, "
                f"retrieve: {transport}, storage_port: {storage_port}}}\n")
    (folder / "spec.yaml").write_text(
        "project: bench\npacs:\n" + pacs + "selection:\n  inclusions: inclusions.csv\n  modalities: []\n"
        f"pseudonymization:\n  secret_env: {SECRET_ENV}\nheuristic: auto\noutput: {folder / 'out'}\n"
    )
    return folder / "spec.yaml"


def _summary(stdout: str) -> dict:
    """The run's JSON summary: the last block that opens with a ``{`` line."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    if not starts:
        return {}
    try:
        return json.loads("\n".join(lines[starts[-1]:]))
    except ValueError:
        return {}


def base_package(commit: str, dest: Path) -> Path:
    """This repository's pacs2bids at ``commit``, laid out as an importable package under ``dest``
    (``src/pacs2bids`` with ``flows``, ``tasks`` and ``heuristics`` as its subpackages, as installed);
    put first on PYTHONPATH, it is imported instead of the installed one (same dependencies)."""
    tree = dest / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "archive", commit, "src", "flows",
                              "tasks", "heuristics"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shutil.copytree(tree / "src" / "pacs2bids", dest / "pkg" / "pacs2bids")
    for sub in ("flows", "tasks", "heuristics"):
        shutil.copytree(tree / sub, dest / "pkg" / "pacs2bids" / sub)
    return dest / "pkg"


def migrated_prefect_home(home: Path) -> Path:
    """A PREFECT_HOME whose database this Prefect version has made and migrated, marked as
    ``pacs2bids.launch`` marks it: every timed run then starts as a repeated run does."""
    from pacs2bids.launch import MIGRATED

    env = {**os.environ, "PREFECT_HOME": str(home)}
    exe = shutil.which("prefect", path=str(VENV_BIN)) or "prefect"
    subprocess.run([exe, "server", "database", "upgrade", "-y"], env=env, check=True, stdout=subprocess.DEVNULL,
                   timeout=1800)
    (home / MIGRATED).write_text(_prefect_version() + "\n")
    return home


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


SAMPLE_ENV = "BENCH_E2E_SAMPLE"  # a folder: the current code's runs are profiled there (bench_e2e --sample)
MEMORY_ENV = "BENCH_E2E_MEMORY"  # a folder: where the current code's runs hold memory (bench_e2e --memory)


def pacs2bids_run(spec: Path, base: Path | None = None) -> dict:
    """``pacs2bids run SPEC --json`` in its own process (its Prefect server's start-up counts); with
    ``base``, the pacs2bids package under that folder (:func:`base_package`) runs instead.
    Returns seconds, peak RSS (MB, the largest of the process and its waited-for children, from wait4 in
    :mod:`waited`), exit
    code, state and the summary's ``stage_seconds`` (None while the flow does not report them)."""
    exe = shutil.which("pacs2bids", path=str(VENV_BIN))
    cmd = [exe] if exe and base is None else [sys.executable, "-m", "pacs2bids.cli"]
    if base is None and os.environ.get(SAMPLE_ENV):  # where the run's own CPU goes (benchmarks/sampler.py)
        cmd = [sys.executable, str(Path(__file__).with_name("sampler.py")),
               str(Path(os.environ[SAMPLE_ENV]) / f"{spec.parent.name}.txt"), "--"]
    elif base is None and os.environ.get(MEMORY_ENV):  # where the run's memory goes (benchmarks/memprobe.py)
        cmd = [sys.executable, str(Path(__file__).with_name("memprobe.py")),
               str(Path(os.environ[MEMORY_ENV]) / f"{spec.parent.name}.txt"), "--"]
    env = {**os.environ, SECRET_ENV: "bench-secret-" + "0123456789abcdef" * 2, "NIPYPE_NO_ET": "1",
           "PACS2BIDS_TIMELINE": "1"}  # each study's stages in the summary (read by versions that have it)
    if base is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(base), *filter(None, [os.environ.get("PYTHONPATH")])])
    log = spec.parent / "run.log"
    with open(spec.parent / "stdout.txt", "w+") as out, open(log, "wb") as err:
        # through waited.py: the run's own peak, not this process's size at the fork (waited.py)
        code, seconds, peak, cpu = waited.run([*cmd, "run", str(spec), "--json"], stdout=out, stderr=err, env=env)
        out.seek(0)
        summary = _summary(out.read())
    if code not in (0, 3):  # the run's own log (pacs2bids keeps identifiers out of it)
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"bench_e2e: pacs2bids run {spec} exited {code}:\n" + "\n".join(tail), file=sys.stderr)
    return {"seconds": seconds, "peak_rss_mb": peak, "exit_code": code,
            "cpu_seconds": cpu,  # the run's and its waited-for children's
            "state": summary.get("state"), "stage_seconds": summary.get("stage_seconds"), "log": str(log),
            "timeline": summary.get("timeline")}
