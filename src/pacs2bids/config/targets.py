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
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .tls import DimseTlsSettings

STORAGE_SCHEMES = {"s3": "s3", "sftp": "sftp", "file": "folder"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(v: str) -> str:
    if not _ENV_NAME.fullmatch(v):
        raise ValueError("give the NAME of an environment variable (letters, digits, _), never the secret itself")
    return v


EnvName = Annotated[str, AfterValidator(_env_name)]  # a field naming an environment variable (never a secret)


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
    access_key_id_env: EnvName | None = Field(None, description="S3: environment variable holding the access key id.")
    secret_access_key_env: EnvName | None = Field(
        None, description="S3: environment variable holding the secret access key.")
    password_env: EnvName | None = Field(None, description="SFTP: environment variable holding the password.")
    key_file: Path | None = Field(None, description="SFTP: the private key file (default: ssh's own keys, agent).")
    key_passphrase_env: EnvName | None = Field(None, description="SFTP: environment variable holding the key's passphrase.")
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


def _ae_title(v: str) -> str:
    if not 1 <= len(v.strip()) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    return v


class OrthancPurgeSettings(_Model):
    """How purge deletes a project's expired studies from a research PACS that is an Orthanc: its
    REST API (POST /tools/lookup, DELETE /studies/{id}; pacs2bids.targets.research_pacs_purge)."""

    orthanc_rest: str = Field(description="The Orthanc's REST root, e.g. https://research-pacs.example.org:8042.")
    username_env: EnvName | None = Field(None, description="Environment variable holding the REST user name.")
    password_env: EnvName | None = Field(None, description="Environment variable holding the REST password.")
    ca_bundle: Path | None = Field(None, description="Absolute path of the PEM file of the CA an https Orthanc is "
                                   "checked against (TLS is always verified).")
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for an HTTP answer.")

    @field_validator("orthanc_rest")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must start with http:// or https:// and name a host")
        if parts.password or parts.username:
            raise ValueError("the url holds credentials: name their environment variables in username_env/password_env")
        return v.rstrip("/")


    @field_validator("ca_bundle")
    @classmethod
    def _ca(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("must be an absolute path (the PEM file of the Orthanc's CA)")
        return v


class DicomwebTargetSettings(_Model):
    """A research PACS reached by DICOMweb (pacs2bids.targets.research_pacs): QIDO-RS to see what
    it holds, STOW-RS to send the pseudonymised DICOM."""

    kind: Literal["dicomweb"] = Field(description="dicomweb: a research PACS by QIDO-RS and STOW-RS.")
    url: str = Field(description="The DICOMweb root, e.g. https://pacs.example.org/dicom-web.")
    name: str | None = Field(None, description="Name in logs and the run summary (default: kind and host).")
    username_env: EnvName | None = Field(None, description="Environment variable holding the user name.")
    password_env: EnvName | None = Field(None, description="Environment variable holding the password.")
    credentials_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding {username, password} as JSON, instead of "
        "environment variables.")
    timeout: float = Field(120.0, gt=0, description="Seconds to wait for an HTTP answer.")
    batch_instances: int = Field(50, ge=1, le=1000, description="Instances per STOW-RS request, at most.")
    batch_megabytes: int = Field(64, ge=1, le=4096, description="Megabytes per STOW-RS request, at most (an "
                                 "instance larger than this goes alone).")
    purge: OrthancPurgeSettings | None = Field(None, description="How purge deletes expired studies there "
                                               "(default: none; purge lists the target as not purgeable).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must start with http:// or https:// and name a host")
        if parts.password:
            raise ValueError("the url holds a password: put it in an environment variable named by password_env")
        return v.rstrip("/")


    @property
    def label(self) -> str:
        parts = urlsplit(self.url)
        return self.name or f"dicomweb:{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class DimseTargetSettings(_Model):
    """A research PACS reached by DIMSE (pacs2bids.targets.research_pacs): C-FIND to see what it
    holds, C-STORE to send the pseudonymised DICOM. No credentials: the PACS knows our AE title."""

    kind: Literal["dimse"] = Field(description="dimse: a research PACS by C-FIND and C-STORE.")
    host: str = Field(description="The PACS's host name or address.")
    port: int = Field(ge=1, le=65535, description="The PACS's DICOM port.")
    ae_title: str = Field(description="The PACS's AE title (called AE).")
    calling_ae_title: str = Field("PACS2BIDS", description="Our AE title, as the PACS knows it.")
    name: str | None = Field(None, description="Name in logs and the run summary (default: AE title, host, port).")
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for a DIMSE or network answer.")
    tls: DimseTlsSettings | None = Field(None, description="DICOM TLS for its associations (config/tls.py).")
    purge: OrthancPurgeSettings | None = Field(None, description="How purge deletes expired studies there "
                                               "(default: none; purge lists the target as not purgeable).")

    _titles = field_validator("ae_title", "calling_ae_title")(_ae_title)

    @property
    def label(self) -> str:
        return self.name or f"dimse:{self.ae_title}@{self.host}:{self.port}"

    @property
    def credentials_block(self) -> None:
        """DIMSE takes no credentials (for code that asks every target for its block)."""
        return None


ResearchPacsSettings = DicomwebTargetSettings | DimseTargetSettings
TargetSettings = Annotated[Union[StorageTargetSettings, DicomwebTargetSettings, DimseTargetSettings],
                           Field(discriminator="kind")]


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
