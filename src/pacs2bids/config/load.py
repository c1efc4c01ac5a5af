"""Loading a spec: read the YAML, validate it, resolve its paths, the secret and the inclusion list."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import SecretStr, ValidationError

from ..errors import SpecError
from .inclusions import read_inclusions
from .locations import check_locations, resolve_path
from .settings import ProjectSpec

MIN_SECRET_CHARS = 16  # non-space characters in the project key


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


def _validated(spec_path: Path) -> ProjectSpec:
    """The spec as written, validated (paths not yet resolved)."""
    try:
        raw = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"cannot read spec {spec_path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec {spec_path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec {spec_path} must be a mapping of keys (project, pacs, selection, ...)")
    try:
        return ProjectSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(spec_path, exc)) from None


def _heuristic(spec_path: Path, heuristic: str) -> str:
    """A path to a heuristic file, made absolute, or the name of a shipped one; both must exist."""
    if heuristic and ("/" in heuristic or heuristic.endswith(".py")):
        path = str(resolve_path(spec_path.parent, heuristic))
        if not Path(path).is_file():
            raise SpecError(f"spec {spec_path}: heuristic: no file at {path}")
        return path
    from ..heuristic_path import heuristic_file  # local: avoids import cycles

    try:
        heuristic_file(heuristic)
    except FileNotFoundError as exc:
        raise SpecError(f"spec {spec_path}: heuristic: {exc}") from None
    return heuristic


def _output(spec_path: Path, output: Path) -> Path:
    out = Path(os.path.expanduser(str(output)))
    base = spec_path.parent
    # not through output's own symlink, which names its published version (pacs2bids.publish)
    out = resolve_path(base, out.parent) / out.name if out.name not in ("", ".", "..") else resolve_path(base, out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"spec {spec_path}: output: {out} exists and is not a folder")
    return out


def _secret(spec_path: Path, spec: ProjectSpec, environ) -> SecretStr:
    name = spec.pseudonymization.secret_env
    value = environ.get(name)
    if not value:
        raise SpecError(
            f"spec {spec_path}: pseudonymization.secret_env: environment variable "
            f"{name} is not set; export the project's key there"
        )
    if len("".join(value.split())) < MIN_SECRET_CHARS:
        raise SpecError(
            f"spec {spec_path}: pseudonymization.secret_env: the key in "
            f"{name} is shorter than {MIN_SECRET_CHARS} non-space characters; "
            "use a random key, e.g. the output of `openssl rand -hex 32`"
        )
    return SecretStr(value)


def load_spec(path: str | Path, *, environ: dict[str, str] | None = None, require_secret: bool = True) -> ProjectSpec:
    """Load, validate and resolve a project spec.

    Relative paths are made absolute against the spec's folder; the inclusion list is read;
    the secret is taken from the environment. Raises :class:`SpecError` naming the key.
    """
    spec_path = Path(path).resolve()
    environ = os.environ if environ is None else environ
    spec = _validated(spec_path)
    base = spec_path.parent
    selection = spec.selection.model_copy(update={"inclusions": resolve_path(base, spec.selection.inclusions)})
    pseudo = spec.pseudonymization.model_copy(
        update={"key_store": resolve_path(base, spec.pseudonymization.key_store)}
    )
    heuristic = _heuristic(spec_path, spec.heuristic)
    out = _output(spec_path, spec.output)
    work_dir = resolve_path(base, spec.work_dir)
    located = spec.model_copy(update={"output": out, "work_dir": work_dir, "pseudonymization": pseudo})
    check_locations(spec_path, located)
    secret = _secret(spec_path, spec, environ) if require_secret else None
    from ..publish import output_owner_problem  # local: publish imports nothing of the spec

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
