"""Reading lineage back: the chain of an output file, the instances of a sourcedata file, as
``pacs2bids lineage PATH`` shows them (the tables themselves: :mod:`pacs2bids.lineage.tables`)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from .tables import INSTANCE_SCHEMA, LINEAGE_DIR, SCHEMA


def read_instances(dataset_root: Path) -> pa.Table:
    """Every run's instance table of a dataset, as one table."""
    files = sorted((dataset_root / LINEAGE_DIR).glob("instances-*.parquet"))
    if not files:
        return INSTANCE_SCHEMA.empty_table()
    return ds.dataset(files, schema=INSTANCE_SCHEMA, format="parquet").to_table()


def instances_of(path: Path) -> tuple[Path, list[dict]]:
    """The instance rows of a sourcedata file, or of every file under a sourcedata folder,
    newest run first."""
    root = find_dataset_root(path)
    rel = path.resolve().relative_to(root).as_posix()
    table = read_instances(root)
    if table.num_rows == 0:
        return root, []
    import pyarrow.compute as pc

    col = table["path"]
    mask = pc.or_(pc.equal(col, rel), pc.starts_with(col, rel.rstrip("/") + "/"))
    rows = table.filter(mask).to_pylist()
    rows.sort(key=lambda r: (r["recorded_at"], r["path"]), reverse=True)
    return root, rows


def format_instances(root: Path, path: Path, rows: list[dict], limit: int = 20) -> str:
    """Human-readable instance rows for ``pacs2bids lineage`` on a sourcedata file or folder."""
    if not rows:
        return f"{path}: no instance record in {root / LINEAGE_DIR}"
    lines = [f"{path}: {len(rows)} instance record(s)"]
    for r in rows[:limit]:
        ses = f" ses-{r['session']}" if r["session"] else ""
        lines += [
            f"  {r['path']}",
            f"    run {r['run_id']} at {r['recorded_at']:%Y-%m-%d %H:%M:%S} UTC, project {r['project']}, "
            f"sub-{r['subject']}{ses}",
            f"    study {r['pseudo_study_uid'] or '-'}, series {r['pseudo_series_uid'] or '-'}, "
            f"instance {r['pseudo_sop_instance_uid'] or '-'} (pseudonymised)",
            f"    file sha256={r['sha256'] or '-'} ({r['size'] if r['size'] is not None else '-'} bytes)",
            f"    received by {r['transport'] or 'unknown transport'}, keyed checksum "
            f"{r['received_sha256_hmac'] or '-'} (HMAC-SHA256 under the project key)",
        ]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)


def find_dataset_root(path: Path) -> Path:
    """The dataset holding ``path``: the nearest parent with a lineage folder."""
    p = path.resolve()
    for candidate in (p, *p.parents):
        if (candidate / LINEAGE_DIR).is_dir():
            return candidate
    raise FileNotFoundError(f"{path} is not inside a pacs2bids dataset (no {LINEAGE_DIR} above it)")


def read_lineage(dataset_root: Path) -> pa.Table:
    """Every run's lineage of a dataset, as one table."""
    folder = dataset_root / LINEAGE_DIR
    files = sorted(folder.glob("run-*.parquet"))
    if not files:
        return SCHEMA.empty_table()
    return ds.dataset(files, schema=SCHEMA, format="parquet").to_table()


def lineage_of(path: Path) -> tuple[Path, list[dict]]:
    """The lineage rows of one file (or of every file of the series it belongs to), newest run first.

    ``path`` may be a NIfTI, sidecar, bval/bvec, a provenance JSON, or a pseudonymised DICOM
    folder under ``sourcedata/``; rows of the same series are returned for a folder.
    """
    root = find_dataset_root(path)
    rel = path.resolve().relative_to(root).as_posix()
    table = read_lineage(root)
    rows = [r for r in table.to_pylist() if r["path"] == rel]
    if not rows:
        # a folder or a file not listed itself: match rows whose path lies under it,
        # or the series that a sibling file (same stem) belongs to
        stem = rel
        for suffix in (".nii.gz", ".nii", ".json", ".bval", ".bvec"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        rows = [
            r
            for r in table.to_pylist()
            if r["path"] and (r["path"].startswith(rel.rstrip("/") + "/") or r["path"].startswith(stem + "."))
        ]
    rows.sort(key=lambda r: r["recorded_at"], reverse=True)
    return root, rows


def instance_counts(dataset_root: Path) -> dict[str, int]:
    """Published sourcedata instances per pseudonymised SeriesInstanceUID (every run)."""
    files = sorted((dataset_root / LINEAGE_DIR).glob("instances-*.parquet"))
    if not files:
        return {}
    table = ds.dataset(files, schema=INSTANCE_SCHEMA, format="parquet").to_table(columns=["pseudo_series_uid", "path"])
    seen: dict[str, set[str]] = {}
    for uid, path in zip(table["pseudo_series_uid"].to_pylist(), table["path"].to_pylist()):
        seen.setdefault(uid, set()).add(path)
    return {uid: len(paths) for uid, paths in seen.items()}


def format_chain(root: Path, path: Path, rows: list[dict], instances: dict[str, int] | None = None) -> str:
    """Human-readable chain for ``pacs2bids lineage``; ``instances`` (from :func:`instance_counts`)
    adds how many sourcedata instances of each series the instance tables record."""
    if not rows:
        return f"{path}: no lineage record in {root / LINEAGE_DIR}"
    lines = [f"{path}"]
    for r in rows:
        ses = f" ses-{r['session']}" if r["session"] else ""
        lines += [
            f"  run {r['run_id']} (Prefect flow run {r['flow_run_id'] or '-'}) at {r['recorded_at']:%Y-%m-%d %H:%M:%S} UTC",
            f"    project {r['project']}, sub-{r['subject']}{ses}",
            f"    study  {r['pseudo_study_uid'] or '-'} (pseudonymised)",
            f"    series {r['pseudo_series_uid'] or '-'} #{r['series_number'] if r['series_number'] is not None else '-'}"
            f" ({r['instances_received']}/{r['instances_announced']} instances)",
            "    stages: "
            + ", ".join(
                f"{s}={r[s + '_status'] or '-'}" for s in ("retrieve", "pseudonymise", "convert", "validate", "publish")
            ),
            f"    file   {r['path']} sha256={r['sha256'] or '-'} ({r['size'] if r['size'] is not None else '-'} bytes)",
            f"    pacs2bids {r['pacs2bids_version']}, heuristic sha256 {r['heuristic_sha256'] or '-'}",
        ]
        if instances is not None and r["pseudo_series_uid"] in instances:
            lines.append(f"    source {instances[r['pseudo_series_uid']]} pseudonymised DICOM instance(s) in sourcedata/, "
                         "each with its received file's keyed checksum (lineage instances-*.parquet)")
        if r["reason"]:
            lines.append(f"    note   {r['reason']}")
    return "\n".join(lines)


def _label(nodes: dict, ident: str) -> str:
    n = nodes.get(ident) or {}
    version = f" {n['Version']}" if n.get("Version") else ""
    return f"{n.get('Label', ident)}{version}"


def _activity_lines(nodes: dict, ident: str, depth: int, seen: set) -> list[str]:
    pad, a = "  " * depth, nodes.get(ident) or {}
    if ident in seen or not a:
        return [f"{pad}activity {ident}"] if not a else []
    seen.add(ident)
    agents = ", ".join(_label(nodes, x) for x in a.get("AssociatedWith") or [])
    lines = [f"{pad}activity {a.get('Label')} by {agents or '-'}",
             f"{pad}  from {a.get('StartedAtTime') or '-'} to {a.get('EndedAtTime') or '-'}"]
    if a.get("Parameters"):
        import json

        lines.append(f"{pad}  parameters {json.dumps(a['Parameters'], sort_keys=True)[:300]}")
    for used in a.get("Used") or []:
        lines += _entity_lines(nodes, used, depth + 1, seen, "used")
    for prior in a.get("InformedBy") or []:
        lines += _activity_lines(nodes, prior, depth + 1, seen)
    return lines


def _entity_lines(nodes: dict, ident: str, depth: int, seen: set, how: str = "entity") -> list[str]:
    pad, e = "  " * depth, nodes.get(ident) or {}
    digest = " ".join(f"{k}={v}" for k, v in (e.get("Digest") or {}).items())
    count = f", {e['InstanceCount']} instance(s)" if e.get("InstanceCount") is not None else ""
    lines = [f"{pad}{how} {ident} ({e.get('Label', '?')}{count}) at {e.get('AtLocation') or '-'} {digest}".rstrip()]
    if e.get("AttributedTo"):
        lines.append(f"{pad}  attributed to {_label(nodes, e['AttributedTo'])}")
    if e.get("GeneratedBy"):
        lines += _activity_lines(nodes, e["GeneratedBy"], depth + 1, seen)
    return lines


def prov_story(path: Path) -> tuple[Path, str | None]:
    """What the dataset's PROV records (``prov/``, :mod:`pacs2bids.provdoc`) say about ``path`` (a file,
    or a sourcedata series folder): the entity, the activity that generated it, what that used, back to
    the retrieval, with agents, tools, times and parameters. None when no record names it."""
    from pacs2bids.provdoc import index, read_records

    root = find_dataset_root(path)
    rel = path.resolve().relative_to(root).as_posix()
    records = read_records(root)
    generated = {}  # an entity's own record: the one saying what generated it (a later stage only uses it)
    for _, doc in records:
        for i, n in index([doc]).items():
            if n["_kind"] != "Entities" or (i in generated and not n.get("GeneratedBy")):
                continue
            generated[i] = n
    for file, doc in reversed(records):  # the newest record naming it wins
        nodes = index([doc])
        hit = next((i for i, n in nodes.items() if n["_kind"] == "Entities" and n.get("AtLocation") == rel), None)
        if hit is None:
            continue
        lines = [f"PROV record {file.relative_to(root).as_posix()} (W3C PROV, BIDS provenance terms):"]
        merged = {**index(d for _, d in records), **nodes}
        merged.update({i: n for i, n in generated.items() if n.get("GeneratedBy") and i != hit})
        lines += _entity_lines(merged, hit, 1, set())
        return root, "\n".join(lines)
    return root, None
