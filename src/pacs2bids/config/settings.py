"""The spec's settings models: typed, validated, with unknown keys refused.

The secret is held as a :class:`pydantic.SecretStr`, whose ``repr`` hides it; it and the
inclusion rows are excluded from dumps (they are filled by :func:`pacs2bids.config.load_spec`).
"""

from __future__ import annotations

import re
from datetime import date, time
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from ..errors import SpecError
from .qc import QcSettings, Regex
from .operations import RetentionSettings, TaskRunnerSettings
from .staging import StagingSettings
from .derivatives import DerivativesSettings
from .targets import TargetSettings, move_url_output
from .tls import DimseTlsSettings


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DimseSettings(_Model):
    """A DIMSE peer (C-ECHO, C-FIND, C-GET, C-MOVE)."""

    ae_title: str = Field(description="The PACS's AE title (called AE).")
    host: str = Field(description="The PACS's host name or address.")
    port: int = Field(ge=1, le=65535, description="The PACS's DICOM port.")
    calling_ae_title: str = Field("PACS2BIDS", description="Our AE title, as the PACS knows it.")
    retrieve: Literal["c-get", "c-move"] = Field("c-get", description="How instances are retrieved.")
    move_destination: str | None = Field(
        None,
        description="For C-MOVE: the AE title the PACS sends to (our storage SCP). "
        "Defaults to calling_ae_title.",
    )
    storage_host: str = Field("127.0.0.1", description="For C-MOVE: the address our storage SCP binds.")
    storage_port: int = Field(
        0, ge=0, le=65535, description="For C-MOVE: the port our storage SCP listens on (0: any free port)."
    )
    max_associations: int = Field(
        2, ge=1, le=32,
        description="Associations one process opens at once to this PACS (its pool). Every run and worker "
        "together stay within pacs.max_associations, whatever this says.",
    )
    storage_max_associations: int = Field(
        4, ge=1, le=64,
        description="For C-MOVE: associations the PACS may hold open at once to our storage SCP; one more is "
        "refused (A-ASSOCIATE-RJ, transient, local limit exceeded) and its instances are fetched again by the "
        "next attempt. The default leaves room for max_associations C-MOVEs at once, each with a spare.",
    )
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for a DIMSE or network answer.")
    tls: DimseTlsSettings | None = Field(None, description="DICOM TLS for every association (config/tls.py).")

    @field_validator("ae_title", "calling_ae_title", "move_destination")
    @classmethod
    def _ae_title(cls, v: str | None) -> str | None:
        if v is not None and not (1 <= len(v.strip()) <= 16):
            raise ValueError("an AE title has 1 to 16 characters")
        return v


class DicomwebSettings(_Model):
    """A DICOMweb peer (QIDO-RS, WADO-RS)."""

    url: str = Field(description="The DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web.")
    username_env: str | None = Field(None, description="Environment variable holding the user name.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    timeout: float = Field(120.0, gt=0, description="Seconds to wait for an HTTP answer.")
    ca_bundle: Path | None = Field(
        None, description="Absolute path of the PEM file of the CA (or self-signed certificate) an https PACS is "
        "checked against, when it is not in the system's store. TLS is always verified; nothing turns that off.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("must be an absolute path (the PEM file of the PACS's CA)")
        return v


class TimeWindow(_Model):
    """A period in which retrieval is allowed; may cross midnight (start after end)."""

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=lambda: ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        description="Days on which the window opens.",
    )
    start: time = Field(description="Opening time, local (HH:MM).")
    end: time = Field(description="Closing time, local (HH:MM); before start means the next day.")


class PacsSettings(_Model):
    """Where the studies come from: DIMSE, DICOMweb, or both (DIMSE first)."""

    dimse: DimseSettings | None = None
    dicomweb: DicomwebSettings | None = None
    transport: Literal["dimse", "dicomweb"] | None = Field(
        None, description="Which transport to use when both are given (default: dimse)."
    )
    windows: list[TimeWindow] = Field(
        default_factory=list,
        description="Retrieval windows (e.g. nights and week-ends); outside them a run waits. Empty: always.",
    )
    fallback: Literal["dimse", "dicomweb"] | None = Field(
        None,
        description="Transport tried for the series the chosen one could not retrieve whole "
        "(both transports must be configured).",
    )
    instances_per_minute: int | None = Field(
        None, ge=1,
        description="Optional cap on instances received per minute from this PACS, across every run "
        "(each of the max_associations slots gets its share).",
    )
    max_associations: int = Field(
        2, ge=1, le=64,
        description="Connections open at once to this PACS, across every run and worker: DIMSE associations "
        "(C-ECHO, C-FIND, C-GET, C-MOVE) and DICOMweb requests in flight. A Prefect global concurrency limit "
        "named after the PACS; each connection holds one slot while it is open.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "max_concurrent_studies" in data:
            raise ValueError(
                "max_concurrent_studies is no longer read: the shared per-PACS limit now counts connections, "
                "not studies. Rename it to pacs.max_associations (a study uses one association at a time)"
            )
        return data

    @model_validator(mode="after")
    def _one_transport(self) -> "PacsSettings":
        if self.dimse is None and self.dicomweb is None:
            raise ValueError("give pacs.dimse or pacs.dicomweb")
        chosen = self.transport or ("dimse" if self.dimse else "dicomweb")
        if getattr(self, chosen) is None:
            raise ValueError(f"pacs.transport is {chosen!r} but pacs.{chosen} is not given")
        if self.fallback is not None:
            if self.fallback == chosen:
                raise ValueError(f"pacs.fallback {self.fallback!r} is already the chosen transport")
            if getattr(self, self.fallback) is None:
                raise ValueError(f"pacs.fallback is {self.fallback!r} but pacs.{self.fallback} is not given")
        return self

    @property
    def chosen(self) -> str:
        return self.transport or ("dimse" if self.dimse else "dicomweb")


class DateRange(_Model):
    start: date | None = Field(None, alias="from", description="First study date included.")
    end: date | None = Field(None, alias="to", description="Last study date included.")


class Inclusion(_Model):
    """One row of the inclusion list. ``patient_id`` and ``accession_number`` identify a
    patient: they live in memory only and are never logged or written."""

    row: int
    subject: str
    session: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None

    def __repr__(self) -> str:  # identifiers stay out of reprs, hence out of logs
        return f"Inclusion(row={self.row}, subject={self.subject!r}, session={self.session!r})"

    __str__ = __repr__


class SelectionSettings(_Model):
    inclusions: Path = Field(description="CSV: patient_id or accession_number, subject[, session].")
    study_date: DateRange | None = Field(None, description="Study date range.")
    modalities: list[str] = Field(default_factory=lambda: ["MR"], description="Series modalities kept.")
    study_description: Regex | None = Field(None, description="Regex a study description must match.")
    series_description: Regex | None = Field(None, description="Regex a series description must match.")
    exclude_series_description: Regex | None = Field(
        None, description="Regex: series whose description matches are left out."
    )
    merged_records: bool = Field(
        False,
        description="Several patient IDs under one subject are one person's merged hospital records (each row "
        "names one of them). Without it such rows are refused, as a likely mix-up of two people. One patient ID "
        "under two subjects is always refused.",
    )


class PseudonymizationSettings(_Model):
    secret_env: str = Field(
        "PACS2BIDS_PROJECT_SECRET",
        description="Environment variable holding the project's key (at least 16 characters).",
    )
    options: list[str] | None = Field(
        None,
        description="PS3.15 Annex E options applied on top of the Basic profile "
        "(default: the research default of pacs2bids.deid).",
    )
    keep_private: list[str] = Field(
        default_factory=list,
        description="Extra private attributes kept, as 'gggg,\"CREATOR\",ee' (element within the block).",
    )
    allow_sop_classes: list[str] = Field(
        default_factory=list, description="SOP Class UIDs kept although dropped by default (SR, PR, KO...)."
    )
    keep_text: list[str] = Field(
        default_factory=lambda: ["SeriesDescription", "ProtocolName"],
        description="Free-text descriptors (DICOM keywords of Table E.1-1 rows that the Clean Descriptors option "
        "cleans) kept, after cleaning of identifiers, phone numbers, e-mail addresses and NIRs; every other "
        "descriptor is removed or emptied as the Basic profile says. Default: SeriesDescription and ProtocolName "
        "(series classification reads them).",
    )

    @field_validator("keep_text")
    @classmethod
    def _free_text_descriptors(cls, v: list[str]) -> list[str]:
        from ..deid.profile import Profile  # late: the profile reads package data

        try:
            Profile(options=[], keep_text=v)
        except SpecError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return v
    key_store: Path | None = Field(
        None, description="Where the encrypted matching key lives (default: beside work_dir, never under output)."
    )
    workers: int | None = Field(
        None, ge=1, description="Worker processes that pseudonymise files at once (default: PACS2BIDS_DEID_WORKERS, "
        "else the machine's cores; 1 pseudonymises in the run's own process).",
    )


class RetrySettings(_Model):
    attempts: int = Field(3, ge=0, le=20, description="Retries of a network stage on transient failures.")
    backoff_seconds: float = Field(2.0, ge=0, description="First back-off; doubles at each retry.")


class ReplicationSettings(_Model):
    late_days: int = Field(
        7, ge=0, le=3650, description="replicate_project asks again for the studies dated up to this many days "
        "before the last successful replication: series that reached the PACS late (pacs2bids.replicate).")


class ProjectSpec(_Model):
    """A research project's extraction spec."""

    project: str = Field(description="Project code: names the dataset and keys its pseudonyms.")
    pacs: PacsSettings
    selection: SelectionSettings
    pseudonymization: PseudonymizationSettings = Field(default_factory=PseudonymizationSettings)
    heuristic: str = Field("auto", description="A heuristic shipped in heuristics/, or a path to one.")
    output: Path = Field(description="Local folder where the finished BIDS dataset appears, or a URL (s3://, sftp://): "
                         "then the dataset is published locally in a hidden folder and copied there (docs/STORAGE.md).")
    targets: list[TargetSettings] = Field(
        default_factory=list, description="More places each published version is copied to (docs/STORAGE.md).")
    output_url: str | None = Field(None, description="Set from a URL output (the first target); not to be written.")
    work_dir: Path | None = Field(
        None, description="Scratch space for retrieval and conversion (default: beside output, hidden)."
    )
    retries: RetrySettings = Field(default_factory=RetrySettings)
    retention: RetentionSettings | None = Field(None, description="How long versions are kept (config/operations.py).")
    task_runner: TaskRunnerSettings = Field(default_factory=TaskRunnerSettings,
                                            description="Where each study's work runs (config/operations.py).")
    staging: StagingSettings | None = Field(None, description="Where studies' results go (config/staging.py).")
    derivatives: DerivativesSettings = Field(
        default_factory=DerivativesSettings, description="Derivatives written under derivatives/ (defacing: issue 15).")
    replication: ReplicationSettings = Field(default_factory=ReplicationSettings)
    dataset_name: str | None = Field(None, description="Name in dataset_description.json (default: project).")
    sidecar_fields: dict[str, dict[str, str | int | float | bool | list[str | int | float]]] = Field(
        default_factory=dict,
        description="Per BIDS suffix, sidecar fields the project knows from its protocol and the images do not "
                    "hold (e.g. asl: {ArterialSpinLabelingType: PCASL, PostLabelingDelay: 1.8}). They fill only "
                    "fields missing from dcm2niix's sidecar, never replace what the images say (heuristic auto).",
    )

    qc: QcSettings = Field(default_factory=QcSettings, description="Protocol conformity QC (config/qc.py).")

    # resolved at load, not from YAML
    spec_path: Path | None = Field(None, exclude=True)
    secret: SecretStr | None = Field(None, exclude=True, repr=False)
    inclusions: tuple[Inclusion, ...] = Field((), exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _url_output(cls, data):
        return move_url_output(data) if isinstance(data, dict) else data

    @field_validator("sidecar_fields")
    @classmethod
    def _sidecar_fields(cls, v: dict) -> dict:
        for suffix, fields in v.items():
            if not re.fullmatch(r"[A-Za-z0-9]+", suffix):
                raise ValueError(f"sidecar_fields: {suffix!r} is not a BIDS suffix (letters and digits, e.g. asl, pet)")
            bad = [k for k in fields if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", k)]
            if bad:
                raise ValueError(f"sidecar_fields.{suffix}: {', '.join(map(repr, bad))} not a BIDS sidecar field name "
                                 "(CamelCase, e.g. PostLabelingDelay)")
        return v

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit")
        return v

    # -- derived locations -------------------------------------------------------------
    @property
    def resolved_work_dir(self) -> Path:
        if self.work_dir is not None:
            return self.work_dir
        return self.output.parent / f".{self.output.name}.pacs2bids-work"

    @property
    def resolved_key_store(self) -> Path:
        if self.pseudonymization.key_store is not None:
            return self.pseudonymization.key_store
        return self.resolved_work_dir.parent / f".{self.project}.pacs2bids-keys"

    @property
    def secret_bytes(self) -> bytes:
        if self.secret is None:
            raise SpecError(f"project {self.project}: no secret loaded; set {self.pseudonymization.secret_env}")
        return self.secret.get_secret_value().encode()
