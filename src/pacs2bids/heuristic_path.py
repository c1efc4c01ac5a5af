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


def heuristic_sha256(name_or_path: str, sidecar_fields: dict | None = None) -> str:
    """sha256 of what names the outputs: the heuristic file, or for ``auto`` (no heudiconv
    heuristic) the sources of pacs2bids.classify and pacs2bids.convert and the spec's
    ``sidecar_fields`` (given fields can make a left-out image publishable)."""
    if name_or_path in ("auto", "", None):
        import json

        from pacs2bids import classify, convert

        digest = hashlib.sha256()
        for module in (classify, convert):
            digest.update(Path(module.__file__).read_bytes())
        if sidecar_fields:
            digest.update(json.dumps(sidecar_fields, sort_keys=True).encode())
        return digest.hexdigest()
    return hashlib.sha256(heuristic_file(name_or_path).read_bytes()).hexdigest()
