"""``pacs2bids demo``: a bundled Orthanc on loopback, the real sample loaded, one extraction.

Everything the demo starts, it stops. The demo uses a fixed, public project key: it is for the
bundled sample only, never for real data.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path

import pydicom

from .dicomfiles import iter_dicom_files
from .launch import run_spec
from .orthanc import Orthanc, free_port

DEMO_SECRET_ENV = "PACS2BIDS_DEMO_SECRET"
DEMO_SECRET = "pacs2bids-demo-key-public-never-use-for-real-data"


def sample_dir() -> Path:
    return Path(str(resources.files("pacs2bids") / "data" / "sample"))


def sample_patients(folder: Path) -> list[str]:
    """PatientIDs present in the sample, in a stable order."""
    ids: dict[str, None] = {}
    for f in iter_dicom_files(folder):
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"])
        ids.setdefault(str(ds.get("PatientID", "")), None)
    return sorted(i for i in ids if i)


def write_demo_spec(
    folder: Path, pacs: Orthanc, output: Path, *, transport: str, retrieve: str, storage_port: int, patients: list[str]
) -> Path:
    """Write spec.yaml and inclusions.csv for the demo into ``folder``."""
    rows = ["patient_id,subject"] + [f"{pid},{n:02d}" for n, pid in enumerate(patients, start=1)]
    (folder / "inclusions.csv").write_text("\n".join(rows) + "\n")
    if transport == "dicomweb":
        pacs_block = f"  dicomweb: {{url: {pacs.dicomweb_url}}}\n"
    else:
        pacs_block = (
            f"  dimse: {{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.dicom_port}, "
            f"calling_ae_title: PACS2BIDS, retrieve: {retrieve}, storage_port: {storage_port}}}\n"
        )
    spec = (
        "project: demo\n"
        "pacs:\n" + pacs_block + "selection:\n"
        "  inclusions: inclusions.csv\n"
        "  modalities: [MR]\n"
        "pseudonymization:\n"
        f"  secret_env: {DEMO_SECRET_ENV}\n"
        "heuristic: auto\n"
        f"output: {output}\n"
        "retries: {attempts: 2, backoff_seconds: 1}\n"
    )
    path = folder / "spec.yaml"
    path.write_text(spec)
    return path


def run_demo(output: Path, *, transport: str = "dimse", retrieve: str = "c-get") -> int:
    """Run the demo; returns the process exit code."""
    output = Path(os.path.abspath(output))  # not resolve(): output is a symlink to its published version
    os.environ.setdefault(DEMO_SECRET_ENV, DEMO_SECRET)
    sample = sample_dir()
    patients = sample_patients(sample)
    storage_port = free_port()
    print(f"pacs2bids demo: starting Orthanc on 127.0.0.1 and loading the bundled sample ({sample})")
    with tempfile.TemporaryDirectory(prefix="pacs2bids-demo-") as tmp:
        with Orthanc(modalities={"PACS2BIDS": ("127.0.0.1", storage_port)}, workdir=Path(tmp) / "orthanc") as pacs:
            n = pacs.upload(iter_dicom_files(sample))
            stats = pacs.statistics()
            print(
                f"pacs2bids demo: Orthanc at {pacs.url} (DICOM port {pacs.dicom_port}) holds {n} instances, "
                f"{stats['CountStudies']} studies of {stats['CountPatients']} patients"
            )
            spec = write_demo_spec(
                Path(tmp), pacs, output, transport=transport, retrieve=retrieve, storage_port=storage_port,
                patients=patients,
            )
            code = run_spec(spec)
    if code in (0, 3):
        print(f"\nLook at: {output}  (BIDS dataset; pseudonymised DICOM in sourcedata/, W3C PROV in prov/, "
              "lineage in .pacs2bids/, the protocol QC report in derivatives/pacs2bids-qc/index.html)")
        example = next(iter(sorted(output.glob("sub-*/**/*.nii.gz"))), output / "participants.tsv")
        print(f"Ask where a file came from:  pacs2bids lineage {example}")
    return code
