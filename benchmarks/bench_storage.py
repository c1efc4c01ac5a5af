"""Publishing to S3 and SFTP (issue 13, "Figures"), on real servers on loopback, in one process run.

    .venv/bin/python benchmarks/bench_storage.py [--studies 50] [--mb-per-study 4] [--files-per-study 8]

A local published version of N studies (random bytes, one subject per study, like a BIDS dataset's images) is
published to SeaweedFS (S3) and to OpenSSH's sshd (SFTP, needs root), and measured beside a plain upload of the
same files with the same library (fsspec ``put``). Then a no-op re-run (goal: <= 10 s, 0 bytes), then a run
with 5 new studies (cost should follow the 5, not the N). It prints seconds, bytes sent and ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from targets_helpers import make_version  # noqa: E402

from pacs2bids.config.targets import StorageTargetSettings  # noqa: E402
from pacs2bids.targets.fsspec_target import FsspecTarget  # noqa: E402
from pacs2bids.targets.manifest import ensure_manifest  # noqa: E402
from pacs2bids.testing_servers import SeaweedS3, Sshd  # noqa: E402

LOG = logging.getLogger("bench")


def _timed(fn):
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def _plain_upload(fs, version: Path, dest: str) -> float:
    files = [p for p in version.rglob("*") if p.is_file()]
    return _timed(lambda: fs.put([str(p) for p in files], [f"{dest}/{p.relative_to(version).as_posix()}"
                                                          for p in files]))[0]


def _runs(name: str, target: FsspecTarget, plain_fs, plain_dest: str, versions: list[Path]) -> list[str]:
    v1, v2 = versions
    plain = _plain_upload(plain_fs, v1, plain_dest)
    m1, m2 = ensure_manifest(v1), ensure_manifest(v2)
    first_s, first = _timed(lambda: target.publish(v1, m1, log=LOG))
    noop_s, noop = _timed(lambda: target.publish(v1, m1, log=LOG))
    more_s, more = _timed(lambda: target.publish(v2, m2, log=LOG))
    mb = m1["total_bytes"] / 1e6
    return [
        f"{name}: plain upload of {len(m1['files'])} files ({mb:.0f} MB): {plain:.2f} s",
        f"{name}: first publish: {first_s:.2f} s ({first_s / plain:.2f}x the plain upload), {first.sent_bytes} bytes "
        "sent, verified",
        f"{name}: no-op re-run: {noop_s:.2f} s, {noop.sent_bytes} bytes sent, state {noop.state}",
        f"{name}: +5 studies: {more_s:.2f} s ({more_s / first_s:.2f}x the first publish), {more.sent_files} files "
        f"({more.sent_bytes} bytes) sent, {more.copied_files} copied on the server",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--mb-per-study", type=float, default=4.0)
    ap.add_argument("--files-per-study", type=int, default=8)
    args = ap.parse_args()
    size = int(args.mb_per_study * 1e6 / args.files_per_study)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        v1 = make_version(tmp / "local", "20260101T000000Z-v1", subjects=args.studies, size=size,
                          files_per_subject=args.files_per_study)
        v2 = make_version(tmp / "local", "20260102T000000Z-v2", subjects=5, size=size,
                          files_per_subject=args.files_per_study, base=v1)
        lines = []
        with SeaweedS3(tmp / "s3") as s3:
            s3.make_bucket("bench")
            env = {"B_KEY": s3.access_key, "B_SECRET": s3.secret_key}
            settings = StorageTargetSettings(kind="s3", url="s3://bench/ds", endpoint_url=s3.endpoint,
                                             access_key_id_env="B_KEY", secret_access_key_env="B_SECRET")
            target = FsspecTarget(settings, project="epilepsy-2026", fingerprint=None, environ=env)
            lines += _runs("S3", target, s3.filesystem(), "bench/plain", [v1, v2])
        if os.geteuid() == 0:
            with Sshd(tmp / "ssh") as sshd:
                url = f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{tmp}/sftp/ds"
                settings = StorageTargetSettings(kind="sftp", url=url, key_file=sshd.client_key,
                                                 known_hosts=sshd.known_hosts)
                target = FsspecTarget(settings, project="epilepsy-2026", fingerprint=None, environ={})
                from pacs2bids.targets.stores import open_store

                plain = open_store(settings, {}, None).fs
                lines += _runs("SFTP", target, plain, f"{tmp}/sftp/plain", [v1, v2])
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
