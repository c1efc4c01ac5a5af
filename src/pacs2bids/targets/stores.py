"""The few operations a target needs that fsspec file systems do differently: open the file system
with the credentials the spec names (from the environment or a Prefect block, never the spec),
create a file only if absent (the lock), replace a small file in one step (CURRENT), and copy a
file on the server (S3 CopyObject; SFTP ``hardlink@openssh.com``; a folder: a hard link).

Everything else (list, put, read, remove) is fsspec's.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urlsplit

from ..config.targets import StorageTargetSettings


class MissingCredential(LookupError):
    """An environment variable (or block key) the spec names is not set."""


def _credential(settings: StorageTargetSettings, field: str, environ: Mapping[str, str],
                block: Mapping[str, str] | None) -> str | None:
    """The value of credential ``field`` (e.g. ``password``): from the Prefect block when the spec
    names one, else from the environment variable ``<field>_env`` names; None when neither is set."""
    if block is not None and field in block:
        return block[field]
    name = getattr(settings, f"{field}_env", None)
    if name is None:
        return None
    value = environ.get(name)
    if not value:
        raise MissingCredential(f"environment variable {name} ({field.replace('_', ' ')}) is not set")
    return value


class Store:
    """A local folder (``file://``): the base the others refine."""

    def __init__(self, settings: StorageTargetSettings, environ: Mapping[str, str], block: Mapping[str, str] | None):
        self.settings = settings
        parts = urlsplit(settings.url)
        self.root = unquote(parts.path).rstrip("/") or "/"
        self.fs = self._open(parts, environ, block)

    def _open(self, parts, environ, block):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(auto_mkdir=True)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write ``data`` at ``path`` if nothing is there; False if something is."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def replace(self, path: str, data: bytes) -> None:
        """Make ``path`` hold ``data`` in one step: a reader sees the old bytes or the new."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    def server_copy(self, src: str, dst: str) -> bool:
        """Copy ``src`` to ``dst`` without sending its bytes; False when the server cannot."""
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
            return True
        except OSError:
            return False

    def sha256(self, path: str) -> str:
        """The SHA-256 of the file at ``path``, read back from the store."""
        h = hashlib.sha256()
        with self.fs.open(path, "rb", block_size=1 << 22) as f:
            while block := f.read(1 << 22):
                h.update(block)
        return h.hexdigest()

    def sha256_many(self, sized: dict[str, int]) -> dict[str, str]:
        """The SHA-256 of each path (``{path: size}``), read back from the store."""
        return {p: self.sha256(p) for p in sized}

    def copy_many(self, pairs: list[tuple[str, str]]) -> set[str]:
        """Server-side copies; returns the destinations done (the rest must be sent)."""
        return {dst for src, dst in pairs if self.server_copy(src, dst)}

    def put_many(self, pairs: list[tuple[Path, str]]) -> None:
        for local, path in pairs:
            self.put(local, path)

    def put(self, local: Path, path: str) -> None:
        tmp = f"{path}.part"
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, path)

    def close(self) -> None:
        pass


class S3Store(Store):
    """S3 through s3fs: objects appear whole (one PUT), so no temporary names are needed."""

    def _open(self, parts, environ, block):
        import s3fs

        s = self.settings
        self.root = f"{parts.hostname}{unquote(parts.path)}".rstrip("/")
        key = _credential(s, "access_key_id", environ, block)
        secret = _credential(s, "secret_access_key", environ, block)
        client_kwargs = {"region_name": s.region} if s.region else {}
        fs = s3fs.S3FileSystem(
            key=key, secret=secret, endpoint_url=s.endpoint_url, client_kwargs=client_kwargs,
            skip_instance_cache=True, use_listings_cache=False,
            config_kwargs={"connect_timeout": s.timeout, "read_timeout": s.timeout,
                           "retries": {"max_attempts": 2, "mode": "standard"}})
        fs.retries = 2  # s3fs's own retries, on top of botocore's: a dead store fails in seconds
        return fs

    def create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
            return True
        except OSError as exc:
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower() or getattr(
                    exc, "errno", None) == 17:
                return False
            raise

    def replace(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)  # one PUT: the object is replaced whole

    def server_copy(self, src: str, dst: str) -> bool:
        self.fs.copy(src, dst)  # CopyObject, on the server
        return True

    def put(self, local: Path, path: str) -> None:
        self.fs.put_file(str(local), path)

    def put_many(self, pairs: list[tuple[Path, str]]) -> None:
        if pairs:  # s3fs uploads them concurrently
            self.fs.put([str(local) for local, _ in pairs], [path for _, path in pairs])

    def copy_many(self, pairs: list[tuple[str, str]]) -> set[str]:
        if pairs:  # CopyObject, concurrently
            self.fs.copy([src for src, _ in pairs], [dst for _, dst in pairs])
        return {dst for _, dst in pairs}

    def sha256_many(self, sized: dict[str, int], batch_bytes: int = 1 << 27) -> dict[str, str]:
        """Read back concurrently, in batches of at most ``batch_bytes`` held in memory (bigger files alone)."""
        paths, sizes = list(sized), sized
        out, batch, held = {}, [], 0
        for p in [*paths, None]:
            if p is None or (batch and held + sizes[p] > batch_bytes):
                for path, data in self.fs.cat(batch).items() if len(batch) > 1 else [
                        (b, self.fs.cat_file(b)) for b in batch]:
                    out[path] = hashlib.sha256(data).hexdigest()
                batch, held = [], 0
            if p is not None:
                batch.append(p)
                held += sizes[p]
        return {p: out[p] for p in paths}


class SftpStore(Store):
    """SFTP through fsspec's paramiko file system, host key checked against ``known_hosts``."""

    def _open(self, parts, environ, block):
        import paramiko
        from fsspec.implementations.sftp import SFTPFileSystem

        s = self.settings
        known = Path(os.path.expanduser(str(s.known_hosts or "~/.ssh/known_hosts")))

        class _Checked(SFTPFileSystem):
            def _connect(self):  # fsspec loads no known_hosts: reject unknown hosts, knowing ours
                self.client = paramiko.SSHClient()
                if known.is_file():
                    self.client.load_host_keys(str(known))
                self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
                self.client.connect(self.host, **self.ssh_kwargs)
                self.ftp = self.client.open_sftp()
                self.ftp.get_channel().settimeout(s.timeout)

        kwargs = dict(port=parts.port or 22, username=unquote(parts.username) if parts.username else None,
                      timeout=s.timeout, banner_timeout=s.timeout, auth_timeout=s.timeout,
                      password=_credential(s, "password", environ, block),
                      passphrase=_credential(s, "key_passphrase", environ, block),
                      skip_instance_cache=True)
        if s.key_file:
            kwargs.update(key_filename=str(s.key_file), look_for_keys=False, allow_agent=False)
        return _Checked(parts.hostname, **kwargs)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with self.fs.ftp.open(path, "wx") as f:  # SSH_FXF_CREAT | SSH_FXF_EXCL
                f.write(data)
            return True
        except OSError:
            if self.fs.exists(path):
                return False
            raise

    def server_copy(self, src: str, dst: str) -> bool:
        from paramiko.sftp import CMD_EXTENDED

        self.fs.makedirs(os.path.dirname(dst), exist_ok=True)
        try:  # OpenSSH's extension; paramiko has no method for it
            self.fs.ftp._request(CMD_EXTENDED, "hardlink@openssh.com", src, dst)
            return True
        except OSError:
            return False

    def sha256(self, path: str) -> str:
        class _Hashing:  # a file-like sink for getfo, paramiko's pipelined download (5x faster than read())
            def __init__(self):
                self.h = hashlib.sha256()

            def write(self, data):
                self.h.update(data)

        sink = _Hashing()
        self.fs.ftp.getfo(path, sink)
        return sink.h.hexdigest()

    def close(self) -> None:
        try:
            self.fs.client.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


def open_store(settings: StorageTargetSettings, environ: Mapping[str, str],
               block: Mapping[str, str] | None) -> Store:
    return {"s3": S3Store, "sftp": SftpStore, "folder": Store}[settings.kind](settings, environ, block)
