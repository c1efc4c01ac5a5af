"""Publishing survives being killed at any point, cleans up after itself, and children never
see the project key. The kills are real: a subprocess publishes and SIGKILLs itself at a test
point (``PACS2BIDS_TEST_KILL_AT``, test-only, see :mod:`pacs2bids.publish`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pacs2bids import publish
from pacs2bids.childenv import child_env
from pacs2bids.publish import (
    KILL_POINTS,
    MANIFEST,
    RunLock,
    current_version,
    publish_local,
    seed_staging,
    versions_dir,
)

FILES = 30


def build(staging: Path, version: str) -> Path:
    """A small dataset whose every file says which version it belongs to."""
    staging.mkdir(parents=True)
    (staging / "dataset_description.json").write_text(json.dumps({"Name": version}))
    for i in range(FILES):
        (staging / f"sub-{i:02d}.txt").write_text(version)
    return staging


def assert_complete(output: Path) -> str:
    """``output`` names one whole version; returns which."""
    root = current_version(output)
    assert root is not None and root.is_dir(), f"{output} names no dataset"
    version = json.loads((root / "dataset_description.json").read_text())["Name"]
    names = sorted(p.name for p in root.iterdir() if p.name != ".pacs2bids")
    assert names == sorted(["dataset_description.json"] + [f"sub-{i:02d}.txt" for i in range(FILES)])
    assert all((root / f"sub-{i:02d}.txt").read_text() == version for i in range(FILES))
    manifest = root / MANIFEST
    if manifest.exists():  # every version this pacs2bids published carries one
        files = json.loads(manifest.read_text())["files"]
        assert all((root / f).stat().st_size == size for f, size in files.items())
    return version


SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pacs2bids import publish
    if sys.argv[3] == "no-exchange":
        publish._exchange = lambda a, b: False  # the fallback of kernels without renameat2
    publish.publish_local(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4])
""")


def publish_in_child(staging: Path, output: Path, run_id: str, kill_at: str | None, exchange: bool = True):
    env = dict(os.environ, PACS2BIDS_TEST_KILL_AT=kill_at or "")
    return subprocess.run([sys.executable, "-c", SCRIPT, str(staging), str(output),
                           "exchange" if exchange else "no-exchange", run_id],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("layout", ["symlink", "legacy-folder", "legacy-folder-no-exchange"])
def test_killed_publish_always_leaves_a_dataset(tmp_path, point, layout):
    out, work = tmp_path / "out", tmp_path / "work"
    if layout == "symlink":
        publish_local(build(work / "staging-20260101T000000Z-aaaa", "v1"), out)
        assert out.is_symlink()
    else:  # published by an older pacs2bids: a real folder
        build(out, "v1")
    r = publish_in_child(build(work / "staging-20260102T000000Z-bbbb", "v2"), out, "20260102T000000Z-bbbb", point,
                         exchange=layout != "legacy-folder-no-exchange")
    reached = r.returncode == -signal.SIGKILL
    assert reached or r.returncode == 0, r.stderr
    # every point on this layout's path is reached (the kill landed where the test says)
    on_path = {"symlink": set(KILL_POINTS) - {"migrated-moved"},
               "legacy-folder": set(KILL_POINTS) - {"migrated-moved", "linked"},
               "legacy-folder-no-exchange": set(KILL_POINTS) - {"linked"}}[layout]
    assert reached == (point in on_path), (point, layout, r.returncode, r.stderr[-2000:])
    if reached and point in ("staged", "versioned"):
        assert not out.is_symlink() or assert_complete(out) == "v1"
    publish.recover(out)  # what the next run does first
    first = assert_complete(out)
    assert first in ("v1", "v2")
    if r.returncode == 0 or point in ("swapped", "pruned", "migrated-moved"):
        assert first == "v2" or point == "migrated-moved"

    # the next run finds the last published state and publishes on top of it
    staging = work / "staging-20260103T000000Z-cccc"
    seed_staging(out, staging)
    assert json.loads((staging / "dataset_description.json").read_text())["Name"] == first
    for f in staging.glob("sub-*.txt"):
        f.write_text("v3")
    (staging / "dataset_description.json").write_text(json.dumps({"Name": "v3"}))
    publish_local(staging, out, "20260103T000000Z-cccc")
    assert assert_complete(out) == "v3" and out.is_symlink()
    # leftovers are gone: no temporary link, no .previous-*, at most the current and one previous version
    assert not list(tmp_path.glob(".out.link-*")) and not list(tmp_path.glob(".out.previous-*"))
    assert len([p for p in versions_dir(out).iterdir()]) <= 2


def test_reader_always_finds_a_whole_dataset_while_publishing(tmp_path):
    """A reader polling output during many publishes never finds it missing or partial."""
    import threading

    out, work = tmp_path / "out", tmp_path / "work"
    publish_local(build(work / "staging-0", "v0"), out)
    problems, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                assert_complete(out)
            except (AssertionError, OSError) as exc:  # a pruned version under a reader is an OSError too
                if not isinstance(exc, FileNotFoundError) or not out.exists():
                    problems.append(repr(exc))

    t = threading.Thread(target=read)
    t.start()
    for n in range(1, 15):
        publish_local(build(work / f"staging-{n:02d}", f"v{n}"), out)
    stop.set()
    t.join()
    assert not problems, problems[:3]
    assert assert_complete(out) == "v14"


def test_old_two_rename_leftovers_and_old_versions_are_pruned(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    build(tmp_path / ".out.previous-1700000000", "old")
    for n in range(4):
        publish_local(build(work / f"staging-2026010{n}T000000Z-x", f"v{n}"), out)
    names = sorted(p.name for p in versions_dir(out).iterdir())
    assert names == ["20260102T000000Z-x", "20260103T000000Z-x"]  # the current one and the one it replaced
    assert not list(tmp_path.glob(".out.previous-*"))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["run_id"] == "20260103T000000Z-x" and manifest["previous"] == "20260102T000000Z-x"
    assert manifest["files"]["dataset_description.json"] > 0


def test_stale_work_folders_removed_only_when_no_run_is_alive(tmp_path):
    work = tmp_path / "work"
    for name in ("staging-old", "scratch-old"):
        (work / name).mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pacs2bids.publish import RunLock;"
         "RunLock(Path(sys.argv[1])).acquire(keep=(Path(sys.argv[1]) / 'staging-old',"
         " Path(sys.argv[1]) / 'scratch-old')); print('held', flush=True); time.sleep(600)", str(work)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = RunLock(work)
        assert lock.acquire() == []  # another run is alive: its folders may be in use
        lock.release()
        assert (work / "staging-old").is_dir() and (work / "scratch-old").is_dir()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(work)  # the other run was killed: the kernel dropped its lock
    assert sorted(p.name for p in lock.acquire()) == ["scratch-old", "staging-old"]
    lock.release()
    assert not (work / "staging-old").exists() and not (work / "scratch-old").exists()


# -- children never get the project key ----------------------------------------------------------
def test_child_env_is_an_allow_list():
    environ = {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "PACS2BIDS_PROJECT_SECRET": "k" * 20,
               "MY_PROJECT_KEY": "k" * 20, "AWS_ACCESS_KEY_ID": "a", "GITHUB_TOKEN": "t", "DB_PASSWORD": "p",
               "LC_SECRET": "x"}
    env = child_env(environ=environ, NO_COLOR="1")
    assert env == {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "NO_COLOR": "1"}
    assert "MY_PROJECT_KEY" not in child_env(environ={**environ, "TZ": "UTC"}, deny=("TZ",))
    with pytest.raises(ValueError, match="PACS2BIDS_X"):
        child_env(PACS2BIDS_X="1")


def test_validator_child_does_not_see_the_secret(tmp_path, monkeypatch):
    """The validator is started through validate.py's own code path; a stand-in executable
    prints its environment as a validator report."""
    from pacs2bids import validate

    fake = tmp_path / "fake-validator"
    fake.write_text("#!" + sys.executable + "\nimport json, os\n"
                    "print(json.dumps({'issues': {'issues': [{'code': 'ENV', 'severity': 'warning',"
                    " 'issueMessage': json.dumps(dict(os.environ))}]}}))\n")
    fake.chmod(0o755)
    monkeypatch.setattr(validate, "_find_validator", lambda: str(fake))
    monkeypatch.setenv("PACS2BIDS_PROJECT_SECRET", "the-project-key-0123456789")
    monkeypatch.setenv("STUDY_SECRET_KEY", "another-key-0123456789")
    (tmp_path / "ds").mkdir()
    report = validate.validate_dataset(tmp_path / "ds")
    seen = json.loads(report.warnings[0]["message"])
    assert "PATH" in seen and seen.get("NO_COLOR") == "1"
    assert "PACS2BIDS_PROJECT_SECRET" not in seen and "STUDY_SECRET_KEY" not in seen
    assert "the-project-key-0123456789" not in json.dumps(seen)


# -- the whole run, killed while publishing ---------------------------------------------------------
@pytest.mark.slow
def test_run_killed_while_publishing_then_rerun(tmp_path, orthanc_factory, sample_dir):
    """``pacs2bids run`` (a real subprocess) is SIGKILLed between writing the new version and
    swapping the symlink: ``output`` still names the first run's dataset, whole; the next run
    removes the dead run's staging and scratch folders, finds the published state (nothing is
    retrieved again) and publishes."""
    from pacs2bids.dicomfiles import iter_dicom_files
    from test_cli import SECRET, cli, spec_for

    pacs = orthanc_factory(dicomweb=False)
    pacs.upload(iter_dicom_files(sample_dir / "dcm_qa_philips"))
    spec = spec_for(tmp_path, pacs, "phantom")
    out, work = tmp_path / "out", tmp_path / ".out.pacs2bids-work"
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}

    first = cli("run", "--json", str(spec), env_extra=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert out.is_symlink()
    v1 = current_version(out)
    files_v1 = json.loads((out / MANIFEST).read_text())["files"]

    # something new for the next run (a re-run with nothing new publishes nothing): new sidecar fields re-convert
    spec.write_text(spec.read_text() + "sidecar_fields: {T1w: {PulseSequenceDetails: qa}}\n")
    # its own process group: the ephemeral Prefect server it starts outlives the kill, and is ended with the group
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen([sys.executable, "-m", "pacs2bids.cli", "run", str(spec)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "PACS2BIDS_PROJECT_SECRET": SECRET, "NIPYPE_NO_ET": "1", **env,
                                       "PACS2BIDS_TEST_KILL_AT": "linked"})
        try:
            killed.wait(timeout=600)
        finally:
            try:
                os.killpg(killed.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert current_version(out) == v1
    changed = [f for f, n in files_v1.items() if (out / f).stat().st_size != n]
    assert not changed, f"the published version changed after its manifest was written: {changed}"
    assert list(work.glob("scratch-*")), "the kill should have left the dead run's scratch folder"
    assert len(list(versions_dir(out).iterdir())) == 2  # the new version, complete but never linked

    third = cli("run", "--json", str(spec), env_extra=env)
    assert third.returncode == 0, third.stderr[-3000:]
    summary = json.loads(third.stdout[third.stdout.index("{"):])
    assert summary["published"]
    assert current_version(out) != v1 and (out / "dataset_description.json").is_file()
    assert not list(work.glob("staging-*")) and not list(work.glob("scratch-*"))
    assert not list(tmp_path.glob(".out.link-*"))
    assert len(list(versions_dir(out).iterdir())) == 2  # the current one and the one it replaced


def test_the_manifest_is_in_path_order():
    """Path order is component by component: a folder's files before a sibling whose name extends the
    folder's (``a/b`` before ``a.txt`` and ``a-b``), whatever the characters."""
    paths = ["a.txt", "a/b", "a-b/c", "ab", "a/b/c", "a/b.json", "a/b-c", "A/z", "a", "sub-01/anat/x.nii.gz",
             "sub-01.tsv", "sub-01/anat.json", "é/x", "e/x", "a /b", "a/ b"]
    assert sorted(paths, key=publish._path_order) == sorted(paths, key=lambda p: p.split("/"))


def test_publishing_many_files_keeps_memory_bounded(tmp_path):
    """30,000 files (the sourcedata of half the shared corpus x10): the manifest is built from strings and
    written as it is encoded. Python peak under 12 MB (a list of each path's parts to sort them, then the
    whole JSON text before writing it: 20 MB)."""
    from _traced import traced_peak

    staging = tmp_path / "staging-run1"
    for i in range(30_000):
        d = staging / f"sourcedata/sub-{i // 300:03d}/ses-01/{i // 50:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{1000000 + i}.2.25.{i:012d}.dcm").touch()
    version, peak = traced_peak(publish_local, staging, tmp_path / "out", "run1")
    files = json.loads((version / MANIFEST).read_text())["files"]
    assert len(files) == 30_000 and list(files) == sorted(files, key=lambda p: p.split("/"))
    assert peak < 12e6, f"publishing 30,000 files took {peak / 1e6:.0f} MB"
