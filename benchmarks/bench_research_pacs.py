"""Pushing a project's pseudonymised DICOM to a research PACS (issue 13, "Figures"), in one run.

    .venv/bin/python benchmarks/bench_research_pacs.py [--studies 50] [--more 5] [--method both]

A project of ``--studies`` studies is made from the bundled sample: its series pseudonymised once
by pacs2bids (two subjects, five series, 35 instances), then copied once per study with new
pseudonymous study, series and instance UIDs (the pixel data and headers otherwise as
pacs2bids wrote them). For each method (STOW-RS, C-STORE), against fresh Orthanc servers on
loopback:

- plain: every file sent once with the same library and batches (dicomweb-client
  ``store_instances``; pynetdicom ``send_c_store`` on one association), nothing asked first;
- first: the first publish of the version by :class:`ResearchPacsTarget` (asks what the PACS
  holds, sends, asks again to verify);
- no-op: the same version again (goal: <= 10 s, 0 bytes); the version holds its per-instance
  lineage table, as a run's does (``--no-lineage``: without it, every header is read);
- +N: a version with ``--more`` studies added (cost should follow the N studies, not the rest).

Prints one line per step: seconds, instances and MB sent, and the ratio first / plain.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from datetime import datetime, timezone

import pydicom
from pydicom.uid import generate_uid

from pacs2bids.checksum import sha256_file

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.config.targets import DicomwebTargetSettings, DimseTargetSettings
from pacs2bids.deid import Pseudonymiser
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.orthanc import Orthanc
from pacs2bids.targets.research_pacs import ResearchPacsTarget, dicom_paths

SERIES = ["dcm_qa_nih/In/20180918Si/mr_0003", "dcm_qa_nih/In/20180918Si/mr_0004",
          "dcm_qa_nih/In/20180918Si/mr_0005", "dcm_qa_nih/In/20180918Si/mr_0006",
          "dcm_qa_philips/In/Magdeburg_2014/fmri"]


def template(work: Path) -> list[Path]:
    """The sample's series pseudonymised by pacs2bids, as one study (files, sorted)."""
    sample = Path(str(resources.files("pacs2bids") / "data" / "sample"))
    p = Pseudonymiser("bench", b"bench-secret-0123456789abcdef", PseudonymizationSettings(), work / "keys")
    for i, folder in enumerate(SERIES):
        p.pseudonymise_series(iter_dicom_files(sample / folder), work / "template" / f"{i:03d}", subject="01",
                              session="01", quarantine_dir=work / "quarantine")
    return sorted((work / "template").rglob("*.dcm"))


def add_studies(version: Path, files: list[Path], first: int, count: int) -> None:
    """Studies ``first`` .. ``first + count - 1``: copies of ``files`` with new UIDs, under
    ``sourcedata/sub-NNN/ses-01/<series>/<sop>.dcm``."""
    for n in range(first, first + count):
        study, series = generate_uid(), {}
        for f in files:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series.setdefault(f.parent.name, generate_uid())
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID = ds.PatientName = f"sub-{n:03d}"
            out = version / "sourcedata" / f"sub-{n:03d}" / "ses-01" / f.parent.name / f"{ds.SOPInstanceUID}.dcm"
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out)


def manifest(version: Path) -> dict:
    return {"files": {p.relative_to(version).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(version.rglob("*")) if p.is_file()}}


def write_lineage(version: Path) -> None:
    """The per-instance lineage table a pacs2bids run leaves in its version (pseudonymised UIDs,
    path, SHA-256), as the flow writes it when it pseudonymises (not timed here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pacs2bids.lineage.tables import INSTANCE_SCHEMA, LINEAGE_DIR

    rows = []
    for f in sorted((version / "sourcedata").rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rows.append({"run_id": "bench", "project": "bench", "recorded_at": datetime.now(timezone.utc),
                     "subject": "01", "path": f.relative_to(version).as_posix(), "sha256": sha256_file(f),
                     "pseudo_study_uid": str(ds.StudyInstanceUID), "pseudo_series_uid": str(ds.SeriesInstanceUID),
                     "pseudo_sop_instance_uid": str(ds.SOPInstanceUID)})
    (version / LINEAGE_DIR).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA), version / LINEAGE_DIR / "instances-bench.parquet")


def plain(method: str, pacs: Orthanc, version: Path, files: list[str]) -> tuple[float, int]:
    """Every file sent once with the library alone; returns seconds and bytes."""
    started = time.monotonic()
    if method == "dicomweb":
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(pacs.dicomweb_url)
        client.set_http_retry_params(retry=False)
        for i in range(0, len(files), 50):
            client.store_instances([pydicom.dcmread(version / f) for f in files[i:i + 50]])
    else:
        from pynetdicom import AE

        ae = AE(ae_title="PLAIN")
        headers = [pydicom.dcmread(version / f, stop_before_pixels=True) for f in files]
        for pair in sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers}):
            ae.add_requested_context(*pair)
        assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
        for f in files:
            assert assoc.send_c_store(version / f).Status == 0
        assoc.release()
    return time.monotonic() - started, sum((version / f).stat().st_size for f in files)


def run(method: str, version: Path, studies: int, more: int, files: list[Path], with_lineage: bool = True) -> None:
    paths = dicom_paths(version, manifest(version))
    with Orthanc() as a:
        seconds, size = plain(method, a, version, paths)
    print(f"{method:8} plain    {seconds:7.2f} s  {len(paths):5d} instances  {size / 1e6:7.1f} MB")
    with Orthanc() as pacs:
        if method == "dicomweb":
            spec = DicomwebTargetSettings(kind="dicomweb", name="bench", url=pacs.dicomweb_url)
        else:
            spec = DimseTargetSettings(kind="dimse", name="bench", host="127.0.0.1", port=pacs.dicom_port,
                                       ae_title=pacs.aet)
        target = ResearchPacsTarget(spec)
        listed = manifest(version)
        first = target.publish(version, listed)
        print(f"{method:8} first    {first.seconds:7.2f} s  {first.sent_files:5d} instances  "
              f"{first.sent_bytes / 1e6:7.1f} MB  ({first.seconds / seconds:.2f} x plain)")
        noop = target.publish(version, listed)
        print(f"{method:8} no-op    {noop.seconds:7.2f} s  {noop.sent_files:5d} instances  "
              f"{noop.sent_bytes / 1e6:7.1f} MB  ({noop.skipped_files} already held)")
        grown = version.parent / f"{version.name}-plus"
        shutil.copytree(version, grown)
        add_studies(grown, files, studies + 1, more)
        if with_lineage:
            write_lineage(grown)
        plus = target.publish(grown, manifest(grown))
        print(f"{method:8} +{more:<6d}  {plus.seconds:7.2f} s  {plus.sent_files:5d} instances  "
              f"{plus.sent_bytes / 1e6:7.1f} MB  ({plus.skipped_files} already held)")
        shutil.rmtree(grown)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--more", type=int, default=5)
    ap.add_argument("--method", choices=["dicomweb", "dimse", "both"], default="both")
    ap.add_argument("--no-lineage", action="store_true",
                    help="a version without its per-instance lineage table (every header is read)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rpacs-") as tmp:
        work = Path(tmp)
        files = template(work)
        version = work / "versions" / "run-1"
        add_studies(version, files, 1, args.studies)
        if not args.no_lineage:
            write_lineage(version)
        print(f"{args.studies} studies of {len(files)} instances; methods: {args.method}")
        for method in (["dicomweb", "dimse"] if args.method == "both" else [args.method]):
            run(method, version, args.studies, args.more, files, not args.no_lineage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
