"""The spec's ``staging`` setting (issue 14): where each study's result goes when workers on several
machines share no file system (:mod:`pacs2bids.staging`). Off by default: without it, every study
writes into the run's work folder, as before.

::

    staging:
      url: s3://pacs2bids-staging/runs          # or file:///mnt/shared/pacs2bids-staging
      endpoint_url: https://s3.hospital.example # S3 other than AWS
      access_key_id_env: STAGING_S3_KEY         # NAMES of environment variables, never values
      secret_access_key_env: STAGING_S3_SECRET
      scratch_dir: /var/tmp                     # each worker's local scratch root (default: the system's
                                                # temporary folder; PACS2BIDS_SCRATCH overrides it per machine)

Credentials are read from the environment of the process that opens the store (each worker and the
flow's machine), like the S3 targets' (:mod:`pacs2bids.targets.stores`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .targets import StorageTargetSettings

#: the environment variable that names a machine's local scratch root (overrides ``scratch_dir``)
SCRATCH_ENV = "PACS2BIDS_SCRATCH"


class StagingSettings(BaseModel):
    """Where each study uploads its part, for the flow's machine to assemble (S3 or a shared folder)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="s3://bucket/prefix or file:///path: parts go under <url>/<project>/<run id>/.")
    endpoint_url: str | None = Field(None, description="S3: the S3 API's address, for a store other than AWS.")
    region: str | None = Field(None, description="S3: the region (default: the store's).")
    access_key_id_env: str | None = Field(None, description="S3: environment variable holding the access key id.")
    secret_access_key_env: str | None = Field(
        None, description="S3: environment variable holding the secret access key.")
    timeout: float = Field(30.0, gt=0, description="Seconds to wait for the store to answer.")
    scratch_dir: Path | None = Field(
        None, description=f"Each worker's local scratch root (default: the system's temporary folder; "
        f"${SCRATCH_ENV} overrides it on a machine).")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("s3", "file"):
            raise ValueError("staging.url starts with s3:// (an S3 store) or file:// (a folder every machine mounts)")
        return v.rstrip("/")

    @field_validator("scratch_dir")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("give an absolute path: it names a folder on each worker's machine")
        return v

    @model_validator(mode="after")
    def _store(self) -> "StagingSettings":
        self.store_settings()  # refused on load, not on the first upload
        return self

    def store_settings(self) -> StorageTargetSettings:
        """The same store as a storage target's settings (validated the same way: no password in the URL,
        variable names rather than values)."""
        kind = "s3" if self.url.startswith("s3://") else "folder"
        s3 = {"endpoint_url": self.endpoint_url, "region": self.region, "access_key_id_env": self.access_key_id_env,
              "secret_access_key_env": self.secret_access_key_env} if kind == "s3" else {}
        return StorageTargetSettings(kind=kind, url=self.url, timeout=self.timeout, **s3)

    def scratch_root(self, environ: Mapping[str, str] = os.environ) -> Path:
        """This machine's local scratch root."""
        if environ.get(SCRATCH_ENV):
            return Path(environ[SCRATCH_ENV])
        return self.scratch_dir if self.scratch_dir is not None else Path(tempfile.gettempdir())
