"""DICOM TLS (PS3.15 B.1) for every DIMSE association: the client side (C-ECHO, C-FIND, C-GET,
C-MOVE, C-STORE to a research PACS) and our storage SCP's side (the PACS's C-STORE after a C-MOVE).

The PACS's certificate is always checked against the spec's ``ca_bundle`` and its host name
(``ssl.CERT_REQUIRED``, ``check_hostname``); nothing here can turn that off. Our certificate and
key (``client_cert``, ``client_key``) are presented when given; the key's content is read by
:mod:`ssl` only, never held or logged here. pynetdicom takes the client context as ``tls_args``
and the server one as ``start_server(ssl_context=...)``.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

from ..config.tls import DimseTlsSettings
from ..errors import PacsError


def _pem(path: Path, what: str, where: str) -> str:
    if not path.is_file():
        raise PacsError(f"DICOM TLS: {where}.{what} {path} is not a file; give the absolute path of the PEM file",
                        transient=False)
    return str(path)


def _load_identity(ctx: ssl.SSLContext, tls: DimseTlsSettings, where: str) -> None:
    if tls.client_cert is None:
        return
    cert = _pem(tls.client_cert, "client_cert", where)
    key = _pem(tls.client_key, "client_key", where)
    password = None
    if tls.client_key_password_env:
        password = os.environ.get(tls.client_key_password_env)
        if password is None:
            raise PacsError(f"DICOM TLS: {where}.client_key_password_env names {tls.client_key_password_env}, which is "
                            "not set; export it (the client_key's password)", transient=False)
    try:
        ctx.load_cert_chain(cert, key, password=(lambda: password) if password is not None else _no_password)
    except (ssl.SSLError, ValueError) as exc:  # the message names no key material
        raise PacsError(f"DICOM TLS: cannot load {where}.client_cert {cert} with its client_key ({exc.__class__.__name__}: "
                        f"{getattr(exc, 'reason', None) or exc}); "
                        "check that the key belongs to the certificate, and for an encrypted key its password "
                        "(client_key_password_env)", transient=False) from None


def _no_password() -> str:
    raise ValueError("the client_key is encrypted: name its password's variable in client_key_password_env")


def _trust(ctx: ssl.SSLContext, tls: DimseTlsSettings, where: str) -> None:
    ca = _pem(tls.ca_bundle, "ca_bundle", where)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise PacsError(f"DICOM TLS: {where}.ca_bundle {ca} holds no PEM certificate ({exc.reason}); give the PEM "
                        "file of the CA that signed the PACS's certificate", transient=False) from None


def client_context(tls: DimseTlsSettings, host: str, where: str = "pacs.dimse.tls") -> tuple[ssl.SSLContext, str]:
    """pynetdicom's ``tls_args`` for an association to ``host``: a context that verifies the PACS
    against ``ca_bundle`` (and no other CA), with the host name checked, presenting our certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _trust(ctx, tls, where)
    _load_identity(ctx, tls, where)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    return ctx, tls.server_name or host


def server_context(tls: DimseTlsSettings, where: str = "pacs.dimse.tls") -> ssl.SSLContext:
    """Our storage SCP's context (C-MOVE over TLS): it presents ``client_cert`` and requires the
    PACS's certificate, signed by the CA of ``ca_bundle``."""
    if tls.client_cert is None:
        raise PacsError(f"DICOM TLS: C-MOVE over TLS needs our storage SCP's certificate: give {where}.client_cert and "
                        "client_key (a certificate the PACS trusts), or retrieve with c-get", transient=False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _trust(ctx, tls, where)
    _load_identity(ctx, tls, where)
    return ctx


def diagnose(tls: DimseTlsSettings, host: str, port: int, timeout: float = 5.0,
             where: str = "pacs.dimse.tls") -> tuple[str, bool]:
    """Why a TLS association could not be had, in words naming the fix ("" when the handshake
    succeeds and the PACS keeps the connection, or no connection is had at all), and whether running
    again may be enough (a refused certificate: never). One extra connection, made only after a failure."""
    ctx, name = client_context(tls, host, where)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:  # refused or silent: not a TLS matter, the caller's message says what to check
        return "", True
    try:
        with ctx.wrap_socket(raw, server_hostname=name) as conn:
            conn.settimeout(min(timeout, 2.0))
            try:
                conn.recv(1)  # TLS 1.3: a refused client certificate arrives as an alert after the handshake
            except (socket.timeout, TimeoutError):
                pass
            return "", True
    except ssl.SSLCertVerificationError as exc:
        return (f"the PACS's certificate was refused ({exc.verify_message}): check that {where}.ca_bundle holds the CA "
                f"that signed it and that it names {name!r} (or set {where}.server_name)"), False
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc.__class__.__name__)
        if "CERTIFICATE" in reason.upper() or "UNKNOWN_CA" in reason.upper():
            return (f"the PACS refused our certificate ({reason}): give {where}.client_cert and client_key, signed by a "
                    "CA the PACS trusts"), False
        return f"the TLS handshake failed ({reason}): check that the PACS's port speaks DICOM TLS", True
    except OSError as exc:  # connected, then reset or closed during the handshake: a plain DICOM port, likely
        return (f"the TLS handshake failed ({type(exc).__name__}): check that the PACS's port speaks DICOM TLS"), True
    finally:
        raw.close()
