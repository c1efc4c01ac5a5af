"""Where a spec's folders may be: paths resolved against the spec, and the folders refused.

Publishing replaces ``output`` whole, so ``output`` may be neither a system nor a home folder, and
the work folder and the key store may not live inside it (nor it inside them).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SpecError
from .settings import ProjectSpec


def resolve_path(base: Path, p: Path | str | None) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else (base / p).resolve()


# folders no dataset may replace or live in (equal to, or, for the first group, anywhere under)
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                 "/sys", "/usr")
_SYSTEM_FOLDERS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var", "/var/tmp", "/var/lib")


def _within(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def check_locations(spec_path: Path, spec: ProjectSpec) -> None:
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
