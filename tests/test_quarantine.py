"""Quarantine review (P9): files held back are listed, released or rejected by a person, and a
released file is published by the next run, pseudonymised, with its pixels as reviewed.

Burned-in risk is planted into copies of real sample files (BurnedInAnnotation YES, ImageType
SECONDARY); the project turns Clean Pixel Data off, so the pseudonymiser must quarantine them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import write_spec
from pacs2bids.cli import main
from pacs2bids.config import PseudonymizationSettings
from pacs2bids.deid import KeyStore, Pseudonymiser
from pacs2bids.deid.keyed import audit_mac_key
from pacs2bids.deid.profile import DEFAULT_OPTIONS
from pacs2bids.quarantine import DECISIONS, Quarantine, QuarantineError

SECRET = "quarantine-test-secret-0123456789"
WRONG = "not-the-project-secret-0123456789"
NAME, PID = "DURAND^Quarantaine", "QPAT-778899"
NO_PIXEL_CLEANING = [o for o in DEFAULT_OPTIONS if o != "cleanPixelDataOpt"]


def t1_files(sample_dir: Path) -> list[Path]:
    files = sorted((sample_dir / "PACSMAN_data" / "dicomseries").glob("*.dcm"), key=lambda p: int(p.stem[5:]))
    return files


def plant_screen(src: Path, dst: Path, series_uid: str, study_uid: str | None = None) -> Path:
    """A copy of a real MR image flagged as carrying burned-in text, in its own series."""
    ds = pydicom.dcmread(src)
    ds.PatientName, ds.PatientID = NAME, PID
    ds.BurnedInAnnotation = "YES"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 99
    ds.SeriesDescription = "screen save"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def pseudonymiser(tmp_path: Path) -> Pseudonymiser:
    return Pseudonymiser("qproj", SECRET.encode(), PseudonymizationSettings(options=NO_PIXEL_CLEANING), tmp_path / "keys")


def quarantine(tmp_path: Path, secret: str = SECRET, folder: str = "q") -> Quarantine:
    """The quarantine as the CLI opens it: the log key and the key store's check from ``secret``."""
    store = KeyStore(tmp_path / "keys", project="qproj", secret=secret.encode())
    return Quarantine(tmp_path / folder, key=audit_mac_key(secret.encode(), "qproj"), known_subjects=store.subjects)


@pytest.fixture
def held(tmp_path, sample_dir):
    """One at-risk image quarantined by the pseudonymiser, and the quarantine it is in."""
    src = plant_screen(t1_files(sample_dir)[0], tmp_path / "raw" / "a.dcm", generate_uid())
    res = pseudonymiser(tmp_path).pseudonymise_series(
        [src], tmp_path / "out" / "099-abc", subject="07", session="01", quarantine_dir=tmp_path / "q"
    )
    assert not res.written and len(res.quarantined) == 1
    return src, res.quarantined[0][0], quarantine(tmp_path)


def test_quarantined_file_is_listed_with_its_subject_and_reason(held):
    src, item_id, q = held
    item = q.get(item_id)
    assert item.state == "pending" and item.stage == "pseudonymise" and item.releasable
    assert (item.subject, item.session, item.series_folder) == ("07", "01", "099-abc")
    assert "Clean Pixel Data option is off" in item.reason
    assert q.path(item).read_bytes() == src.read_bytes()
    # the description is pseudonymised: it is listed and logged freely
    text = (q.folder / f"{item_id}.json").read_text()
    assert NAME.split("^")[0] not in text and PID not in text


def test_release_is_recorded_and_guards_the_reviewed_bytes(held):
    _, item_id, q = held
    item = q.release(item_id, reviewer="dr.martin", note="no text in the image")
    assert q.get(item_id).state == "released" and [i.id for i in q.released()] == [item_id]
    (decision,) = q.decisions()
    assert decision["who"] == "dr.martin" and decision["action"] == "release" and decision["sha256"] == item.released_sha256
    assert q.check_released(q.get(item_id)) == q.path(item)
    with open(q.path(item), "ab") as f:  # bytes changed after the review
        f.write(b"\0")
    with pytest.raises(QuarantineError, match="changed after it was reviewed"):
        q.check_released(q.get(item_id))


def test_reject_deletes_the_clinical_copy_and_blocks_release(held):
    _, item_id, q = held
    q.reject(item_id, reviewer="dr.martin", note="name in the pixels")
    assert q.get(item_id).state == "rejected" and not q.path(q.get(item_id)).exists()
    with pytest.raises(QuarantineError, match="only a pending item"):
        q.release(item_id, reviewer="dr.martin")


def test_replacement_must_be_the_same_image(held, tmp_path, sample_dir):
    _, item_id, q = held
    other = plant_screen(t1_files(sample_dir)[1], tmp_path / "other.dcm", generate_uid())
    with pytest.raises(QuarantineError, match="another instance"):
        q.release(item_id, reviewer="x", replacement=other)
    cleaned = tmp_path / "cleaned.dcm"
    ds = pydicom.dcmread(q.path(q.get(item_id)))
    arr = ds.pixel_array.copy()
    arr[:10, :] = 0  # the reviewer blacked out a band
    ds.PixelData = arr.tobytes()
    ds.save_as(cleaned)
    item = q.release(item_id, reviewer="x", replacement=cleaned)
    assert q.path(item).read_bytes() == cleaned.read_bytes()


def test_unknown_item_and_retrieval_payloads_cannot_be_released(tmp_path):
    q = quarantine(tmp_path)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "abc-1234.dcm").write_bytes(b"not dicom")
    (tmp_path / "q" / "abc-1234.dcm.reason.txt").write_text("not readable DICOM (InvalidDicomError)\n")
    item = q.get("abc-1234")
    assert item.stage == "retrieve" and not item.releasable
    with pytest.raises(QuarantineError, match="fetch the instance again"):
        q.release("abc-1234", reviewer="x")
    with pytest.raises(QuarantineError, match="quarantine list"):
        q.get("nope")
    q.reject("abc-1234", reviewer="x")
    assert not (tmp_path / "q" / "abc-1234.dcm").exists()


def test_released_file_is_pseudonymised_with_pixels_as_reviewed(held, tmp_path):
    src, item_id, q = held
    q.release(item_id, reviewer="dr.martin")
    path = q.check_released(q.get(item_id))
    res = pseudonymiser(tmp_path).pseudonymise_series(
        [path], tmp_path / "pub", subject="07", session="01", quarantine_dir=tmp_path / "q2", pixels_reviewed=True
    )
    assert len(res.written) == 1 and not res.quarantined
    out, orig = pydicom.dcmread(res.written[0]), pydicom.dcmread(src)
    assert np.array_equal(out.pixel_array, orig.pixel_array)
    assert str(out.PatientName) == "07" and out.SOPInstanceUID != orig.SOPInstanceUID
    raw = res.written[0].read_bytes()
    assert PID.encode() not in raw and b"DURAND" not in raw
    assert "released from quarantine" in json.dumps(res.record)


# -- end to end: quarantined, reviewed, released, published by the next run ----------------------
@pytest.mark.slow
def test_release_then_rerun_publishes_it(prefect_harness, orthanc_factory, sample_dir, tmp_path, monkeypatch, capsys):
    from pacs2bids.flows.extract import extract_project
    from pacs2bids.lineage import read_lineage

    t1 = sorted((sample_dir / "dcm_qa_nih" / "In" / "20180918Si" / "mr_0003").glob("*.dcm"))  # converted by auto
    assert len(t1) == 2
    study_uid, series_uid = generate_uid(), generate_uid()
    (tmp_path / "up").mkdir()
    upload = []
    for i, f in enumerate(t1):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.StudyInstanceUID = NAME, PID, study_uid
        ds.save_as(tmp_path / "up" / f"t1-{i}.dcm")
        upload.append(tmp_path / "up" / f"t1-{i}.dcm")
    upload.append(plant_screen(t1[0], tmp_path / "up" / "screen.dcm", series_uid, study_uid))
    pacs = orthanc_factory()
    assert pacs.upload(upload) == len(upload)
    out = tmp_path / "out" / "ds"
    spec = write_spec(tmp_path, f"patient_id,subject\n{PID},07\n", project="qproj", pacs=pacs,
                      selection="{inclusions: inclusions.csv, modalities: [MR]}",
                      pseudonymization=f"{{secret_env: P2B_Q_SECRET, options: [{', '.join(NO_PIXEL_CLEANING)}]}}",
                      heuristic="auto", output=out, retries="{attempts: 1, backoff_seconds: 0.2}")
    monkeypatch.setenv("P2B_Q_SECRET", SECRET)

    first = extract_project(str(spec))
    assert first["published"] and first["state"] == "completed with failures"
    assert len(first["quarantined"]) == 1 and first["counts"]["files_awaiting_review"] == 1
    item_id = first["quarantined"][0]["file"].split("/")[-1]
    published_before = {p.name for p in (out / "sourcedata").rglob("*.dcm")}

    assert main(["quarantine", "list", str(spec)]) == 0
    listing = capsys.readouterr().out
    assert item_id in listing and "pending" in listing and PID not in listing
    decisions = out.parent / f".{out.name}.pacs2bids-work" / "quarantine" / DECISIONS
    # a wrong secret cannot release (issue 10, item 7): refused, nothing written
    monkeypatch.setenv("P2B_Q_SECRET", WRONG)
    # (the spec is refused as it loads: the published dataset's marker names another key)
    assert main(["quarantine", "release", str(spec), item_id, "--reviewer", "dr.nobody"]) == 2
    assert "published with another key" in capsys.readouterr().err and not decisions.exists()
    monkeypatch.setenv("P2B_Q_SECRET", SECRET)
    # a release written by hand is not published; the run says why
    item = json.loads((decisions.parent / f"{item_id}.json").read_text())
    decisions.write_text(json.dumps({"id": item_id, "action": "release", "who": "dr.martin", "sha256": item["sha256"],
                                     "when": "2026-01-01T00:00:00+00:00", "note": "", "replaced": False}) + "\n")
    forged = extract_project(str(spec))
    (refused,) = forged["released"]
    assert refused["status"].startswith("not included") and "entry 1" in refused["status"]
    assert item_id in refused["status"] and "release it again" in refused["status"]
    assert {p.name for p in (out / "sourcedata").rglob("*.dcm")} == published_before
    assert forged["counts"]["files_awaiting_review"] == 1 and forged["state"] == "completed with failures"

    assert main(["quarantine", "release", str(spec), item_id, "--reviewer", "dr.martin", "--note", "checked"]) == 0
    # a line added after the signed release breaks the chain: the run publishes no release and says where
    signed = decisions.read_text()
    decisions.write_text(signed + json.dumps({"id": "x", "action": "release", "seq": 3, "prev": "0" * 64}) + "\n")
    broken = extract_project(str(spec))
    assert [r["status"] for r in broken["released"]][0].startswith("not included") and len(broken["released"]) == 1
    assert "broken at entry 3" in broken["released"][0]["status"] and broken["state"] == "completed with failures"
    assert {p.name for p in (out / "sourcedata").rglob("*.dcm")} == published_before
    decisions.write_text(signed)  # the reviewer found the intruder's line and took it out

    second = extract_project(str(spec))
    assert second["published"] and second["state"] == "completed"
    assert second["released"] == [{"file": f"sub-07/{item_id}", "status": "included in this run"}]
    assert second["already_published"] >= 1 and second["counts"]["files_awaiting_review"] == 0
    new = [p for p in (out / "sourcedata").rglob("*.dcm") if p.name not in published_before]
    assert len(new) == 1 and new[0].parent.name.startswith("099-")
    ds = pydicom.dcmread(new[0])
    assert str(ds.PatientID) == "07"
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(tmp_path / "up" / "screen.dcm").pixel_array)
    assert PID.encode() not in new[0].read_bytes()
    rows = [r for r in read_lineage(out).to_pylist() if r["convert_status"] == "released"]
    assert [r["path"] for r in rows] == [new[0].relative_to(out).as_posix()]
    q = Quarantine(decisions.parent, key=audit_mac_key(SECRET.encode(), "qproj"))
    received = q.get(item_id).sha256  # taken when the file entered quarantine
    assert q.get(item_id).state == "published" and not q.path(q.get(item_id)).exists()
    # per-instance lineage like any published file, its received checksum keyed with the project key
    from pacs2bids.deid.keyed import Keyed
    from pacs2bids.lineage import instances_of

    _, inst = instances_of(new[0])
    assert len(inst) == 1 and inst[0]["pseudo_sop_instance_uid"] == str(ds.SOPInstanceUID)
    assert inst[0]["received_sha256_hmac"] == Keyed(SECRET.encode(), "qproj").received_digest(received)

    third = extract_project(str(spec))  # nothing left to release: published once only
    assert third["released"] == [] and len(list((out / "sourcedata").rglob("*.dcm"))) == len(published_before) + 1


# -- decisions are authenticated with the project key (issue 10, item 7) -------------------------
def _lines(q: Quarantine) -> list[str]:
    return (q.folder / DECISIONS).read_text().splitlines()


def test_a_wrong_secret_cannot_decide_and_writes_nothing(held, tmp_path):
    _, item_id, q = held
    wrong = quarantine(tmp_path, WRONG)
    with pytest.raises(QuarantineError, match="cannot open the key store"):
        wrong.release(item_id, reviewer="dr.nobody")
    with pytest.raises(QuarantineError, match="cannot open the key store"):
        wrong.reject(item_id, reviewer="dr.nobody")
    assert not (q.folder / DECISIONS).exists() and q.get(item_id).state == "pending"
    # once a chain exists, a wrong key is told by the chain too (here: without the key store's check)
    q.release(item_id, reviewer="dr.martin", note="no text")
    blind = Quarantine(q.folder, key=audit_mac_key(WRONG.encode(), "qproj"))
    with pytest.raises(QuarantineError, match="secret does not verify"):
        blind.reject(item_id, reviewer="dr.nobody")
    assert len(_lines(q)) == 1
    # and no key at all: nothing is read, nothing written
    assert Quarantine(q.folder).released() == []
    with pytest.raises(QuarantineError, match="signed with the project key"):
        Quarantine(q.folder).reject(item_id, reviewer="x")


def test_decision_records_the_os_account_of_the_real_uid(held, monkeypatch):
    import os
    import pwd

    _, item_id, q = held
    monkeypatch.setenv("LOGNAME", "dr.nobody")
    monkeypatch.setenv("USER", "dr.nobody")
    q.release(item_id, reviewer="dr.martin")
    (line,) = _lines(q)
    rec = json.loads(line)
    assert rec["account"] == pwd.getpwuid(os.getuid()).pw_name and rec["uid"] == os.getuid()
    assert rec["claimed_account"] == "dr.nobody" and rec["who"] == "dr.martin"
    assert rec["seq"] == 1 and len(rec["mac"]) == 64


def test_a_release_written_by_hand_does_not_count_and_is_reported(held):
    _, item_id, q = held
    item = q.get(item_id)
    forged = {"id": item_id, "action": "release", "who": "dr.martin", "when": "2026-01-01T00:00:00+00:00",
              "note": "", "sha256": item.sha256, "replaced": False}
    (q.folder / DECISIONS).write_text(json.dumps(forged) + "\n")  # the attack of the issue
    assert q.get(item_id).state == "pending" and q.released() == []
    (problem,) = q.problems()
    assert "entry 1" in problem and "without MAC" in problem and f"release SPEC {item_id}" in problem
    # the reviewer releases it again with the key: the unsigned line stays, before the chain
    q.release(item_id, reviewer="dr.martin")
    assert [i.id for i in q.released()] == [item_id] and len(_lines(q)) == 2
    # a forged line after the chain (even shaped like a chained one) breaks it: no release counts
    (q.folder / DECISIONS).open("a").write(json.dumps({**forged, "seq": 3, "prev": "0" * 64, "mac": "f" * 64}) + "\n")
    assert q.released() == []  # the release before the break is not published either
    problems = q.problems()
    assert "broken at entry 3" in problems[0] and "no released file is published" in problems[0]
    with pytest.raises(QuarantineError, match="broken at entry 3.*nothing was written"):
        q.reject(item_id, reviewer="dr.martin")


def test_older_unsigned_decisions_withhold_but_never_release(held, tmp_path, sample_dir):
    _, item_id, q = held
    other = pseudonymiser(tmp_path).pseudonymise_series(
        [plant_screen(t1_files(sample_dir)[1], tmp_path / "raw" / "b.dcm", generate_uid())],
        tmp_path / "out" / "099-def", subject="07", session="01", quarantine_dir=q.folder,
    ).quarantined[0][0]
    old = [{"id": item_id, "action": "release", "who": "a", "when": "2025-01-01T00:00:00+00:00", "sha256": "x"},
           {"id": other, "action": "reject", "who": "a", "when": "2025-01-01T00:00:00+00:00", "sha256": None}]
    (q.folder / DECISIONS).write_text("".join(json.dumps(r) + "\n" for r in old))
    states = {i.id: i.state for i in q.items()}
    assert states == {item_id: "pending", other: "rejected"}
    assert len(q.problems()) == 1 and item_id in q.problems()[0]


@pytest.mark.parametrize("tamper", ["delete", "edit", "swap"])
def test_chain_names_the_first_broken_decision(held, tamper):
    _, item_id, q = held
    q.release(item_id, reviewer="a", note="first")
    q.mark_published(item_id, run_id="r1")
    q.mark_published(item_id, run_id="r2")
    lines = _lines(q)
    assert q.verification().intact and len(lines) == 3
    if tamper == "delete":
        del lines[1]
    elif tamper == "edit":
        lines[1] = lines[1].replace("run r1", "run r9")
    else:
        lines[1], lines[2] = lines[2], lines[1]
    (q.folder / DECISIONS).write_text("\n".join(lines) + "\n")
    v = q.verification()
    assert v.broken is not None and v.broken.number == 2
    assert [d["note"] for d in q.decisions()] == ["first"]  # only what comes before the break counts
