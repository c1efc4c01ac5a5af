"""Free text under Clean Descriptors (issue 10 item 9): descriptors that science does not need
are removed or emptied (Basic profile action); the ones a project keeps
(``pseudonymization.keep_text``, default SeriesDescription and ProtocolName) are cleaned of the
header's identifiers and of phone numbers, e-mail addresses and French NIRs (masked by ``X``).
Planted into copies of a real Siemens file of the bundled sample; what dcm2niix copies into the
NIfTI (``aux_file``) and the sidecar is read from a direct dcm2niix run on the output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import Pseudonymiser
from pacs2bids.deid.patterns import mask_personal_data, nir_key_valid
from pacs2bids.errors import SpecError

SECRET = b"free-text-secret-0123456789abc"
DCM2NIIX = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or "dcm2niix"
THIRD_PARTY = "Gaston Lagaffe"
PHONE = "06 12 34 56 78"
STREET = "12 rue des Lilas"


def _planted(sample_dir: Path, tmp: Path, **extra) -> Path:
    src = sorted((sample_dir / "dcm_qa_nih").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.StudyDescription = f"IRM cerebrale demandee par {THIRD_PARTY}"
    ds.ImageComments = f"rappeler la patiente au {PHONE}"
    ds.PatientComments = f"habite {STREET}, 69003 Lyon"
    item = Dataset()
    item.RequestedProcedureDescription = f"IRM pour le Dr {THIRD_PARTY}"
    item.RequestedProcedureID = "RP0042"
    ds.RequestAttributesSequence = Sequence([item])
    ds.SeriesDescription = "T1 MPRAGE sag"
    ds.ProtocolName = "t1_mprage 3200 1.5T 0.9mm"
    for k, v in extra.items():
        setattr(ds, k, v)
    f = tmp / "in" / "planted.dcm"
    f.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(f)
    return f


def _run(tmp: Path, f: Path, **settings) -> pydicom.Dataset:
    p = Pseudonymiser("text", SECRET, PseudonymizationSettings(**settings), tmp / "keys")
    res = p.pseudonymise_series([f], tmp / "out", subject="01", session=None, quarantine_dir=tmp / "q")
    assert len(res.written) == 1
    return res.written[0]


def _dcm2niix(folder: Path, tmp: Path) -> tuple[str, dict, bytes]:
    dst = tmp / "nii"
    dst.mkdir()
    proc = subprocess.run([DCM2NIIX, "-b", "y", "-z", "n", "-f", "%s", "-o", str(dst), str(folder)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1000:]
    nii = next(dst.glob("*.nii"))
    aux = nib.load(nii).header["aux_file"].item().decode("latin-1")
    sidecar = json.loads(nii.with_suffix(".json").read_text())
    return aux, sidecar, nii.read_bytes() + nii.with_suffix(".json").read_bytes()


def test_default_removes_descriptors_science_does_not_need(sample_dir, tmp_path):
    out = _run(tmp_path, _planted(sample_dir, tmp_path))
    ds = pydicom.dcmread(out)
    raw = out.read_bytes()
    for text in (THIRD_PARTY, "Lagaffe", PHONE, STREET, "Lilas"):
        assert text.encode() not in raw, text
    assert "StudyDescription" not in ds and "ImageComments" not in ds and "PatientComments" not in ds
    # the sequence is walked; its free text goes, its other attributes stay
    assert "RequestedProcedureDescription" not in ds.RequestAttributesSequence[0]
    # ordinary text of the kept descriptors is left exactly as it was
    assert ds.SeriesDescription == "T1 MPRAGE sag"
    assert ds.ProtocolName == "t1_mprage 3200 1.5T 0.9mm"
    aux, sidecar, blob = _dcm2niix(out.parent, tmp_path)
    assert PHONE not in aux and "ImageComments" not in sidecar
    assert PHONE.encode() not in blob and b"Lagaffe" not in blob
    assert sidecar["SeriesDescription"] == "T1 MPRAGE sag"


def test_kept_descriptors_are_cleaned_of_contact_data_and_nir(sample_dir, tmp_path):
    comments = ("tel 06 12 34 56 78 ou +33 4 72 11 22 33, mail jean.dupont@chu-lyon.fr, "
                "NIR 1 84 12 76 451 089 46 / 255082A00410191")
    f = _planted(sample_dir, tmp_path, ImageComments=comments,
                 StudyDescription="IRM cerebrale contact secretariat@hopital.example.org")
    out = _run(tmp_path, f, keep_text=["SeriesDescription", "ProtocolName", "StudyDescription", "ImageComments"])
    ds = pydicom.dcmread(out)
    assert ds.ImageComments.startswith("tel XXXXXXXXXXXXXX ou XXXXXXXXXXXXXXXXX, mail XXXX")
    for text in ("06 12 34 56 78", "72 11 22 33", "jean.dupont", "chu-lyon", "451 089", "2A004101"):
        assert text not in ds.ImageComments, text
    assert ds.StudyDescription == "IRM cerebrale contact " + "X" * len("secretariat@hopital.example.org")
    assert ds.SeriesDescription == "T1 MPRAGE sag" and ds.ProtocolName == "t1_mprage 3200 1.5T 0.9mm"
    aux, sidecar, blob = _dcm2niix(out.parent, tmp_path)
    assert b"06 12 34 56 78" not in blob and b"jean.dupont" not in blob
    assert sidecar.get("ImageComments", "").startswith("tel XXXX")


def test_the_name_of_a_third_party_goes_with_the_descriptor_unless_kept(sample_dir, tmp_path):
    """A third party's name is no header value and has no pattern: only removing the descriptor
    protects it, which is why StudyDescription is not kept by default."""
    out = _run(tmp_path, _planted(sample_dir, tmp_path), keep_text=["StudyDescription"])
    assert THIRD_PARTY in str(pydicom.dcmread(out).StudyDescription)  # kept on the project's request
    assert "SeriesDescription" not in pydicom.dcmread(out)  # not listed: removed (Basic profile X)


@pytest.mark.parametrize("keyword", ["PatientName", "NoSuchKeyword", "RequestAttributesSequence", "Modality"])
def test_keep_text_names_only_free_text_descriptors(tmp_path, keyword):
    from pacs2bids.deid.profile import Profile

    with pytest.raises(SpecError, match=f"keep_text: '{keyword}' is not a free-text descriptor"):
        Profile(keep_text=[keyword])
    with pytest.raises(ValueError, match="is not a free-text descriptor"):  # pydantic's, at spec load
        PseudonymizationSettings(keep_text=[keyword])


def test_keep_text_default():
    assert PseudonymizationSettings().keep_text == ["SeriesDescription", "ProtocolName"]


@pytest.mark.parametrize(
    "text",
    ["T1 MPRAGE sag", "3200", "1.5T", "TR 2300 TE 2.98 TI 900", "ep2d_diff_mddw_30_p2 b1000", "MPR 1x1x1 0.9 mm",
     "2018-09-18", "1.3.12.2.1107.5.2.43.66044", "FOV 256*256 slice 1/176", "AX T2 FLAIR 5mm 20 slices",
     "0.5 1.0 1.5 2.0 2.5", "NIR 1 84 12 76 451 089 47"],  # the last: a wrong key, not a NIR
)
def test_ordinary_text_is_not_masked(text):
    assert mask_personal_data(text) == (text, 0)


@pytest.mark.parametrize(
    "text",
    ["0612345678", "06.12.34.56.78", "06-12-34-56-78", "+33 6 12 34 56 78", "+33(0)6 12 34 56 78", "0033 612345678",
     "+1 (415) 555-2671", "+44 20 7946 0958", "a.b-c@example.co.uk", "184127645108946", "1 84 12 76 451 089 46",
     "2 55 08 2A 004 101 91", "2690518004101"[:5] + "2B004101" + "63"],
)
def test_personal_data_is_masked(text):
    masked, n = mask_personal_data(f"voir {text} merci")
    assert n == 1 and masked == f"voir {'X' * len(text)} merci"


def test_nir_key_with_corsica():
    assert nir_key_valid(("2", "55", "08", "2A", "004", "101", "91"))
    assert nir_key_valid(("2", "69", "05", "2B", "004", "101", "63"))
    assert not nir_key_valid(("2", "55", "08", "2B", "004", "101", "91"))


def test_a_spec_naming_a_non_descriptor_is_refused_at_load(tmp_path):
    from pacs2bids.config import load_spec

    (tmp_path / "inc.csv").write_text("patient_id,subject\nX1,01\n")
    spec = tmp_path / "spec.yaml"
    body = ("project: p\npacs: {dimse: {ae_title: A, host: 127.0.0.1, port: 104}}\n"
            "selection: {inclusions: inc.csv}\noutput: out\n")
    spec.write_text(body + "pseudonymization: {keep_text: [SeriesDescription, PatientName]}\n")
    with pytest.raises(SpecError, match=r"pseudonymization\.keep_text.*'PatientName'"):
        load_spec(spec, environ={"PACS2BIDS_PROJECT_SECRET": "0123456789abcdefgh"})
    spec.write_text(body + "pseudonymization: {keep_text: [SeriesDescription, StudyDescription]}\n")
    loaded = load_spec(spec, environ={"PACS2BIDS_PROJECT_SECRET": "0123456789abcdefgh"})
    assert loaded.pseudonymization.keep_text == ["SeriesDescription", "StudyDescription"]
