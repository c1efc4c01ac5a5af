"""The per-PACS limit holds across processes: two ``pacs2bids run`` at once, one PACS, one
real Prefect server; the associations open to the PACS are counted from /proc/net/tcp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from pacs2bids.dicomfiles import iter_dicom_files

PATIENTS = 6  # studies per run: more than a run retrieves at once (4 task threads)
TCP_ESTABLISHED = "01"


def plant_patients(src: Path, n: int) -> list[bytes]:
    """``n`` copies of the series under ``src``, each a patient of its own (LIMIT000...) with
    its own study, series and instance UIDs."""
    files = list(iter_dicom_files(src))
    out = []
    for k in range(n):
        for f in files:
            ds = pydicom.dcmread(f)
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
                if kw in ds:
                    setattr(ds, kw, generate_uid(entropy_srcs=[str(ds.data_element(kw).value), str(k)]))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"LIMIT{k:03d}"
            ds.PatientName = f"LIMIT^PATIENT{k}"
            buf = pydicom.filebase.DicomBytesIO()
            ds.save_as(buf, enforce_file_format=False)
            out.append(buf.getvalue())
    return out


# -- counting connections from /proc -------------------------------------------------------------
def established_to(port: int) -> set[int]:
    """Socket inodes of ESTABLISHED TCP connections whose remote port is ``port`` (/proc/net/tcp
    and tcp6: ``sl local rem st ... inode``, addresses as hex ``IP:PORT``).

    One read is not a snapshot: the kernel walks its table bucket by bucket while we read, so a
    connection closing and another opening during the read may both be listed."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            fd = os.open(table, os.O_RDONLY)
        except OSError:
            continue
        try:
            chunks = []
            while data := os.read(fd, 1 << 20):
                chunks.append(data)
        finally:
            os.close(fd)
        for line in b"".join(chunks).decode().splitlines()[1:]:
            f = line.split()
            if len(f) > 9 and f[3] == TCP_ESTABLISHED and int(f[2].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(f[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    found = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
    except OSError:
        pass
    return found


@dataclass
class Sampler:
    """Samples, every ``interval`` seconds in a thread, the connections open to ``port`` and
    which of ``pids`` holds each.

    A sample is two reads of the table back to back, and counts the connections listed in both:
    each of them was open from its first listing to its second, so all were open at once at
    the instant between the two reads. A sample can miss a connection opened during the reads;
    it never counts one that was not open with the others (``raw_peak``, from single reads,
    can: it is kept for the record only).
    """

    port: int
    interval: float = 0.02
    pids: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    raw_peak: int = 0
    at_peak: list[str] = field(default_factory=list)  # who held the connections at the last peak sample
    samples: int = 0
    seen: dict[str, list[float]] = field(default_factory=dict)  # run -> times it held a connection
    both_at_once: int = 0  # samples where every run held a connection
    slots_url: str = ""  # the Prefect limit: its active slots are read at each sample too
    slots_at_peak: list = field(default_factory=list)  # (time, connections, active slots)
    max_slots: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        owner: dict[int, str] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            first = established_to(self.port)
            inodes = first & established_to(self.port)
            self.samples += 1
            self.raw_peak = max(self.raw_peak, len(first))
            self.peak = max(self.peak, len(inodes))
            if inodes - owner.keys():
                for name, pid in self.pids.items():
                    for ino in socket_inodes(pid) & inodes:
                        owner[ino] = name
            holders = {owner[i] for i in inodes if i in owner}
            if self.slots_url:
                try:
                    act = requests.get(self.slots_url, timeout=2).json().get("active_slots", -1)
                except Exception:
                    act = -2
                self.max_slots = max(self.max_slots, act)
            else:
                act = None
            if len(inodes) == self.peak:
                self.at_peak = sorted(owner.get(i, "?") for i in inodes)
                self.slots_at_peak.append((round(now, 2), len(inodes), act))
            for name in holders:
                self.seen.setdefault(name, []).append(now)
            if self.pids and holders == set(self.pids):
                self.both_at_once += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def write_project(tmp: Path, name: str, pacs_port: int, limit: int, per_minute: int) -> Path:
    folder = tmp / name
    folder.mkdir()
    rows = ["patient_id,subject"] + [f"LIMIT{k:03d},{k + 1:02d}" for k in range(PATIENTS)]
    (folder / "inclusions.csv").write_text("\n".join(rows) + "\n")
    spec = folder / "spec.yaml"
    spec.write_text(
        f"project: {name}\n"
        "pacs:\n"
        f"  dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {pacs_port}, retrieve: c-get,\n"
        "          max_associations: 4, timeout: 30}\n"  # each process alone would open 4
        f"  max_associations: {limit}\n"
        f"  instances_per_minute: {per_minute}\n"  # slow enough for the two runs to overlap
        "selection: {inclusions: inclusions.csv, modalities: [MR]}\n"
        "heuristic: auto\n"
        f"output: {folder / 'out'}\n"
        "retries: {attempts: 2, backoff_seconds: 0.5}\n"
    )
    return spec


@pytest.mark.slow
@pytest.mark.parametrize("limit", [2, 3])
def test_two_runs_at_once_stay_within_the_pacs_limit(limit, prefect_server, orthanc_factory, sample_dir, tmp_path):
    pacs = orthanc_factory(dicomweb=False)
    planted = plant_patients(sample_dir / "dcm_qa_philips", PATIENTS)
    assert pacs.upload(planted) == len(planted)
    specs = {name: write_project(tmp_path, name, pacs.dicom_port, limit, per_minute=600) for name in ("run-a", "run-b")}
    procs = {}
    limit_url = f"{prefect_server}/v2/concurrency_limits/pacs2bids-pacs-ORTHANC@127.0.0.1:{pacs.dicom_port}"
    with Sampler(pacs.dicom_port, slots_url=limit_url) as sampler:
        for name, spec in specs.items():
            env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / f"home-{name}"),
                   "PACS2BIDS_PROJECT_SECRET": f"{name}-secret-0123456789abcdef", "NIPYPE_NO_ET": "1"}
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pacs2bids.cli", "run", "--json", str(spec)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            sampler.pids[name] = procs[name].pid
        outputs = {name: p.communicate(timeout=1200) for name, p in procs.items()}

    for name, (out, err) in outputs.items():
        assert procs[name].returncode == 0, f"{name} exited {procs[name].returncode}:\n{err[-4000:]}"
        summary = json.loads(out[out.index("{"):])
        assert summary["published"] and summary["counts"]["subjects"] == PATIENTS, summary
        assert (specs[name].parent / "out" / "dataset_description.json").is_file()

    detail = (f"peak {sampler.peak} (single reads: {sampler.raw_peak}) over {sampler.samples} samples; "
              f"both runs connected at once in "
              f"{sampler.both_at_once} samples; held at the peak by {sampler.at_peak}; server's active slots at most "
              f"{sampler.max_slots}; at the peaks (time, connections, slots): {sampler.slots_at_peak[-10:]}")
    # the bound holds at every sample, and is reached: the measurement sees what is limited
    assert sampler.peak <= limit, detail
    assert 0 < sampler.max_slots <= limit, detail  # the server never lent more, and was read
    assert sampler.peak == limit, detail
    # both runs retrieved while the other one did: their connection times overlap
    a, b = sampler.seen.get("run-a", []), sampler.seen.get("run-b", [])
    assert a and b, detail
    assert max(min(a), min(b)) < min(max(a), max(b)), f"the runs never overlapped; {detail}"
    # every slot was given back
    name = f"pacs2bids-pacs-ORTHANC@127.0.0.1:{pacs.dicom_port}"
    r = requests.get(f"{prefect_server}/v2/concurrency_limits/{name}", timeout=10)
    r.raise_for_status()
    assert r.json()["limit"] == limit and r.json()["active_slots"] == 0, r.json()
    print(detail)
