"""DICOM TLS settings for a DIMSE peer (PS3.15 B.1, the "Basic TLS Secure Transport Connection
Profile"): the CA the PACS's certificate is checked against, and our own certificate when the PACS
asks for one. Read by :mod:`pacs2bids.pacs.tls`; the key file's content is never read here or logged.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class DimseTlsSettings(BaseModel):
    """``pacs.dimse.tls`` (and a DIMSE research-PACS target's ``tls``): every association is made over
    TLS, the PACS's certificate checked against ``ca_bundle`` and its host name (never skipped)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_bundle: Path = Field(description="Absolute path of the PEM file of the CA the PACS's certificate is checked "
                            "against. Verification is always on; nothing turns it off.")
    client_cert: Path | None = Field(None, description="Absolute path of our certificate (PEM), for a PACS that "
                                     "requires the client's certificate. Also our storage SCP's certificate for C-MOVE.")
    client_key: Path | None = Field(None, description="Absolute path of the private key (PEM, readable by this user "
                                    "only) of client_cert.")
    client_key_password_env: str | None = Field(None, description="Environment variable holding the client_key's "
                                                "password, when the key is encrypted.")
    server_name: str | None = Field(None, description="Name the PACS's certificate must carry (default: the host). "
                                    "For a certificate made for a DNS name while host is an address.")

    @field_validator("ca_bundle", "client_cert", "client_key")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("must be an absolute path to a PEM file")
        return v

    @field_validator("client_key_password_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("give the NAME of an environment variable (letters, digits, _), never the password itself")
        return v

    @model_validator(mode="after")
    def _pair(self) -> "DimseTlsSettings":
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("give both client_cert and client_key, or neither")
        return self
