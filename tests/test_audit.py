"""The re-identification audit (S2; issue 10, item 8): who is the real uid's account, a reason is
required, wrong-secret attempts are recorded, and ``pacs2bids audit SPEC`` finds a line deleted,
edited or moved, naming the first broken entry."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from conftest import write_spec
from pacs2bids.auditchain import GENESIS, line_digest
from pacs2bids.cli import main
from pacs2bids.deid import KeyStore
from pacs2bids.deid.keyed import fernet_key
from pacs2bids.deid.reidentify import AuditRefused
from pacs2bids.errors import PseudonymisationError

SECRET, WRONG = "audit-test-secret-0123456789", "someone-elses-secret-0123456789"
WHY = "data update requested by the ethics board"
ME = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def spec(tmp_path, monkeypatch) -> Path:
    """A project whose key store knows subject 01 (recorded as a pseudonymisation run would)."""
    path = write_spec(tmp_path, "patient_id,subject\nIPP-AUDIT-1,01\n", project="aproj",
                      pacs="{dimse: {ae_title: A, host: 127.0.0.1, port: 1}}",
                      pseudonymization="{secret_env: P2B_AUDIT_SECRET}", output=tmp_path / "out")
    monkeypatch.setenv("P2B_AUDIT_SECRET", SECRET)
    store(tmp_path).record_series("01", patient_ids=["IPP-AUDIT-1"], patient_names=["MARTIN^Audit"], studies={},
                                  identifiers=["IPP-AUDIT-1", "MARTIN^Audit"])
    return path


def store(tmp_path: Path, secret: str = SECRET) -> KeyStore:
    return KeyStore(tmp_path / ".aproj.pacs2bids-keys", project="aproj", secret=secret.encode())


def audit_file(tmp_path: Path) -> Path:
    return tmp_path / ".aproj.pacs2bids-keys" / "audit.jsonl"


def test_who_is_the_real_uids_account_not_logname(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOGNAME", "dr.nobody")
    monkeypatch.setenv("USER", "dr.nobody")
    assert main(["reidentify", str(spec), "sub-01", "--reason", WHY]) == 0
    assert "IPP-AUDIT-1" in capsys.readouterr().out
    (rec,) = store(tmp_path).audit_log()
    assert rec["who"] == ME and rec["uid"] == os.getuid() and rec["claimed_who"] == "dr.nobody"
    assert rec["what"] == "reidentify" and rec["subject"] == "01" and rec["reason"] == WHY
    # the reason is not written in clear (a person may type more than they should)
    assert WHY not in audit_file(tmp_path).read_text()
    monkeypatch.setenv("LOGNAME", ME)
    monkeypatch.setenv("USER", ME)
    assert main(["reidentify", str(spec), "01", "--reason", WHY]) == 0
    assert "claimed_who" not in store(tmp_path).audit_log()[1]


@pytest.mark.parametrize("reason", ["", "   ", "because"])
def test_a_blank_or_short_reason_is_refused_and_recorded(spec, tmp_path, capsys, reason):
    assert main(["reidentify", str(spec), "01", "--reason", reason]) == 2
    captured = capsys.readouterr()
    assert "IPP-AUDIT-1" not in captured.out + captured.err and "at least 10 characters" in captured.err
    (rec,) = store(tmp_path).audit_log()
    assert rec["what"] == "refused (no reason given)" and rec["who"] == ME
    with pytest.raises(AuditRefused):
        store(tmp_path).reidentify("01", reason=reason)


def test_wrong_secret_attempt_is_recorded_and_the_log_stays_verifiable(spec, tmp_path, monkeypatch, capsys):
    assert main(["reidentify", str(spec), "01", "--reason", WHY]) == 0
    monkeypatch.setenv("P2B_AUDIT_SECRET", WRONG)
    assert main(["reidentify", str(spec), "01", "--reason", "guessing the secret, sorry"]) == 1
    captured = capsys.readouterr()
    assert "cannot be decrypted" in captured.err and captured.out.count("IPP-AUDIT-1") == 1
    with pytest.raises(PseudonymisationError):
        store(tmp_path, WRONG).reidentify("01", reason=WHY)
    monkeypatch.setenv("P2B_AUDIT_SECRET", SECRET)
    log = store(tmp_path).audit_log()
    assert [r["what"] for r in log] == ["reidentify", "refused (wrong secret)", "refused (wrong secret)"]
    assert "reason" not in log[1] and len(log[1]["reason_sha256"]) == 64  # not readable, comparable
    assert main(["reidentify", str(spec), "01", "--reason", WHY]) == 0  # the next signed entry seals them
    assert main(["audit", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "audit log intact: 4 entries" in out and out.count("refused (wrong secret)") == 2 and "[unsigned]" in out
    # a wrong secret cannot pass the log off as verified
    monkeypatch.setenv("P2B_AUDIT_SECRET", WRONG)
    assert main(["audit", str(spec)]) == 1
    assert "BROKEN at entry 1" in capsys.readouterr().err


def _four_entries(spec, tmp_path) -> list[str]:
    for subject in ("01", "02", "01", "01"):
        main(["reidentify", str(spec), subject, "--reason", WHY])
    lines = audit_file(tmp_path).read_text().splitlines()
    assert len(lines) == 4 and main(["audit", str(spec)]) == 0
    return lines


@pytest.mark.parametrize("tamper, broken, why", [
    ("delete", 2, "holds entry 3 in the place of entry 2: entries were deleted or moved"),
    ("edit", 3, "does not match its MAC: it was edited"),
    ("reorder", 2, "holds entry 3 in the place of entry 2"),
    ("garbage", 5, "is not a JSON record"),
])
def test_audit_names_the_first_broken_entry(spec, tmp_path, capsys, tamper, broken, why):
    lines = _four_entries(spec, tmp_path)
    if tamper == "delete":
        del lines[1]
    elif tamper == "edit":
        rec = json.loads(lines[2])
        rec["who"] = "dr.nobody"
        lines[2] = json.dumps(rec, sort_keys=True)
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines.append("I was never here")
    audit_file(tmp_path).write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["audit", str(spec)]) == 1
    err = capsys.readouterr().err
    assert f"BROKEN at entry {broken}, which {why}" in err
    with pytest.raises(PseudonymisationError, match=f"entry {broken} "):
        store(tmp_path).audit_log()


def test_rechaining_after_a_deletion_needs_the_key(spec, tmp_path, capsys):
    """Whoever lacks the key may delete an entry and recompute every seq and prev after it: the
    next signed entry's MAC covers its prev, so the deletion is still found."""
    lines = _four_entries(spec, tmp_path)
    del lines[1]
    prev = GENESIS
    for i, line in enumerate(lines):
        rec = json.loads(line)
        rec["seq"], rec["prev"] = i + 1, prev
        lines[i] = json.dumps(rec, sort_keys=True)
        prev = line_digest(lines[i].encode())
    audit_file(tmp_path).write_text("\n".join(lines) + "\n")
    assert main(["audit", str(spec)]) == 1
    assert "BROKEN at entry 2, which does not match its MAC" in capsys.readouterr().err


def test_an_older_unchained_audit_is_sealed_by_the_first_chained_entry(spec, tmp_path, capsys):
    legacy = tmp_path / ".aproj.pacs2bids-keys" / "audit.fernet"
    fernet = Fernet(fernet_key(SECRET.encode(), "aproj"))
    old = {"who": "someone", "when": "2025-01-01T00:00:00+00:00", "what": "reidentify", "subject": "01", "reason": ""}
    legacy.write_bytes(fernet.encrypt(json.dumps(old).encode()) + b"\n")
    assert main(["reidentify", str(spec), "01", "--reason", WHY]) == 0
    capsys.readouterr()
    assert main(["audit", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "someone" in out and "older version, not chained" in out and "intact: 1 entry" in out
    legacy.write_bytes(b"")  # the older records removed
    assert main(["audit", str(spec)]) == 1
    assert "BROKEN at entry 1, which seals audit.fernet" in capsys.readouterr().err


def test_audit_checks_the_quarantine_decisions_too(spec, tmp_path, capsys):
    from pacs2bids.deid.keyed import audit_mac_key
    from pacs2bids.quarantine import DECISIONS, Quarantine, hold

    folder = tmp_path / ".out.pacs2bids-work" / "quarantine"
    (tmp_path / "image.dcm").write_bytes(b"stands for a held image")
    item = hold(folder, "item-1", tmp_path / "image.dcm", "pixels at risk", subject="01", session=None,
                series_folder="001-x")
    q = Quarantine(folder, key=audit_mac_key(SECRET.encode(), "aproj"), known_subjects=store(tmp_path).subjects)
    q.release(item.id, reviewer="dr.martin")
    q.mark_published(item.id, run_id="r1")
    assert main(["audit", str(spec)]) == 0
    assert "quarantine decisions intact: 2 entries" in capsys.readouterr().out
    lines = (folder / DECISIONS).read_text().splitlines()
    (folder / DECISIONS).write_text(lines[1] + "\n")  # the release taken out
    assert main(["audit", str(spec)]) == 1
    assert "chain of decisions is broken at entry 1" in capsys.readouterr().err
