"""The leak scan of Parquet files (the lineage tables, which grow with the project): read a batch
at a time, each column's values joined by Arrow, so memory stays flat with the number of rows and
every value of every column type is still searched (issue 12, "memory stays flat")."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from _traced import traced_peak
from pacs2bids.deid import scan_for_leaks
from pacs2bids.deid.leakrules import build_rules

LEAKED = "IPP77881234"
LEAKED_UID = "1.3.12.2.1107.5.2.43.66051.2023041209381234"


def _table(rows: int) -> pa.Table:
    """A table shaped like the lineage's instances (UIDs, paths, digests, sizes), random values."""
    def uid() -> str:
        return "2.25." + str(int.from_bytes(os.urandom(16), "big"))

    return pa.table({
        "pseudo_sop_instance_uid": [uid() for _ in range(rows)],
        "path": [f"sourcedata/sub-{i // 200:03d}/ses-1/{os.urandom(8).hex()}.dcm" for i in range(rows)],
        "sha256": [os.urandom(32).hex() for _ in range(rows)],
        "received_sha256_hmac": pa.array([os.urandom(32).hex() for _ in range(rows)], pa.large_string()),
        "size": pa.array(range(rows), pa.int64()),
        "transport": pa.array(["wado-rs"] * rows).dictionary_encode(),
    })


def test_a_big_table_is_scanned_with_memory_bounded_by_a_batch(tmp_path):
    """60,000 rows (a lineage table at 20 copies of the shared corpus): the Python memory of the scan stays
    under 8 MB while the file is over 10 MB (the whole file read into memory, then every value as a Python
    object: 25 MB here, 64 MB at 108,600 rows). A value in the last row is still found."""
    root = tmp_path / "ds" / ".pacs2bids" / "lineage"
    root.mkdir(parents=True)
    table = _table(60_000)
    paths = table.column("path").to_pylist()
    paths[-1] = f"sourcedata/{LEAKED}/x.dcm"
    table = table.set_column(1, "path", pa.array(paths))
    path = root / "instances-x.parquet"
    pq.write_table(table, path, row_group_size=4096)
    assert path.stat().st_size > 10e6
    del table, paths
    rules = build_rules([LEAKED, LEAKED_UID])
    scan_for_leaks(tmp_path / "ds", build_rules(["warm-up-only"]))  # imports, Arrow's first use
    hits, peak = traced_peak(scan_for_leaks, tmp_path / "ds", rules)
    assert {h.field for h in hits} == {"column path", "statistics"}, hits
    assert peak < 8e6, f"the scan of a {path.stat().st_size / 1e6:.0f} MB table took {peak / 1e6:.0f} MB"


def test_every_column_type_is_searched(tmp_path):
    """Values are joined as text by Arrow: strings, large strings, binary, dictionaries, numbers and
    timestamps by their text; nested lists through Python. A planted identifier is found in each."""
    root = tmp_path / "ds"
    root.mkdir()
    n = 5000
    filler = [os.urandom(16).hex() for _ in range(n)]

    def planted(i: int, value: str) -> list[str]:
        return [value if j == i else f for j, f in enumerate(filler)]

    columns = {
        "string": pa.array(planted(4999, f"x {LEAKED} y")),
        "large": pa.array(planted(10, LEAKED), pa.large_string()),
        "binary": pa.array([v.encode() for v in planted(4097, LEAKED)], pa.binary()),
        "dictionary": pa.array(planted(3, LEAKED)).dictionary_encode(),
        "number": pa.array([7788123400 if j == 4500 else j for j in range(n)], pa.int64()),
        "nested": pa.array([[f, LEAKED if j == 4100 else f] for j, f in enumerate(filler)]),
        "clean": pa.array(filler),
    }
    pq.write_table(pa.table(columns), root / "t.parquet", row_group_size=1000, write_statistics=False)
    hits = scan_for_leaks(root, [LEAKED, "7788123400"])
    assert {h.field for h in hits} == {f"column {c}" for c in columns if c != "clean"}, hits
    assert all(h.path == "t.parquet" and h.kind == "parquet" for h in hits)


def test_a_parquet_file_is_told_by_its_content_at_any_size(tmp_path):
    """A Parquet file named otherwise is still read as a table (its compressed pages are never searched as
    raw bytes), and a file that only starts with the magic is scanned as bytes."""
    root = tmp_path / "ds"
    root.mkdir()
    pq.write_table(pa.table({"p": [f"a/{LEAKED}/b", "c"]}), root / "table.bin", write_statistics=False)
    (root / "fake.bin").write_bytes(b"PAR1 not a table " + LEAKED_UID.encode())
    hits = {(h.path, h.field, h.kind) for h in scan_for_leaks(root, [LEAKED, LEAKED_UID])}
    assert hits == {("table.bin", "column p", "parquet"), ("fake.bin", "content", "text")}, hits


def test_the_file_is_not_read_whole(tmp_path, monkeypatch):
    """The Parquet reader is given the open file, not its bytes: no read of the whole file at once."""
    root = tmp_path / "ds"
    root.mkdir()
    pq.write_table(_table(20_000), root / "t.parquet", row_group_size=4096)
    size = (root / "t.parquet").stat().st_size
    sizes: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self._fh = fh

        def read(self, n=-1):
            data = self._fh.read(n)
            sizes.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def counting_open(p, mode="r", *a, **k):
        fh = real_open(p, mode, *a, **k)
        return Counting(fh) if Path(p).name == "t.parquet" else fh

    monkeypatch.setattr("builtins.open", counting_open)
    assert scan_for_leaks(root, [LEAKED]) == []
    assert sizes and max(sizes) < size / 2, (size, sorted(sizes)[-3:])


def test_a_table_that_cannot_be_decoded_fails_the_scan_naming_the_file(tmp_path):
    """A page that cannot be decoded, after the first batches: the scan raises, naming the file (not the column
    it was reading), for a scan that cannot read must not pass."""
    import pytest

    root = tmp_path / "ds"
    root.mkdir()
    path = root / "instances-run.parquet"
    pq.write_table(_table(12_000), path, row_group_size=4096, write_statistics=False)
    meta = pq.ParquetFile(path).metadata
    last = meta.row_group(meta.num_row_groups - 1).column(2)  # sha256, last row group
    start = last.data_page_offset
    with open(path, "r+b") as fh:
        fh.seek(start + 64)
        fh.write(b"\xff" * (last.total_compressed_size - 128))
    with pytest.raises(OSError, match="instances-run.parquet"):
        scan_for_leaks(root, [LEAKED])
