"""Validate a BIDS dataset with the BIDS validator (``bids-validator-deno``, schema-based v3)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pacs2bids.childenv import child_env
from pacs2bids.errors import ValidationFailed

log = logging.getLogger(__name__)
VALIDATOR = "bids-validator-deno"
TIMEOUT_S = 900


@dataclass
class ValidationReport:
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    ok: bool = True

    def summary(self, limit: int = 20) -> str:
        lines = [f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"]
        for e in self.errors[:limit]:
            lines.append(f"  {e['code']}: {e.get('location') or '-'} {e.get('message', '')[:200]}")
        return "\n".join(lines)

    def warning_counts(self) -> list[str]:
        """One line per warning code, with how many places it was raised at (for the run summary)."""
        counts = Counter(w.get("code") or w.get("key") or "?" for w in self.warnings)
        return [f"{code} ({n} place{'s' if n > 1 else ''})" for code, n in counts.most_common()]

    def check(self) -> None:
        """Raise :class:`ValidationFailed` naming the first errors (the run's refusal to publish)."""
        if self.errors:
            raise ValidationFailed(f"bids-validator found {len(self.errors)} error(s): "
                                   + "; ".join(issue_text(e) for e in self.errors[:10]))


def issue_text(issue: dict) -> str:
    """One validator issue on one line: code, place and the start of its message."""
    code = issue.get("code") or issue.get("key") or "?"
    where = issue.get("location") or issue.get("file") or ""
    msg = " ".join(str(issue.get("message") or issue.get("reason") or "").split())
    return f"{code} {where} {msg[:160]}".strip()


def _find_validator() -> str:
    exe = shutil.which(VALIDATOR, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        raise FileNotFoundError(
            f"{VALIDATOR} is not installed: run `pip install bids-validator-deno` in this environment")
    return exe


def parse_report(data: dict) -> ValidationReport:
    """Turn the validator's JSON (v3: ``{"issues": {"issues": [...], "codeMessages": {...}}}``)
    into a :class:`ValidationReport`. Issues of severity ``error`` are errors; ``warning`` and
    anything else are warnings. Each issue is ``{code, sub_code, severity, location, message}``."""
    issues_block = data.get("issues", {})
    if isinstance(issues_block, list):  # tolerate a flat list
        issues, messages = issues_block, {}
    else:
        issues = issues_block.get("issues", []) or []
        messages = issues_block.get("codeMessages", {}) or {}
    report = ValidationReport()
    for issue in issues:
        if not isinstance(issue, dict):
            continue
        code = str(issue.get("code", "UNKNOWN"))
        item = {
            "code": code,
            "sub_code": issue.get("subCode"),
            "severity": str(issue.get("severity", "warning")).lower(),
            "location": issue.get("location"),
            "message": (issue.get("issueMessage") or messages.get(code) or "").strip(),
        }
        (report.errors if item["severity"] == "error" else report.warnings).append(item)
    report.ok = not report.errors
    return report


def validate_dataset(bids_root: Path) -> ValidationReport:
    """Run ``bids-validator-deno --format json`` on ``bids_root`` and parse its report.

    Returns a :class:`ValidationReport` (``ok`` is False when the validator reports errors;
    raising is the caller's choice, see :func:`require_valid`). Raises FileNotFoundError naming
    ``pip install bids-validator-deno`` when the validator is missing, and
    :class:`ValidationFailed` when it crashes or prints no JSON.
    """
    bids_root = Path(bids_root)
    if not bids_root.is_dir():
        raise FileNotFoundError(f"no BIDS dataset at {bids_root}")
    cmd = [_find_validator(), "--format", "json", str(bids_root)]
    env = child_env(NO_COLOR="1")  # deno runs with --allow-env --allow-net: never the project key
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ValidationFailed(f"{VALIDATOR} did not finish within {TIMEOUT_S} s on {bids_root}") from exc
    out = proc.stdout
    start = out.find("{")
    try:
        data = json.loads(out[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ValidationFailed(
            f"{VALIDATOR} exited {proc.returncode} without a JSON report on {bids_root}; "
            f"stderr tail:\n{(proc.stderr or out)[-2000:]}")
    report = parse_report(data)
    log.info("BIDS validation of %s: %d error(s), %d warning(s)", bids_root.name, len(report.errors),
             len(report.warnings))
    return report


def require_valid(report: ValidationReport) -> None:
    """Raise :class:`ValidationFailed` listing the errors when ``report`` is not ok."""
    if not report.ok:
        raise ValidationFailed("the dataset is not valid BIDS:\n" + report.summary())
