"""Find a heudiconv heuristic by name (shipped in heuristics/) or by path."""

from __future__ import annotations

import hashlib
from pathlib import Path


def heuristic_file(name_or_path: str) -> Path:
    """Return the heuristic module's file. Raises FileNotFoundError listing what is shipped."""
    p = Path(name_or_path)
    if p.suffix == ".py" or "/" in name_or_path:
        if not p.is_file():
            raise FileNotFoundError(f"no heuristic file at {p}")
        return p
    from pacs2bids import heuristics

    folder = Path(heuristics.__file__).parent
    candidate = folder / f"{name_or_path}.py"
    if not candidate.is_file():
        shipped = sorted(f.stem for f in folder.glob("*.py") if not f.stem.startswith("_"))
        raise FileNotFoundError(f"no heuristic named {name_or_path!r}; shipped: {', '.join(shipped) or 'none'}")
    return candidate


#: The modules whose source decides the names of ``auto`` (classifier, its facts and rules, the
#: session judgement and the dcm2niix run it reads, and the BIDS naming and placement).
AUTO_NAMING_MODULES = ("pacs2bids.convert.facts", "pacs2bids.convert.rules", "pacs2bids.convert.classify",
                       "pacs2bids.convert.dcm2niix", "pacs2bids.convert.auto", "pacs2bids.bids.names",
                       "pacs2bids.bids.layout")


def heuristic_sha256(name_or_path: str, sidecar_fields: dict | None = None) -> str:
    """sha256 of what names the outputs: the heuristic file, or for ``auto`` (no heudiconv
    heuristic) the sources of :data:`AUTO_NAMING_MODULES` and the spec's ``sidecar_fields``
    (given fields can make a left-out image publishable)."""
    if name_or_path in ("auto", "", None):
        import importlib
        import json

        digest = hashlib.sha256()
        for name in AUTO_NAMING_MODULES:
            digest.update(Path(importlib.import_module(name).__file__).read_bytes())
        if sidecar_fields:
            digest.update(json.dumps(sidecar_fields, sort_keys=True).encode())
        return digest.hexdigest()
    return hashlib.sha256(heuristic_file(name_or_path).read_bytes()).hexdigest()
