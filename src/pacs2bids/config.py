"""The project spec: typed, validated on load, resolved once at the flow's entry.

A spec is a YAML file. Relative paths in it are relative to the spec file. Unknown keys are
refused, naming the key. The project secret is read from the environment variable the spec
names and is never written anywhere: it is held as a :class:`pydantic.SecretStr`, whose
``repr`` hides it, and :meth:`ProjectSpec.public_dict` (what provenance records) leaves it out.
"""

from __future__ import annotations

import csv
import os
import re
from datetime import date, time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import SpecError

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
MIN_SECRET_CHARS = 16  # non-space characters in the project key


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

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


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
    study_description: str | None = Field(None, description="Regex a study description must match.")
    series_description: str | None = Field(None, description="Regex a series description must match.")
    exclude_series_description: str | None = Field(
        None, description="Regex: series whose description matches are left out."
    )
    merged_records: bool = Field(
        False,
        description="Several patient IDs under one subject are one person's merged hospital records (each row "
        "names one of them). Without it such rows are refused, as a likely mix-up of two people. One patient ID "
        "under two subjects is always refused.",
    )

    @field_validator("study_description", "series_description", "exclude_series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


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
        from .deid.profile import Profile  # late: the profile reads package data
        from .errors import SpecError

        try:
            Profile(options=[], keep_text=v)
        except SpecError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return v
    key_store: Path | None = Field(
        None, description="Where the encrypted matching key lives (default: beside work_dir, never under output)."
    )


class RetrySettings(_Model):
    attempts: int = Field(3, ge=0, le=20, description="Retries of a network stage on transient failures.")
    backoff_seconds: float = Field(2.0, ge=0, description="First back-off; doubles at each retry.")


class ProjectSpec(_Model):
    """A research project's extraction spec."""

    project: str = Field(description="Project code: names the dataset and keys its pseudonyms.")
    pacs: PacsSettings
    selection: SelectionSettings
    pseudonymization: PseudonymizationSettings = Field(default_factory=PseudonymizationSettings)
    heuristic: str = Field("auto", description="A heuristic shipped in heuristics/, or a path to one.")
    output: Path = Field(description="Local folder where the finished BIDS dataset appears.")
    work_dir: Path | None = Field(
        None, description="Scratch space for retrieval and conversion (default: beside output, hidden)."
    )
    retries: RetrySettings = Field(default_factory=RetrySettings)
    dataset_name: str | None = Field(None, description="Name in dataset_description.json (default: project).")
    sidecar_fields: dict[str, dict[str, str | int | float | bool | list[str | int | float]]] = Field(
        default_factory=dict,
        description="Per BIDS suffix, sidecar fields the project knows from its protocol and the images do not "
                    "hold (e.g. asl: {ArterialSpinLabelingType: PCASL, PostLabelingDelay: 1.8}). They fill only "
                    "fields missing from dcm2niix's sidecar, never replace what the images say (heuristic auto).",
    )

    # resolved at load, not from YAML
    spec_path: Path | None = Field(None, exclude=True)
    secret: SecretStr | None = Field(None, exclude=True, repr=False)
    inclusions: tuple[Inclusion, ...] = Field((), exclude=True, repr=False)

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

    def public_dict(self) -> dict:
        """The resolved configuration without secrets or identifiers, for provenance."""
        d = self.model_dump(mode="json", by_alias=True, exclude={"spec_path", "secret", "inclusions"})
        d["work_dir"] = str(self.resolved_work_dir)
        d["inclusion_count"] = len(self.inclusions)
        return d


def _format_validation_error(spec_path: Path, exc: ValidationError) -> str:
    lines = [f"spec {spec_path} is invalid:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (check its spelling and indentation)")
        elif err["type"] == "missing":
            lines.append(f"  - {key}: required key is missing")
        else:
            lines.append(f"  - {key}: {err['msg']}")
    return "\n".join(lines)


def _resolve(base: Path, p: Path | str | None) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else (base / p).resolve()


def read_inclusions(path: Path, *, merged_records: bool = False) -> tuple[Inclusion, ...]:
    """Read the inclusion CSV (columns: patient_id or accession_number, subject[, session]).

    Subject and session labels must be BIDS labels (letters and digits); a leading ``sub-``
    or ``ses-`` is accepted and removed. Rows that would split one person or merge two are
    refused: one patient ID (or accession number) under two subjects always, several patient IDs
    under one subject unless ``merged_records`` (``selection.merged_records``) says they are
    one person's records. Raises :class:`SpecError` naming the rows (never the identifiers).
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise SpecError(f"selection.inclusions: cannot read {path}: {exc.strerror}") from None
    with handle:
        sample = handle.read(4096)
        handle.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(handle, dialect=dialect)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "subject" not in fields or not ({"patient_id", "accession_number"} & set(fields)):
            raise SpecError(
                f"selection.inclusions: {path} needs a 'subject' column and a 'patient_id' or "
                f"'accession_number' column; found {fields}"
            )
        rows: list[Inclusion] = []
        seen: dict[tuple, int] = {}
        for n, raw in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            if not any(row.values()):
                continue
            subject = row.get("subject", "").removeprefix("sub-")
            session = row.get("session", "").removeprefix("ses-") or None
            pid = row.get("patient_id") or None
            acc = row.get("accession_number") or None
            if not _LABEL.match(subject):
                raise SpecError(f"selection.inclusions: {path} row {n}: subject must be letters and digits only")
            if session is not None and not _LABEL.match(session):
                raise SpecError(f"selection.inclusions: {path} row {n}: session must be letters and digits only")
            if not pid and not acc:
                raise SpecError(f"selection.inclusions: {path} row {n}: give a patient_id or an accession_number")
            key = (pid, acc, session)
            if key in seen:
                raise SpecError(f"selection.inclusions: {path} row {n} repeats row {seen[key]}")
            seen[key] = n
            rows.append(Inclusion(row=n, subject=subject, session=session, patient_id=pid, accession_number=acc))
    if not rows:
        raise SpecError(f"selection.inclusions: {path} has no rows")
    _refuse_split_or_merged(path, rows, merged_records)
    return tuple(rows)


def _refuse_split_or_merged(path: Path, rows: list[Inclusion], merged_records: bool) -> None:
    """One identifier under two subjects publishes one person twice; two patient IDs under one
    subject publishes two people as one, unless they are one person's merged records."""
    def rows_text(found: list[Inclusion]) -> str:
        return ", ".join(f"{r.row} (sub-{r.subject})" for r in found)

    for attr, what in (("patient_id", "patient ID"), ("accession_number", "accession number")):
        by_value: dict[str, list[Inclusion]] = {}
        for r in rows:
            if getattr(r, attr):
                by_value.setdefault(getattr(r, attr), []).append(r)
        for found in by_value.values():
            if len({r.subject for r in found}) > 1:
                raise SpecError(
                    f"selection.inclusions: {path} rows {rows_text(found)} give one {what} to "
                    f"{len({r.subject for r in found})} subjects: one person would be published as several. "
                    "Keep one subject per person (sessions tell the visits apart)"
                )
    if merged_records:
        return
    by_subject: dict[str, list[Inclusion]] = {}
    for r in rows:
        if r.patient_id:
            by_subject.setdefault(r.subject, []).append(r)
    for subject, found in by_subject.items():
        if len({r.patient_id for r in found}) > 1:
            raise SpecError(
                f"selection.inclusions: {path} rows {rows_text(found)} give {len({r.patient_id for r in found})} "
                f"different patient IDs to sub-{subject}: two people would be published as one. Fix the rows, "
                "or, if they are one person's merged hospital records, set selection.merged_records: true"
            )


# folders no dataset may replace or live in (equal to, or, for the first group, anywhere under)
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                 "/sys", "/usr")
_SYSTEM_FOLDERS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var", "/var/tmp", "/var/lib")


def _within(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def _check_locations(spec_path: Path, spec: "ProjectSpec") -> None:
    """Refuse an ``output`` that is a system or home folder, and any ``work_dir`` or ``key_store``
    inside ``output`` (or ``output`` inside them): publishing replaces ``output`` whole, so a key
    store there would be deleted (or published), and a work folder there copied into itself.
    Paths are compared as written and with symlinks followed."""
    out = Path(os.path.abspath(spec.output))
    out_real = Path(os.path.realpath(out))
    home = Path(os.path.realpath(os.path.expanduser("~")))
    for p in {out, out_real}:
        if (str(p) in _SYSTEM_FOLDERS or any(_within(p, Path(t)) for t in _SYSTEM_TREES)
                or _within(home, p)):
            raise SpecError(
                f"spec {spec_path}: output: {spec.output} is a system folder or the home folder (or holds it), which "
                "publishing would replace; give a folder of its own, e.g. ~/datasets/" + spec.project
            )
    versions = out.parent / f".{out.name}.versions"  # where the published versions live (pacs2bids.publish)
    outputs = {out, out_real, Path(os.path.realpath(versions))}
    for key, value in (("work_dir", spec.resolved_work_dir), ("pseudonymization.key_store", spec.resolved_key_store)):
        lexical, real = Path(os.path.abspath(value)), Path(os.path.realpath(value))
        if any(_within(v, o) for v in (lexical, real) for o in outputs):
            raise SpecError(
                f"spec {spec_path}: {key}: {value} is inside output {spec.output}; publishing replaces output "
                f"whole, so it would be lost or published. Move {key} outside output (by default it sits beside it)"
            )
        if any(_within(o, v) for v in (lexical, real) for o in (out, out_real)):
            raise SpecError(
                f"spec {spec_path}: output: {spec.output} is inside {key} {value}; give output a folder outside "
                f"{key}"
            )


def load_spec(path: str | Path, *, environ: dict[str, str] | None = None, require_secret: bool = True) -> ProjectSpec:
    """Load, validate and resolve a project spec.

    Relative paths are made absolute against the spec's folder; the inclusion list is read;
    the secret is taken from the environment. Raises :class:`SpecError` naming the key.
    """
    spec_path = Path(path).resolve()
    environ = os.environ if environ is None else environ
    try:
        raw = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"cannot read spec {spec_path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec {spec_path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec {spec_path} must be a mapping of keys (project, pacs, selection, ...)")
    try:
        spec = ProjectSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(spec_path, exc)) from None

    base = spec_path.parent
    selection = spec.selection.model_copy(update={"inclusions": _resolve(base, spec.selection.inclusions)})
    pseudo = spec.pseudonymization.model_copy(
        update={"key_store": _resolve(base, spec.pseudonymization.key_store)}
    )
    if spec.heuristic and ("/" in spec.heuristic or spec.heuristic.endswith(".py")):
        heuristic = str(_resolve(base, spec.heuristic))
        if not Path(heuristic).is_file():
            raise SpecError(f"spec {spec_path}: heuristic: no file at {heuristic}")
    else:
        heuristic = spec.heuristic
        from .heuristic_path import heuristic_file  # local: avoids import cycles

        try:
            heuristic_file(heuristic)
        except FileNotFoundError as exc:
            raise SpecError(f"spec {spec_path}: heuristic: {exc}") from None
    out = Path(os.path.expanduser(str(spec.output)))
    # not through output's own symlink, which names its published version (pacs2bids.publish)
    out = _resolve(base, out.parent) / out.name if out.name not in ("", ".", "..") else _resolve(base, out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"spec {spec_path}: output: {out} exists and is not a folder")
    work_dir = _resolve(base, spec.work_dir)
    located = spec.model_copy(update={"output": out, "work_dir": work_dir, "pseudonymization": pseudo})
    _check_locations(spec_path, located)
    secret = None
    if require_secret:
        value = environ.get(spec.pseudonymization.secret_env)
        if not value:
            raise SpecError(
                f"spec {spec_path}: pseudonymization.secret_env: environment variable "
                f"{spec.pseudonymization.secret_env} is not set; export the project's key there"
            )
        if len("".join(value.split())) < MIN_SECRET_CHARS:
            raise SpecError(
                f"spec {spec_path}: pseudonymization.secret_env: the key in "
                f"{spec.pseudonymization.secret_env} is shorter than {MIN_SECRET_CHARS} non-space characters; "
                "use a random key, e.g. the output of `openssl rand -hex 32`"
            )
        secret = SecretStr(value)
    from .publish import output_owner_problem  # local: publish imports nothing of the spec

    problem = output_owner_problem(out, spec.project, secret.get_secret_value().encode() if secret else None)
    if problem:
        raise SpecError(f"spec {spec_path}: output: {problem}")
    inclusions = read_inclusions(selection.inclusions, merged_records=selection.merged_records)
    return spec.model_copy(
        update={
            "selection": selection,
            "pseudonymization": pseudo,
            "heuristic": heuristic,
            "output": out,
            "work_dir": work_dir,
            "spec_path": spec_path,
            "secret": secret,
            "inclusions": inclusions,
        }
    )
