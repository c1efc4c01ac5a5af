"""The spec's secondary storage targets (issue 13): where a published version is copied after the
local publish. Credentials are given as the NAMES of environment variables (or of a Prefect
``Secret`` block), never as values: a spec file is shared, a key is not.

``output`` may itself be a URL (``s3://bucket/prefix``, ``sftp://user@host:port/path``): the
dataset is then published locally in a hidden folder (:func:`local_output`) and the URL becomes
the first target; a target under ``targets:`` with the same URL gives its settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STORAGE_SCHEMES = {"s3": "s3", "sftp": "sftp", "file": "folder"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_url(value: object) -> bool:
    """True for ``scheme://...`` strings (a URL ``output``), False for local paths."""
    return isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


class StorageTargetSettings(_Model):
    """A file or object store reached through fsspec: S3 (any S3 API), SFTP, or a local folder."""

    kind: Literal["s3", "sftp", "folder"] = Field(description="s3, sftp or folder.")
    url: str = Field(description="s3://bucket/prefix, sftp://user@host[:port]/path or file:///path.")
    name: str | None = Field(None, description="Name in logs and the run summary (default: kind and host).")
    endpoint_url: str | None = Field(None, description="S3: the S3 API's address, for a store other than AWS.")
    region: str | None = Field(None, description="S3: the region (default: the store's).")
    access_key_id_env: str | None = Field(None, description="S3: environment variable holding the access key id.")
    secret_access_key_env: str | None = Field(
        None, description="S3: environment variable holding the secret access key.")
    password_env: str | None = Field(None, description="SFTP: environment variable holding the password.")
    key_file: Path | None = Field(None, description="SFTP: the private key file (default: ssh's own keys, agent).")
    key_passphrase_env: str | None = Field(None, description="SFTP: environment variable holding the key's passphrase.")
    known_hosts: Path | None = Field(
        None, description="SFTP: known_hosts file checked against the server's host key (default: ~/.ssh/known_hosts; "
        "an unknown host is refused).")
    credentials_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the credentials as JSON (keys as the *_env fields "
        "without _env: access_key_id, secret_access_key, password, key_passphrase), instead of environment variables.")
    lock_wait_seconds: float = Field(
        0, ge=0, description="How long a run waits for another run of the project publishing to this target, "
        "before it refuses (0: refuse at once).")
    verify: Literal["sent", "all"] = Field(
        "sent", description="After the upload, every object's size is checked; SHA-256 is re-read for the files sent "
        "or resumed in this run (sent) or for every file (all).")
    timeout: float = Field(30.0, gt=0, description="Seconds to wait for the store to answer.")

    @field_validator("access_key_id_env", "secret_access_key_env", "password_env", "key_passphrase_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            raise ValueError("give the NAME of an environment variable (letters, digits, _), never the secret itself")
        return v

    @model_validator(mode="after")
    def _url_matches(self) -> "StorageTargetSettings":
        parts = urlsplit(self.url)
        want = {"s3": "s3", "sftp": "sftp", "folder": "file"}[self.kind]
        if parts.scheme != want:
            raise ValueError(f"a {self.kind} target's url starts with {want}:// (got {self.url.split(':', 1)[0]}://)")
        if parts.password:
            raise ValueError("the url holds a password: put it in an environment variable named by password_env")
        if self.kind in ("s3", "sftp") and not parts.hostname:
            raise ValueError(f"the url names no {'bucket' if self.kind == 's3' else 'host'}")
        if self.kind == "s3" and (self.password_env or self.key_file):
            raise ValueError("password_env and key_file are for sftp targets; s3 takes access_key_id_env and "
                             "secret_access_key_env")
        if self.kind != "s3" and (self.access_key_id_env or self.secret_access_key_env or self.endpoint_url):
            raise ValueError("access_key_id_env, secret_access_key_env and endpoint_url are for s3 targets")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError("endpoint_url must start with http:// or https://")
        return self

    @property
    def label(self) -> str:
        """A name for logs: never a secret (a URL's user name is left out too)."""
        if self.name:
            return self.name
        parts = urlsplit(self.url)
        where = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
        return f"{self.kind}:{where}{parts.path}".rstrip("/")


# The research-PACS targets (targets/research_pacs.py) make this a union discriminated by ``kind``:
# TargetSettings = Annotated[Union[StorageTargetSettings, ResearchPacsSettings], Field(discriminator="kind")]
TargetSettings = StorageTargetSettings


def move_url_output(data: dict) -> dict:
    """The spec as written, with a URL ``output`` made the first target (see the module docstring)
    and ``output`` the local folder (relative to the spec, resolved on load)."""
    output = data.get("output")
    if not is_url(output):
        return data
    targets = data.get("targets") or []
    if not isinstance(targets, list):
        return data  # the model's own validation names the error
    first, rest = target_from_output(output, targets)
    project = str(data.get("project") or "dataset")
    return {**data, "output": str(local_output(Path("."), project)), "targets": [first, *rest],
            "output_url": output}


def target_from_output(output: str, targets: list[dict]) -> tuple[dict, list[dict]]:
    """For a URL ``output``: the target it names (the one under ``targets`` with that URL, else one
    built from the URL alone) and the other targets. Raises ValueError for a scheme not served."""
    scheme = urlsplit(output).scheme
    if scheme not in STORAGE_SCHEMES:
        raise ValueError(f"output: {scheme}:// is not a storage pacs2bids publishes to; give a folder, s3:// or "
                         "sftp://")
    same = [t for t in targets if isinstance(t, dict) and str(t.get("url", "")).rstrip("/") == output.rstrip("/")]
    rest = [t for t in targets if not (isinstance(t, dict) and t in same)]
    first = same[0] if same else {"kind": STORAGE_SCHEMES[scheme], "url": output}
    return first, rest


def local_output(base: Path, project: str) -> Path:
    """Where the local dataset lives when ``output`` is a URL: hidden, beside the work folder, so
    the local publish keeps its one-rename swap and seeds the next run."""
    return base / f".{project}.pacs2bids-local" / project
