"""Per-series provenance records (requirements P8, Q3, S5; BIDS derivatives-style GeneratedBy).

One JSON file per converted series, kept under the dataset's private ``.pacs2bids/`` folder:
pseudonymised UIDs only, the instance count, the sha256 of every output, the versions of the
tool chain, the heuristic's sha256, the flow run id and timestamps.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from pacs2bids.heuristic_path import heuristic_file, heuristic_sha256
from pacs2bids.checksum import sha256_file
from pacs2bids.versions import tool_versions

SCHEMA = "pacs2bids.series-provenance/1"


def _iso(t) -> str | None:
    if t is None:
        return None
    return t.isoformat() if isinstance(t, datetime) else str(t)


def write_series_provenance(path: Path, *, pseudo_study_uid: str, pseudo_series_uid: str,
                            instance_count: int, outputs: list[Path], bids_root: Path, heuristic: str,
                            flow_run_id: str | None, started, finished, extra: dict) -> Path:
    """Write the provenance JSON of one series at ``path`` (atomically) and return ``path``.

    ``outputs`` are files of the dataset (absolute, or relative to ``bids_root``); each is
    recorded by its path relative to ``bids_root`` and its sha256. ``heuristic`` is a shipped
    heuristic name or a path. ``extra`` is merged under ``"extra"`` and must be JSON-serialisable
    and free of identifiers. Raises FileNotFoundError if an output or the heuristic is missing.
    """
    bids_root = Path(bids_root)
    files = []
    for out in outputs:
        p = Path(out)
        absolute = p if p.is_absolute() else bids_root / p
        files.append({"path": absolute.relative_to(bids_root).as_posix(), "sha256": sha256_file(absolute),
                      "size": absolute.stat().st_size})
    heur = heuristic_file(heuristic)
    record = {
        "schema": SCHEMA,
        "study_instance_uid": pseudo_study_uid,
        "series_instance_uid": pseudo_series_uid,
        "instance_count": int(instance_count),
        "outputs": sorted(files, key=lambda f: f["path"]),
        "versions": tool_versions(),
        "heuristic": {"name": heur.stem, "sha256": heuristic_sha256(heuristic)},
        "flow_run_id": flow_run_id,
        "started": _iso(started),
        "finished": _iso(finished),
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
