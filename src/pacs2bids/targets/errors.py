"""What a store's failure means for the person running pacs2bids: one line naming the cause and the
fix. Messages carry the exception's kind and the store's own words, never a credential (no
library used here puts one in its messages; the values are also blanked should one appear)."""

from __future__ import annotations

import errno
import socket

from ..config.targets import StorageTargetSettings
from .lock import LockBusy
from .stores import MissingCredential


def _credential_names(settings: StorageTargetSettings) -> str:
    names = [n for n in (settings.access_key_id_env, settings.secret_access_key_env, settings.password_env,
                         settings.key_passphrase_env) if n]
    if settings.credentials_block:
        names.append(f"Prefect block {settings.credentials_block}")
    if settings.key_file:
        names.append(f"key file {settings.key_file}")
    return ", ".join(names) or "the store's default credentials (AWS_* variables, ~/.ssh keys)"


def _kind(exc: BaseException) -> str:
    """paramiko and botocore without importing them when not installed."""
    return f"{type(exc).__module__}.{type(exc).__name__}"


def describe(exc: BaseException, settings: StorageTargetSettings) -> str:
    text = str(exc) or type(exc).__name__
    kind = _kind(exc)
    if isinstance(exc, LockBusy):
        return str(exc)
    if isinstance(exc, MissingCredential):
        return f"{text}: export it (the spec names the variable, never the value)"
    if isinstance(exc, PermissionError) or "AuthenticationException" in kind or "SignatureDoesNotMatch" in text \
            or "InvalidAccessKeyId" in text or "Access Denied" in text:
        return f"credentials refused ({text}); check {_credential_names(settings)}"
    if "BadHostKeyException" in kind or "SSHException" in kind and "not found in known_hosts" in text:
        return (f"the server's host key is not the one known ({text}); add it to "
                f"{settings.known_hosts or '~/.ssh/known_hosts'} (ssh-keyscan), after checking it")
    if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError, socket.gaierror)) or any(
            k in kind for k in ("EndpointConnectionError", "ConnectTimeout", "ReadTimeout", "NoValidConnections",
                                "ClientConnectorError", "ServerDisconnected", "ConnectionClosed")) \
            or "Unable to connect" in text or "Connection refused" in text:
        return f"cannot reach the store ({type(exc).__name__}: {text}); check its address and that it is up"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the store ({text}); free space there or raise the quota"
    if "size mismatch in put" in text:  # paramiko: the SFTP server kept fewer bytes than were sent
        return (f"the server stored a file short ({text}): no space left on it, or a quota reached; free space "
                "there or raise the quota")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"the bucket does not exist ({text}); create it, or fix the url"
    if isinstance(exc, FileNotFoundError):
        return f"a path does not exist on the store ({text}); create the target's folder, or fix the url"
    return f"{type(exc).__name__}: {text}"


def blank_secrets(message: str, environ, settings: StorageTargetSettings) -> str:
    """``message`` with the values of the credential variables the spec names replaced by ***."""
    for name in (settings.access_key_id_env, settings.secret_access_key_env, settings.password_env,
                 settings.key_passphrase_env):
        value = environ.get(name) if name else None
        if value and len(value) >= 4:
            message = message.replace(value, "***")
    return message

