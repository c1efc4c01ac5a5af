"""The environment a child process gets: only what it needs, never the project's key.

Every tool pacs2bids starts (the BIDS validator, which deno runs with ``--allow-env
--allow-net``; tesseract; dcm2niix; Orthanc) would otherwise inherit the whole environment,
the project secret included. :func:`child_env` builds an allow-list instead: the search path,
home, locale, temporary folder and time zone, plus the few variables a tool is known to read.
A name that looks like a credential is dropped even when it is on the list or passed as an
extra, so that a secret cannot reach a child by a careless ``child_env(MY_TOKEN=...)``.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

# what every child may see
ALLOWED = frozenset({
    "PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR", "TMP", "TEMP", "TZ",
    # deno (the BIDS validator) keeps its module cache here; CA bundles for HTTPS
    "DENO_DIR", "XDG_CACHE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR",
    # nipype/heudiconv: no update check over the network
    "NIPYPE_NO_ET", "NO_ET",
    # tesseract's language data, when installed outside the default place
    "TESSDATA_PREFIX",
    "NO_COLOR",
})
ALLOWED_PREFIXES = ("LC_",)

# never passed on, whatever the allow-list or the caller says
_DENIED = re.compile(r"^(PACS2BIDS_.*|AWS_.*|.*(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|PRIVATE_KEY).*)$",
                     re.IGNORECASE)


def denied(name: str) -> bool:
    """True for a variable name no child may receive (PACS2BIDS_*, AWS_*, *SECRET*, *TOKEN*,
    *PASSWORD* and the like)."""
    return bool(_DENIED.match(name))


def child_env(*, environ: Mapping[str, str] | None = None, deny: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment for a child process: the allow-listed variables of ``environ`` (default
    ``os.environ``), then ``extra``; without any name in ``deny`` (give the spec's
    ``pseudonymization.secret_env`` there when it has an innocent-looking name) and without
    any name :func:`denied` refuses. Raises ValueError when ``extra`` holds a denied name:
    that is a bug in the caller, not something to drop silently."""
    environ = os.environ if environ is None else environ
    bad = sorted(k for k in extra if denied(k) or k in deny)
    if bad:
        raise ValueError(f"child_env: refusing to pass {', '.join(bad)} to a child process (credentials stay "
                         "in pacs2bids)")
    env = {k: v for k, v in environ.items()
           if (k in ALLOWED or k.startswith(ALLOWED_PREFIXES)) and not denied(k) and k not in deny}
    env.update({k: str(v) for k, v in extra.items()})
    return env
