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


def test_secret_is_never_in_repr(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE), environ=ENV)
    assert "s" * 32 not in repr(spec)
    assert "P1" not in repr(spec.inclusions)


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


# -- locations: nothing the run needs may live inside output, output may not be any folder --------
@pytest.mark.parametrize("extra, key", [
    ("work_dir: ./out/epilepsy-2026/work\n", "work_dir"),
    ("pseudonymization: {key_store: ./out/epilepsy-2026/.keys}\n", "pseudonymization.key_store"),
])
def test_work_dir_or_key_store_inside_output_refused(tmp_path, extra, key):
    body = BASE.replace("pseudonymization:\n  secret_env: PACS2BIDS_PROJECT_SECRET\n", "") + extra
    with pytest.raises(SpecError, match=rf"{key}: .* is inside output .*epilepsy-2026.*Move {key} outside"):
        load_spec(write_spec(tmp_path, body), environ=ENV)


def test_key_store_inside_output_through_a_symlink_refused(tmp_path):
    (tmp_path / "out" / "epilepsy-2026").mkdir(parents=True)
    (tmp_path / "keys").symlink_to(tmp_path / "out" / "epilepsy-2026")
    body = BASE.replace("pseudonymization:\n  secret_env: PACS2BIDS_PROJECT_SECRET\n",
                        f"pseudonymization: {{key_store: {tmp_path}/keys/store}}\n")  # absolute: kept as written
    with pytest.raises(SpecError, match=r"key_store: .*keys/store is inside output"):
        load_spec(write_spec(tmp_path, body), environ=ENV)


def test_output_inside_work_dir_refused(tmp_path):
    body = BASE + "work_dir: ./out\n"
    with pytest.raises(SpecError, match=r"output: .*epilepsy-2026 is inside work_dir"):
        load_spec(write_spec(tmp_path, body), environ=ENV)


@pytest.mark.parametrize("output", ["/", "'~'", "~/", "/etc", "/usr/share/x", "/tmp"])
def test_system_and_home_folders_refused_as_output(tmp_path, output):
    body = BASE.replace("output: ./out/epilepsy-2026", f"output: {output}")
    with pytest.raises(SpecError, match="system folder or the home folder"):
        load_spec(write_spec(tmp_path, body), environ=ENV)


def test_foreign_folder_refused_as_output(tmp_path):
    out = tmp_path / "out" / "epilepsy-2026"
    out.mkdir(parents=True)
    (out / ".env").write_text("TOKEN=x\n")
    with pytest.raises(SpecError, match=r"output: .* holds no pacs2bids marker .* empty or new folder"):
        load_spec(write_spec(tmp_path, BASE), environ=ENV)
    (out / ".env").unlink()
    assert load_spec(write_spec(tmp_path, BASE), environ=ENV)  # empty: accepted


def test_only_this_projects_dataset_may_be_replaced(tmp_path):
    from pacs2bids.publish import write_marker

    out = tmp_path / "out" / "epilepsy-2026"
    out.mkdir(parents=True)
    (out / "dataset_description.json").write_text("{}")
    write_marker(out, "other-project", b"k" * 32)
    with pytest.raises(SpecError, match="another project .'other-project'"):
        load_spec(write_spec(tmp_path, BASE), environ=ENV)
    write_marker(out, "epilepsy-2026", b"another key 0123456789")
    with pytest.raises(SpecError, match="published with another key"):
        load_spec(write_spec(tmp_path, BASE), environ=ENV)
    write_marker(out, "epilepsy-2026", ENV["PACS2BIDS_PROJECT_SECRET"].encode())
    assert "another key" not in (out / ".pacs2bids" / "dataset.json").read_text()
    assert load_spec(write_spec(tmp_path, BASE), environ=ENV).output == out


def test_dataset_of_an_older_pacs2bids_is_accepted_for_its_project_only(tmp_path):
    out = tmp_path / "out" / "epilepsy-2026"
    (out / ".pacs2bids" / "runs").mkdir(parents=True)
    (out / "dataset_description.json").write_text("{}")
    (out / ".pacs2bids" / "runs" / "run-1.json").write_text('{"project": "someone-else"}')
    with pytest.raises(SpecError, match="holds no pacs2bids marker"):
        load_spec(write_spec(tmp_path, BASE), environ=ENV)
    (out / ".pacs2bids" / "runs" / "run-1.json").write_text('{"project": "epilepsy-2026"}')
    assert load_spec(write_spec(tmp_path, BASE), environ=ENV)


def test_output_symlink_is_kept_not_followed(tmp_path):
    """A published output is a symlink to its version: the spec keeps the link's path."""
    (tmp_path / "out" / ".v").mkdir(parents=True)
    (tmp_path / "out" / "epilepsy-2026").symlink_to(".v")
    assert load_spec(write_spec(tmp_path, BASE), environ=ENV).output == tmp_path.resolve() / "out" / "epilepsy-2026"


# -- inclusion rows that split one person or merge two ---------------------------------------------
def test_one_patient_under_two_subjects_refused_even_with_merged_records(tmp_path):
    csv_text = "patient_id,subject,session\nP1,001,01\nP2,002,01\nP1,003,02\n"
    for body in (BASE, BASE.replace("inclusions: inclusions.csv", "inclusions: inclusions.csv\n  merged_records: true")):
        with pytest.raises(SpecError, match=r"rows 2 \(sub-001\), 4 \(sub-003\) give one patient ID to 2 subjects") as e:
            load_spec(write_spec(tmp_path, body, csv_text), environ=ENV)
        assert "P1" not in str(e.value)


def test_one_accession_under_two_subjects_refused(tmp_path):
    csv_text = "accession_number,subject,session\nA1,001,01\nA1,002,02\n"
    with pytest.raises(SpecError, match=r"rows 2 \(sub-001\), 3 \(sub-002\) give one accession number"):
        load_spec(write_spec(tmp_path, BASE, csv_text), environ=ENV)


def test_two_patients_under_one_subject_need_merged_records(tmp_path):
    csv_text = "patient_id,subject,session\nP1,001,01\nP2,001,02\nP3,002,01\n"
    with pytest.raises(SpecError, match=r"rows 2 \(sub-001\), 3 \(sub-001\) give 2 different patient IDs to sub-001"
                                        r".*selection.merged_records: true") as e:
        load_spec(write_spec(tmp_path, BASE, csv_text), environ=ENV)
    assert "P1" not in str(e.value) and "P2" not in str(e.value)
    body = BASE.replace("inclusions: inclusions.csv", "inclusions: inclusions.csv\n  merged_records: true")
    spec = load_spec(write_spec(tmp_path, body, csv_text), environ=ENV)
    assert [(i.subject, i.session) for i in spec.inclusions] == [("001", "01"), ("001", "02"), ("002", "01")]


def test_one_patient_several_sessions_is_fine(tmp_path):
    csv_text = "patient_id,subject,session\nP1,001,01\nP1,001,02\n"
    assert len(load_spec(write_spec(tmp_path, BASE, csv_text), environ=ENV).inclusions) == 2


@pytest.mark.parametrize("secret", [" " * 16, " " * 40, "a b c d e f g h i j k l m n o", "\t" * 20 + "abc"])
def test_blank_or_mostly_blank_secret_refused(tmp_path, secret):
    with pytest.raises(SpecError, match="shorter than 16 non-space characters.*openssl rand") as e:
        load_spec(write_spec(tmp_path, BASE), environ={"PACS2BIDS_PROJECT_SECRET": secret})
    assert secret not in str(e.value) or not secret.strip()


def test_a_selection_regex_that_does_not_compile_is_refused_on_load(tmp_path):
    body = BASE.replace("  inclusions: inclusions.csv\n", "  inclusions: inclusions.csv\n  series_description: '(T1'\n")
    with pytest.raises(SpecError, match="series_description.*not a valid regular expression"):
        load_spec(write_spec(tmp_path, body), environ=ENV)
