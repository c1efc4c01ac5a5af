"""DICOMweb over TLS with credentials (issue 14): a real Orthanc with a login, behind a TLS
terminator with a self-signed certificate. pacs2bids checks the certificate against the spec's
``ca_bundle`` (never skips the check): without it the search is refused as untrusted, with it the
search answers; without the credentials the PACS refuses it.

The terminator (:class:`TlsTerminator`, standard-library ``ssl``) stands in for the site's reverse
proxy: Debian's Orthanc with ``SslEnabled`` crashes (SIGSEGV) on its first HTTPS request here,
and no proxy (nginx, stunnel, socat) is installed. It forwards bytes unchanged.
"""

from __future__ import annotations

import select
import socket
import socketserver
import ssl
import subprocess
import threading

import pytest
import requests

from pacs2bids.config.settings import DicomwebSettings
from pacs2bids.errors import PacsError
from pacs2bids.pacs.dicomweb import WebPacs

USER, PASSWORD = "tls-user", "tls-password-for-this-test-only"


class TlsTerminator(socketserver.ThreadingTCPServer):
    """TLS on 127.0.0.1:<free port>, each connection piped to ``target`` (plain HTTP)."""

    daemon_threads = True

    def __init__(self, certfile: str, keyfile: str, target: tuple[str, int]):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.target = target
        super().__init__(("127.0.0.1", 0), _Pipe)

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            tls = self.server.context.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused our certificate: what the first test expects
        with tls, socket.create_connection(self.server.target) as plain:
            while True:
                ready, _, _ = select.select([tls, plain], [], [], 30)
                if not ready:
                    return
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (plain if src is tls else tls).sendall(data)


@pytest.fixture
def https_pacs(orthanc_factory, sample_dir, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    pacs = orthanc_factory(auth=(USER, PASSWORD), extra={"AuthenticationEnabled": True,
                                                           "RegisteredUsers": {USER: PASSWORD}})
    files = [f for f in sorted((sample_dir / "dcm_qa_philips").rglob("*")) if f.is_file()][:3]
    assert pacs.upload(files)
    proxy = TlsTerminator(str(cert), str(key), ("127.0.0.1", pacs.http_port))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{proxy.port}/dicom-web", cert
    finally:
        proxy.shutdown()
        proxy.server_close()


def settings(url: str, **kw) -> DicomwebSettings:
    return DicomwebSettings(url=url, username_env="TLS_PACS_USER", password_env="TLS_PACS_PASSWORD", **kw)


def test_https_dicomweb_is_trusted_through_the_ca_bundle_only(https_pacs, monkeypatch):
    url, cert = https_pacs
    monkeypatch.setenv("TLS_PACS_USER", USER)
    monkeypatch.setenv("TLS_PACS_PASSWORD", PASSWORD)
    with pytest.raises(PacsError, match="DICOMweb"):  # a self-signed certificate, not in the system's store
        WebPacs(settings(url)).search("studies", {}, ["StudyInstanceUID"])
    found = WebPacs(settings(url, ca_bundle=cert)).search("studies", {}, ["StudyInstanceUID"])
    assert found and all(ds.StudyInstanceUID for ds in found)


def test_https_dicomweb_without_credentials_is_refused(https_pacs, monkeypatch):
    url, cert = https_pacs
    assert requests.get(f"{url}/studies", verify=str(cert), timeout=10).status_code == 401
    monkeypatch.setenv("TLS_PACS_USER", USER)
    monkeypatch.setenv("TLS_PACS_PASSWORD", "wrong")
    with pytest.raises(PacsError, match="HTTP 401"):
        WebPacs(settings(url, ca_bundle=cert)).search("studies", {}, ["StudyInstanceUID"])


def test_a_ca_bundle_must_be_an_absolute_path_to_a_file(tmp_path):
    with pytest.raises(ValueError, match="absolute"):
        DicomwebSettings(url="https://pacs.example.org/dicom-web", ca_bundle="ca.pem")
    with pytest.raises(PacsError, match="not a file"):
        WebPacs(DicomwebSettings(url="https://pacs.example.org/dicom-web", ca_bundle=tmp_path / "missing.pem"))
