"""One publish per target at a time, across processes and machines: a lock object at
``<prefix>/.pacs2bids-lock.json``, created only if absent (S3 ``If-None-Match: *``, SFTP and
folders ``O_EXCL``), renewed while the publish runs, removed at its end.

A lock is taken over when its lease has expired (its holder stopped renewing it: killed, or cut
from the target) or when it was taken on this host by a process that is gone. Otherwise a second
run waits up to ``lock_wait_seconds``, then refuses with the holder's run and host.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

LOCK_NAME = ".pacs2bids-lock.json"
LEASE_SECONDS = 120.0
_HELD: set[str] = set()  # tokens of the locks this process holds now


class LockBusy(RuntimeError):
    """Another run publishes to this target now."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TargetLock:
    def __init__(self, store, run: str, wait_seconds: float = 0.0, lease_seconds: float = LEASE_SECONDS):
        self.store, self.run, self.wait_seconds, self.lease = store, run, wait_seconds, lease_seconds
        self.path = store.path(LOCK_NAME)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "run": self.run, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.lease,
                           "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.store.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder or holder.get("expires", 0) < time.time():
            return True
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", 0))
        return not _alive(pid) or (pid == os.getpid() and holder.get("token") not in _HELD)

    def acquire(self) -> None:
        deadline, takeovers = time.monotonic() + self.wait_seconds, 0
        while True:
            if self.store.create_exclusive(self.path, self._body()):
                holder = self._holder()
                if holder and holder.get("token") == self.token:
                    break
            holder = self._holder()
            if holder is not None and self._stale(holder) and takeovers < 3:
                takeovers += 1
                self.store.fs.rm_file(self.path)  # its holder is gone: the next loop takes it
                continue
            if time.monotonic() >= deadline:
                who = f"run {holder.get('run')} on host {holder.get('host')}, since {holder.get('since')}" \
                    if holder else "another run"
                raise LockBusy(f"another run of this project is publishing to it ({who}); wait for it to end, or "
                               "set lock_wait_seconds on the target to wait")
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        _HELD.add(self.token)
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="pacs2bids-target-lock")
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                holder = self._holder()
                if holder and holder.get("token") == self.token:
                    self.store.replace(self.path, self._body())
            except Exception:  # noqa: BLE001 - the target is down: the publish itself will fail
                pass

    def release(self) -> None:
        _HELD.discard(self.token)
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        try:
            holder = self._holder()
            if holder and holder.get("token") == self.token:
                self.store.fs.rm_file(self.path)
        except Exception:  # noqa: BLE001 - a dead target keeps the lock until its lease ends
            pass

    def __enter__(self) -> "TargetLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
