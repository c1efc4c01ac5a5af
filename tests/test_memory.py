"""pacs2bids.memory: what a step freed goes back to the system (each case in a fresh process: the
allocators' state is the process's)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_RSS = """
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
"""

_HELD_FREE = _RSS + """
from pacs2bids.memory import give_back

start = rss()
chunks = [bytes(1000) + i.to_bytes(4, "little") for i in range(150_000)]  # 150 MB from malloc's heap
pin = bytes(8000)  # above them (too big for a hole they left): the heap's top cannot shrink past it
del chunks
held = rss()
give_back()
print(round(held - start), round(rss() - start))
"""


def _run(code: str, *args: str, base: dict | None = None, **env) -> str:
    """``code`` in a fresh process, with ``args``, in ``base`` (default: this environment) and ``env``."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env={**(os.environ if base is None else base), **env})
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux")
def test_give_back_returns_what_malloc_holds_free():
    """Freed objects below a live one stay in glibc's heap, counted in RSS: give_back returns them."""
    held, after = map(int, _run(_HELD_FREE).split())
    assert held > 100, f"the freed 150 MB were expected to stay in the heap (held {held} MB)"
    assert after < held / 4, f"give_back left {after} of {held} MB"


_LARGE_BLOCKS = _RSS + """
import sys
from pacs2bids.memory import tune_malloc

if sys.argv[1] == "mapped":
    print(tune_malloc(), end=" ")
big = b"x" * (8 << 20)
del big  # a large block freed: glibc's own threshold rises to 8 MB
start = rss()
if sys.argv[2] == "top":  # 12 MB at the heap's top (blocks below the mapping threshold), freed
    blocks = [b"x" * 100_000 for _ in range(120)]
    del blocks
else:  # 60 MB of 300 kB blocks (a file's bytes), each followed by a small live object, freed
    files, pins = [], []
    for i in range(200):
        files.append(b"x" * 300_000)
        pins.append(b"p" * 2000)
    del files
print(round(rss() - start))
"""


def _held(mode: str, scenario: str = "between", **env) -> str:
    """``_LARGE_BLOCKS`` in a fresh process, without glibc's own settings unless ``env`` gives them."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return _run(_LARGE_BLOCKS, mode, scenario, base=base, **env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_memory_freed_is_returned_at_once():
    """glibc's own thresholds rise with the largest block freed (8 MB here): 300 kB blocks then come from the
    heap and stay there once freed, held between live objects, and so does a heap's free top up to 16 MB.
    Tuned, the large blocks are mapped alone and returned when freed, and the top is trimmed past 1 MB."""
    top, between = int(_held("default", "top")), int(_held("default", "between"))
    assert top > 8 and between > 40  # the fault this guards against, as glibc behaves by default
    (done, top), (_, between) = _held("mapped", "top").split(), _held("mapped", "between").split()
    assert done == "True" and int(top) < 4 and int(between) < 10, f"{top}, {between} MB freed still held"


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "1048576"}, {"MALLOC_TRIM_THRESHOLD_": "67108864"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=67108864"}])
def test_thresholds_the_environment_chose_are_kept(env):
    assert _held("mapped", **env).split()[0] == "False"


_POOL = """
import pyarrow as pa
from pacs2bids.memory import arrow_system_pool
arrow_system_pool()
arrow_system_pool()
print(pa.default_memory_pool().backend_name)
"""


def test_pyarrow_takes_its_buffers_from_the_system_allocator():
    assert _run(_POOL, ARROW_DEFAULT_MEMORY_POOL="") == "system"


def test_a_pool_the_environment_chose_is_kept():
    assert _run(_POOL, ARROW_DEFAULT_MEMORY_POOL="jemalloc") == "jemalloc"


def test_the_lineage_tables_use_the_system_pool():
    """The lineage module sets it on import: the run's tables and the leak scan's Parquet reads share it."""
    code = "import pyarrow as pa\nimport pacs2bids.lineage.tables\nprint(pa.default_memory_pool().backend_name)"
    assert _run(code, ARROW_DEFAULT_MEMORY_POOL="") == "system"


def test_the_lineage_tables_give_back_what_they_used(tmp_path, monkeypatch):
    """The last steps of a run stack on what the earlier ones left: the tables' buffers are returned before
    the leak scan builds its rules, even when writing the run's table fails."""
    from pacs2bids.lineage import tables

    calls = []
    monkeypatch.setattr(tables, "give_back", lambda: calls.append("given"))
    records = [tables.InstanceRecord("01", None, "2.25.1", "2.25.2", f"2.25.3.{i}", f"sourcedata/{i}.dcm", "wado-rs",
                                     None) for i in range(3)]
    part = tables.write_instance_part(tmp_path, "study1", records)
    tables.record_lineage(tmp_path, [], [part], run_id="r1", project="p", flow_run_id=None,
                          pacs2bids_version="0", heuristic_sha256=None)
    assert calls == ["given"] and (tmp_path / tables.LINEAGE_DIR / "instances-r1.parquet").is_file()
    monkeypatch.setattr(tables, "write_run", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        tables.record_lineage(tmp_path, [], [], run_id="r2", project="p")
    assert calls == ["given", "given"]
