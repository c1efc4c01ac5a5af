"""What remote staging costs (issue 14): the sample extracted through a staging store beside the same run
without one, in one process run (Orthanc and SeaweedFS on loopback, the thread runner).

    nice .venv/bin/python benchmarks/bench_staging.py [--rounds 2]

Each round runs the project without ``staging:`` (studies write into the flow's work folder) and with it
(each study in its own scratch, its part uploaded to S3, the flow assembling it), alternating, and prints
the seconds of each run, the time spent uploading parts and assembling them, the bytes staged, and the
ratio staged / shared.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_spec  # noqa: E402

from pacs2bids import staging  # noqa: E402
from pacs2bids.demo import sample_patients  # noqa: E402
from pacs2bids.dicomfiles import iter_dicom_files  # noqa: E402
from pacs2bids.orthanc import Orthanc  # noqa: E402
from pacs2bids.testing_servers import SeaweedS3  # noqa: E402

SECRET = "bench-staging-0123456789abcdef"


def _wrap(module, name: str, spent: dict) -> None:
    """Time every call of ``module.<name>`` (summed)."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        t0 = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.monotonic() - t0

    setattr(module, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.INFO)
    from prefect.testing.utilities import prefect_test_harness

    from pacs2bids.flows import extract
    from pacs2bids.flows.extract import extract_project

    sample = Path(str(resources.files("pacs2bids") / "data" / "sample"))
    os.environ["PACS2BIDS_PROJECT_SECRET"] = SECRET
    spent: dict[str, float] = {}
    _wrap(staging, "upload_part", spent)
    _wrap(extract, "assemble", spent)
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        tmp = Path(tmp)
        s3 = SeaweedS3(tmp / "seaweed").start()
        pacs = Orthanc(workdir=tmp / "orthanc", dicomweb=False).start()
        try:
            s3.make_bucket("staging")
            os.environ.update({"B_KEY": s3.access_key, "B_SECRET": s3.secret_key, "PACS2BIDS_SCRATCH": str(tmp / "w")})
            pacs.upload(iter_dicom_files(sample))
            rows = "patient_id,subject\n" + "".join(f"{p},{n:02d}\n" for n, p in enumerate(sample_patients(sample), 1))
            store = (f"{{url: 's3://staging/runs', endpoint_url: '{s3.endpoint}', access_key_id_env: B_KEY, "
                     "secret_access_key_env: B_SECRET}")
            times: dict[str, list[float]] = {"shared": [], "staged": []}
            for r in range(args.rounds):
                for kind in ("shared", "staged"):
                    folder = tmp / f"{kind}-{r}"
                    folder.mkdir()
                    keys = {"staging": store} if kind == "staged" else {}
                    path = write_spec(folder, rows, project="bench", pacs=pacs, output=str(folder / "ds"), **keys)
                    t0 = time.monotonic()
                    summary = extract_project(str(path))
                    times[kind].append(time.monotonic() - t0)
                    assert summary["published"] and not summary["study_failures"], summary["errors"]
            staged_bytes = sum(p.stat().st_size for p in (tmp / "staged-0" / "ds").resolve().rglob("*") if p.is_file())
        finally:
            pacs.stop()
            s3.kill()
    shared, staged = sum(times["shared"]), sum(times["staged"])
    print(f"sample, {args.rounds} round(s), thread runner; dataset {staged_bytes / 1e6:.1f} MB")
    print("shared (no staging): " + ", ".join(f"{t:.1f} s" for t in times["shared"]))
    print("staged (S3):         " + ", ".join(f"{t:.1f} s" for t in times["staged"]))
    print(f"  of which uploading parts {spent.get('upload_part', 0) / args.rounds:.2f} s (summed over studies, "
          f"in parallel), assembling {spent.get('assemble', 0) / args.rounds:.2f} s per run")
    print(f"ratio staged / shared: {staged / shared:.2f}")


if __name__ == "__main__":
    main()
