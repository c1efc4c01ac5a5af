"""0 false blocks on real data, over every transport: ../shared/data/dicom as the scanners wrote it
(nothing planted: its own identities are the ones to find), served by a real Orthanc, extracted once
over DICOMweb and once over C-GET. Its identity attributes hold ordinary words ("DEFAULT" as a
department, "HEAD" as a phantom's name, "Research MRI") and short numbers (StudyID "2339", serials
"17240"): the leak scanner must let the dataset through (issue 9: every DICOMweb run failed closed on
its own lineage table), and what it lets through must hold none of the corpus's distinctive values.
Planted identities are caught: tests/test_leakscan.py and tests/test_extract_e2e.py."""

from __future__ import annotations

import pydicom
import pytest

from pacs2bids.config import load_spec
from pacs2bids.deid import Pseudonymiser, scan_for_leaks
from pacs2bids.deid.leakscan import build_rules
from pacs2bids.dicomfiles import iter_dicom_bytes

from test_extract_e2e import SECRET, run_extraction


def _patient_ids(corpus) -> list[str]:
    ids: set[str] = set()
    for _path, data in iter_dicom_bytes(corpus):
        try:
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True, force=True)
        except Exception:
            continue
        pid = str(ds.get("PatientID", "") or "").strip()
        if pid and "," not in pid and "SeriesInstanceUID" in ds:
            ids.add(pid)
    return sorted(ids)


@pytest.fixture(scope="module")
def corpus_pacs(corpus_dir, tmp_path_factory):
    from pacs2bids.orthanc import Orthanc

    o = Orthanc(workdir=tmp_path_factory.mktemp("orthanc"))
    o.start()
    assert o.upload(data for _p, data in iter_dicom_bytes(corpus_dir)) > 1000
    yield o, _patient_ids(corpus_dir)
    o.stop()


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("transport", ["dicomweb", "c-get"])
def test_corpus_publishes_without_false_blocks(prefect_harness, corpus_pacs, tmp_path, monkeypatch, transport):
    from pacs2bids.pacs import close_pools

    pacs, patient_ids = corpus_pacs
    assert len(patient_ids) >= 8
    out = tmp_path / "out"
    rows = ["patient_id,subject"] + [f"{pid},{n:02d}" for n, pid in enumerate(patient_ids, start=1)]
    (tmp_path / "inclusions.csv").write_text("\n".join(rows) + "\n")
    block = (f"  dicomweb: {{url: {pacs.dicomweb_url}}}\n" if transport == "dicomweb" else
             f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs.dicom_port}, retrieve: c-get}}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "project: corpus-transports\n"
        f"pacs:\n{block}"
        "selection:\n  inclusions: inclusions.csv\n  modalities: [MR, CT, US]\n"  # DEFAULT, HEAD: CT studies
        "pseudonymization: {secret_env: PACS2BIDS_PROJECT_SECRET}\n"
        "heuristic: auto\n"
        f"output: {out}\n"
        "retries: {attempts: 1, backoff_seconds: 0.2}\n"
    )
    try:
        summary = run_extraction(spec, monkeypatch)
    finally:
        close_pools()
    assert summary["published"], [e for e in summary.get("errors", [])] or summary["state"]
    assert not [e for e in summary["errors"] if "identifying value" in e]
    # the corpus's own identities: common words and short numbers among them (what used to block) ...
    loaded = load_spec(spec, environ={"PACS2BIDS_PROJECT_SECRET": SECRET})
    p = Pseudonymiser(loaded.project, loaded.secret_bytes, loaded.pseudonymization, loaded.resolved_key_store)
    ids = p.identifiers()
    rules = build_rules(ids)
    assert {"default", "head", "2339"} <= rules.common, sorted(rules.common)
    # ... and none of them, nor any distinctive one, in the published dataset
    assert scan_for_leaks(out, rules) == []
    assert (out / ".pacs2bids" / "lineage").is_dir() and list((out / ".pacs2bids" / "lineage").glob("instances-*.parquet"))
