"""The project spec: validated on load, errors name the key, secrets never leak."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs2bids.config import load_spec
from pacs2bids.errors import SpecError

ENV = {"PACS2BIDS_PROJECT_SECRET": "s" * 32}


def write_spec(tmp_path: Path, body: str, inclusions: str = "patient_id,subject\nP1,001\n") -> Path:
    (tmp_path / "inclusions.csv").write_text(inclusions)
    p = tmp_path / "spec.yaml"
    p.write_text(body)
    return p


BASE = """\
project: epilepsy-2026
pacs:
  dimse: {ae_title: PACS, host: 127.0.0.1, port: 4242, calling_ae_title: PACS2BIDS, retrieve: c-get}
selection:
  inclusions: inclusions.csv
pseudonymization:
  secret_env: PACS2BIDS_PROJECT_SECRET
heuristic: auto
output: ./out/epilepsy-2026
"""


def test_valid_spec_resolves_relative_paths_and_reads_inclusions(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE), environ=ENV)
    assert spec.output == (tmp_path / "out" / "epilepsy-2026").resolve()
    assert spec.selection.inclusions == (tmp_path / "inclusions.csv").resolve()
    assert [(i.subject, i.patient_id) for i in spec.inclusions] == [("001", "P1")]
    assert spec.pacs.chosen == "dimse"
    assert spec.resolved_work_dir.parent == spec.output.parent
    assert not str(spec.resolved_key_store).startswith(str(spec.output))


def test_secret_is_never_in_repr_or_public_dict(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE), environ=ENV)
    assert "s" * 32 not in repr(spec)
    assert "s" * 32 not in str(spec.public_dict())
    assert "P1" not in repr(spec.inclusions) and "P1" not in str(spec.public_dict())


def test_unknown_key_is_named(tmp_path):
    body = BASE.replace("retrieve: c-get", "retrieve: c-get, portt: 1")
    with pytest.raises(SpecError, match=r"pacs\.dimse\.portt: unknown key"):
        load_spec(write_spec(tmp_path, body), environ=ENV)


def test_missing_secret_names_the_variable(tmp_path):
    with pytest.raises(SpecError, match="PACS2BIDS_PROJECT_SECRET is not set"):
        load_spec(write_spec(tmp_path, BASE), environ={})


def test_short_secret_refused(tmp_path):
    with pytest.raises(SpecError, match="shorter than 16"):
        load_spec(write_spec(tmp_path, BASE), environ={"PACS2BIDS_PROJECT_SECRET": "short"})


def test_bad_inclusions_path_names_the_key(tmp_path):
    body = BASE.replace("inclusions: inclusions.csv", "inclusions: nowhere.csv")
    with pytest.raises(SpecError, match=r"selection\.inclusions: cannot read .*nowhere\.csv"):
        load_spec(write_spec(tmp_path, body), environ=ENV)


def test_unknown_heuristic_lists_shipped_ones(tmp_path):
    body = BASE.replace("heuristic: auto", "heuristic: nosuch")
    with pytest.raises(SpecError, match="no heuristic named 'nosuch'"):
        load_spec(write_spec(tmp_path, body), environ=ENV)


def test_missing_pacs_transport(tmp_path):
    body = BASE.replace(
        "  dimse: {ae_title: PACS, host: 127.0.0.1, port: 4242, calling_ae_title: PACS2BIDS, retrieve: c-get}\n",
        "  {}\n",
    )
    with pytest.raises(SpecError, match="pacs"):
        load_spec(write_spec(tmp_path, body), environ=ENV)


def test_dicomweb_spec(tmp_path):
    body = BASE.replace(
        "  dimse: {ae_title: PACS, host: 127.0.0.1, port: 4242, calling_ae_title: PACS2BIDS, retrieve: c-get}",
        "  dicomweb: {url: http://127.0.0.1:8042/dicom-web/}",
    )
    spec = load_spec(write_spec(tmp_path, body), environ=ENV)
    assert spec.pacs.chosen == "dicomweb" and spec.pacs.dicomweb.url.endswith("/dicom-web")


@pytest.mark.parametrize(
    "csv_text, message",
    [
        ("patient_id,subject\nP1,0-1\n", "row 2: subject must be letters and digits"),
        ("patient_id,subject\n,001\n", "row 2: give a patient_id or an accession_number"),
        ("name,subject\nP1,001\n", "needs a 'subject' column and a 'patient_id'"),
        ("patient_id,subject\nP1,001\nP1,002\n", "row 3 repeats row 2"),
    ],
)
def test_inclusion_errors_name_the_row(tmp_path, csv_text, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, BASE, csv_text), environ=ENV)


def test_inclusions_accept_prefixes_sessions_and_accession_numbers(tmp_path):
    csv_text = "accession_number;subject;session\nA1;sub-007;ses-02\n"
    spec = load_spec(write_spec(tmp_path, BASE, csv_text), environ=ENV)
    (inc,) = spec.inclusions
    assert (inc.accession_number, inc.subject, inc.session, inc.patient_id) == ("A1", "007", "02", None)


def test_old_study_limit_is_refused_with_its_replacement(tmp_path):
    body = BASE.replace("retrieve: c-get}\n", "retrieve: c-get}\n  max_concurrent_studies: 3\n")
    with pytest.raises(SpecError, match=r"pacs: .*max_concurrent_studies.*pacs\.max_associations"):
        load_spec(write_spec(tmp_path, body), environ=ENV)
    body = BASE.replace("retrieve: c-get}\n", "retrieve: c-get}\n  max_associations: 3\n")
    assert load_spec(write_spec(tmp_path, body), environ=ENV).pacs.max_associations == 3
