"""Finish a BIDS dataset built by heudiconv: top-level files, and heudiconv's leftovers removed.

heudiconv writes placeholder top-level files full of ``TODO`` (dataset_description.json,
README, CHANGES, task-*_bold.json, events.tsv templates) and its ``.heudiconv/`` tables (with
DICOM header values). ``finalise_dataset`` replaces the former with real content and removes
the latter, keeping each session's ``*_scans.tsv``. BIDS 1.10: dataset_description.json with
``DatasetType: raw`` and ``GeneratedBy``; participants.tsv with its JSON sidecar.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import date
from pathlib import Path

from pacs2bids.bids.scans import update_scans
from pacs2bids.versions import tool_versions

log = logging.getLogger(__name__)
BIDS_VERSION = "1.10.0"
BIDSIGNORE = [".pacs2bids/", "prov", "**/*.log"]  # prov: BEP028 records, unknown to the BIDS 1.11 schema ("prov/" fails)
_PARTICIPANTS_JSON = {
    "participant_id": {"Description": "Pseudonymised subject label (the project's subject code)."},
}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _label(p: str) -> str:
    return p if p.startswith("sub-") else f"sub-{p}"


def _remove_heudiconv_leftovers(root: Path) -> list[str]:
    removed: list[str] = []
    for name in (".heudiconv", ".duecredit.p"):
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
            removed.append(name)
        elif p.exists():
            p.unlink()
            removed.append(name)
    # heudiconv's top-level task templates override the real sidecars with TODO values
    for p in root.glob("task-*_*.json"):
        try:
            meta = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "TODO" in json.dumps(meta) or "HeudiconvVersion" in meta:
            p.unlink()
            removed.append(p.name)
    for p in root.glob("sub-*/**/*_events.tsv"):
        if "TODO" in p.read_text(errors="replace").splitlines()[0]:
            p.unlink()
            removed.append(str(p.relative_to(root)))
    for p in root.glob("sub-*/**/*_heudiconv[0-9][0-9][0-9]*"):
        p.unlink()
        removed.append(str(p.relative_to(root)))
    return removed


def fill_phasediff_echo_times(root: Path) -> list[str]:
    """Give each ``*_phasediff.json`` its EchoTime1/EchoTime2 (BIDS: required) when heudiconv did not.

    When the phase difference and the two magnitudes come as separate series (Siemens XA,
    classic export), dcm2niix writes only EchoTime in each sidecar. The echo times are then taken
    from ``magnitude1``/``magnitude2`` of the same acquisition (same name but the suffix).
    Returns the sidecars changed.
    """
    changed = []
    for pd in sorted(root.glob("sub-*/**/fmap/*_phasediff.json")):
        data = json.loads(pd.read_text())
        if "EchoTime1" in data and "EchoTime2" in data:
            continue
        stem = pd.name[: -len("_phasediff.json")]
        echoes = []
        for n in (1, 2):
            mag = pd.with_name(f"{stem}_magnitude{n}.json")
            if mag.exists():
                echoes.append(json.loads(mag.read_text()).get("EchoTime"))
        if len(echoes) == 2 and all(isinstance(e, (int, float)) for e in echoes) and echoes[0] < echoes[1]:
            data["EchoTime1"], data["EchoTime2"] = echoes
            pd.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            changed.append(pd.relative_to(root).as_posix())
        else:
            log.warning("%s: EchoTime1/EchoTime2 unknown (no magnitude1/magnitude2 echo times)", pd.name)
    return changed


def _readme(name: str, version: str, versions: dict) -> str:
    return (
        f"# {name}\n\n"
        "Pseudonymised MRI data extracted from a clinical PACS for one research project by pacs2bids "
        f"{version}.\n\n"
        "- Identifiers were replaced following DICOM PS3.15 Annex E with project-keyed pseudonyms; the "
        "matching key is kept outside this dataset.\n"
        f"- Images were converted with dcm2niix {versions.get('dcm2niix')} and named from its sidecars (through "
        f"heudiconv {versions.get('heudiconv')} when the project gives a heudiconv heuristic); series that could "
        "not be classified were left out.\n"
        "- `sourcedata/` holds the pseudonymised DICOM copy; `.pacs2bids/` holds provenance and lineage "
        "records (ignored by the BIDS validator).\n"
        "- Functional runs are named `task-unknown` when the task could not be read from the images.\n"
    )


def finalise_dataset(bids_root: Path, *, name: str, participants: list[str], generated_by: dict) -> None:
    """Write the top-level BIDS files of ``bids_root`` and remove heudiconv's leftovers.

    Takes the dataset name, the subject labels (with or without ``sub-``; subjects found on
    disk are added) and a ``GeneratedBy`` entry for pacs2bids (``Name``/``Version`` filled in
    when missing; heudiconv and dcm2niix entries are added). Writes dataset_description.json,
    participants.tsv/.json, README, CHANGES and .bidsignore; keeps every ``*_scans.tsv``.
    Idempotent: a second call changes nothing but CHANGES' date line if the day changed.
    Raises FileNotFoundError if ``bids_root`` does not exist.
    """
    root = Path(bids_root)
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset folder at {root}")
    removed = _remove_heudiconv_leftovers(root)
    if removed:
        log.info("removed heudiconv leftovers: %s", ", ".join(sorted(removed)))
    filled = fill_phasediff_echo_times(root)
    if filled:
        log.info("EchoTime1/EchoTime2 filled from the magnitude images: %s", ", ".join(filled))
    versions = tool_versions()
    ours = {"Name": "pacs2bids", "Version": versions.get("pacs2bids") or "unknown",
            "Description": "PACS query/retrieve, pseudonymisation (DICOM PS3.15 Annex E), dcm2niix conversion named "
                           "from its sidecars (or heudiconv with a project's heuristic)"}
    ours.update(generated_by or {})
    description = {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "GeneratedBy": [
            ours,
            {"Name": "heudiconv", "Version": versions.get("heudiconv") or "unknown"},
            {"Name": "dcm2niix", "Version": versions.get("dcm2niix") or "unknown"},
        ],
    }
    _write(root / "dataset_description.json", json.dumps(description, indent=2) + "\n")

    labels = {_label(p) for p in participants}
    labels |= {p.name for p in root.glob("sub-*") if p.is_dir()}
    rows = ["participant_id"] + sorted(labels)
    _write(root / "participants.tsv", "\n".join(rows) + "\n")
    _write(root / "participants.json", json.dumps(_PARTICIPANTS_JSON, indent=2) + "\n")

    _write(root / "README", _readme(name, ours["Version"], versions))
    changes = root / "CHANGES"
    first = f"1.0.0 {date.today().isoformat()}\n  - Extracted and converted by pacs2bids {ours['Version']}.\n"
    _write(changes, first)
    _write(root / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")
    for scans in root.glob("sub-*/**/*_scans.tsv"):
        update_scans(scans, keep_order=True)  # rows of renamed or removed images go



def derivative_description(name: str, *, generated_by: list[dict], source_datasets: list[dict] | None = None,
                           **extra) -> dict:
    """The ``dataset_description.json`` of a derivative dataset (BIDS 1.10: ``DatasetType: derivative``,
    ``GeneratedBy`` required, ``SourceDatasets``). For a derivative kept under the project dataset's
    ``derivatives/<name>/``, ``source_datasets`` defaults to that dataset (``../../``, linked as ``raw``)."""
    if not generated_by or not all(isinstance(g, dict) and g.get("Name") for g in generated_by):
        raise ValueError(f"derivative dataset {name!r}: GeneratedBy needs at least one entry with a Name")
    description = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
                   "GeneratedBy": generated_by}
    if source_datasets is None:
        description["DatasetLinks"] = {"raw": "../../"}
        source_datasets = [{"URL": "bids:raw:"}]
    description["SourceDatasets"] = source_datasets
    description.update(extra)
    return description


def write_derivative_description(root: Path, name: str, **kwargs) -> Path:
    """Write :func:`derivative_description` into ``root`` (created); returns the file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset_description.json"
    _write(path, json.dumps(derivative_description(name, **kwargs), indent=2) + "\n")
    return path
