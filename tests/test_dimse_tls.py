"""DIMSE over TLS (issue 14) against a real Orthanc with DICOM TLS on (DicomTlsEnabled), which
requires the client's certificate (DicomTlsRemoteCertificateRequired).

A throwaway PKI is made per test with ``cryptography``: a CA, the PACS's certificate (for
127.0.0.1), our certificate, and a second CA with a certificate of its own. Query and retrieval
(C-FIND, C-GET, C-MOVE to our storage SCP over TLS) complete with the spec's ``pacs.dimse.tls``;
a plain association, a client certificate from the other CA, and a PACS certificate not signed by
the CA we trust are all refused, with errors that name the fix.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pacs2bids.config import DimseSettings
from pacs2bids.config.tls import DimseTlsSettings
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.errors import PacsError
from pacs2bids.orthanc import free_port
from pacs2bids.pacs import close_pools, services
from pacs2bids.query import find_studies
from pacs2bids.retrieve import retrieve_study

from test_retrieve import disk_sops, dimse_yaml, make_spec, orthanc_sops, patient_ids
import test_targets_research_pacs

version = test_targets_research_pacs.version  # the module fixture: a pseudonymised published version


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca=False, ip=None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip or "127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert, key) -> tuple[Path, Path]:
    c, k = folder / f"{name}.pem", folder / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    k.chmod(0o600)
    return c, k


def make_pki(folder: Path) -> dict[str, Path]:
    """Two CAs; under the first, the PACS's certificate and ours; under the second, a stranger's."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for ca_name, leaves in (("ca", ("server", "client")), ("other_ca", ("stranger",))):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        out[ca_name], _ = _write(folder, ca_name, ca_cert, ca_key)
        for leaf in leaves:
            key = ec.generate_private_key(ec.SECP256R1())
            out[leaf], out[f"{leaf}_key"] = _write(folder, leaf, _cert(leaf, key, ca_name, ca_key), key)
    return out


def tls_orthanc_config(pki: dict[str, Path]) -> dict:
    return {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki["server"]),
            "DicomTlsPrivateKey": str(pki["server_key"]), "DicomTlsTrustedCertificates": str(pki["ca"]),
            "DicomTlsRemoteCertificateRequired": True}


@pytest.fixture
def pki(tmp_path) -> dict[str, Path]:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_pacs(orthanc_factory, pki, sample_dir):
    """An Orthanc speaking only DICOM TLS, holding the sample; it sends C-MOVE results over TLS to
    PACS2BIDS on a fixed port (Orthanc's modality option UseDicomTls)."""
    move_port = free_port()
    extra = tls_orthanc_config(pki)
    extra["DicomModalities"] = {"PACS2BIDS": {"AET": "PACS2BIDS", "Host": "127.0.0.1", "Port": move_port,
                                              "UseDicomTls": True}}
    o = orthanc_factory(dicomweb=False, extra=extra)
    files = list(iter_dicom_files(sample_dir))
    assert o.upload(files) == len(files)
    o.move_port, o.files = move_port, files
    yield o
    close_pools()


def tls_yaml(pki, cert="client", ca="ca") -> str:
    return (f"    tls:\n      ca_bundle: {pki[ca]}\n      client_cert: {pki[cert]}\n"
            f"      client_key: {pki[cert + '_key']}\n")


def settings(o, pki, **tls) -> DimseSettings:
    return DimseSettings(ae_title=o.aet, host="127.0.0.1", port=o.dicom_port, timeout=10,
                         tls=DimseTlsSettings(**tls) if tls else None)


@pytest.mark.parametrize("retrieve", ["c-get", "c-move"])
def test_query_and_retrieve_over_dicom_tls(tmp_path, tls_pacs, pki, retrieve):
    o = tls_pacs
    rows = [("patient_id", pid, f"S{i}") for i, pid in enumerate(patient_ids(o.files))]
    extra = {"storage_port": o.move_port} if retrieve == "c-move" else {}
    spec = make_spec(tmp_path, dimse_yaml(o, retrieve, **extra) + tls_yaml(pki), rows)
    q = find_studies(spec)
    assert not q.unmatched and len(q.studies) == len(rows)
    raw = tmp_path / "work" / "raw"
    results = [r for st in q.studies for r in retrieve_study(spec, st, raw)]
    assert results and all(r.status == "complete" and r.missing == 0 for r in results), \
        [(r.status, r.reason) for r in results]
    assert set(disk_sops(raw)) == orthanc_sops(o)


def test_a_plain_association_is_refused(tls_pacs, pki):
    with pytest.raises(PacsError, match="cannot open an association"):
        services.echo(settings(tls_pacs, pki))
    # the same PACS answers over TLS
    services.echo(settings(tls_pacs, pki, ca_bundle=pki["ca"], client_cert=pki["client"],
                           client_key=pki["client_key"]))


def test_a_client_certificate_from_another_ca_is_refused(tls_pacs, pki):
    with pytest.raises(PacsError, match="refused our certificate.*client_cert") as err:
        services.echo(settings(tls_pacs, pki, ca_bundle=pki["ca"], client_cert=pki["stranger"],
                               client_key=pki["stranger_key"]))
    assert err.value.transient is False
    with pytest.raises(PacsError, match="refused our certificate"):  # and no certificate at all
        services.echo(settings(tls_pacs, pki, ca_bundle=pki["ca"]))


def test_a_pacs_certificate_not_signed_by_our_ca_is_refused(tls_pacs, pki):
    with pytest.raises(PacsError, match=r"PACS's certificate was refused .*ca_bundle"):
        services.echo(settings(tls_pacs, pki, ca_bundle=pki["other_ca"], client_cert=pki["client"],
                               client_key=pki["client_key"]))


def test_tls_settings_are_checked(tmp_path, pki):
    with pytest.raises(ValueError, match="absolute"):
        DimseTlsSettings(ca_bundle="ca.pem")
    with pytest.raises(ValueError, match="both client_cert and client_key"):
        DimseTlsSettings(ca_bundle=pki["ca"], client_cert=pki["client"])
    s = DimseSettings(ae_title="X", host="127.0.0.1", port=free_port(), timeout=2,
                      tls=DimseTlsSettings(ca_bundle=tmp_path / "missing.pem"))
    with pytest.raises(PacsError, match="ca_bundle .*missing.pem is not a file"):
        services.echo(s)
    # the key's content never appears in an error
    s = DimseSettings(ae_title="X", host="127.0.0.1", port=free_port(), timeout=2,
                      tls=DimseTlsSettings(ca_bundle=pki["ca"], client_cert=pki["client"],
                                           client_key=pki["stranger_key"]))
    with pytest.raises(PacsError, match="cannot load") as err:
        services.echo(s)
    assert "PRIVATE KEY" not in str(err.value)
    close_pools()


def test_a_research_pacs_target_stores_over_dicom_tls(tls_pacs, pki, version):
    from pacs2bids.config.targets import DimseTargetSettings
    from pacs2bids.targets.research_pacs import ResearchPacsError, ResearchPacsTarget

    root, manifest = version
    common = dict(kind="dimse", name="rp", host="127.0.0.1", port=tls_pacs.dicom_port, ae_title=tls_pacs.aet, timeout=10)
    with pytest.raises(ResearchPacsError, match="research PACS rp"):  # a plain association is refused
        ResearchPacsTarget(DimseTargetSettings(**common)).publish(root, manifest)
    tls = DimseTlsSettings(ca_bundle=pki["ca"], client_cert=pki["client"], client_key=pki["client_key"])
    report = ResearchPacsTarget(DimseTargetSettings(**common, tls=tls)).publish(root, manifest)
    assert report.verified and report.sent_files > 0 and not report.failed


def test_an_encrypted_client_key_opens_with_its_password_from_the_environment(tls_pacs, pki, monkeypatch):
    key = serialization.load_pem_private_key(pki["client_key"].read_bytes(), None)
    encrypted = pki["client_key"].with_name("encrypted.key")
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"key-password-for-this-test")))
    tls = dict(ca_bundle=pki["ca"], client_cert=pki["client"], client_key=encrypted)
    with pytest.raises(PacsError, match="client_key is encrypted: name its password's variable"):
        services.echo(settings(tls_pacs, pki, **tls))
    monkeypatch.delenv("TLS_KEY_PASSWORD", raising=False)
    with pytest.raises(PacsError, match="TLS_KEY_PASSWORD, which is not set"):
        services.echo(settings(tls_pacs, pki, **tls, client_key_password_env="TLS_KEY_PASSWORD"))
    monkeypatch.setenv("TLS_KEY_PASSWORD", "wrong")
    with pytest.raises(PacsError, match="cannot load") as err:
        services.echo(settings(tls_pacs, pki, **tls, client_key_password_env="TLS_KEY_PASSWORD"))
    assert "wrong" not in str(err.value)
    monkeypatch.setenv("TLS_KEY_PASSWORD", "key-password-for-this-test")
    services.echo(settings(tls_pacs, pki, **tls, client_key_password_env="TLS_KEY_PASSWORD"))


def test_tls_to_a_pacs_that_does_not_speak_it_is_named_and_may_be_retried(orthanc_factory, pki):
    plain = orthanc_factory(dicomweb=False)
    with pytest.raises(PacsError, match="TLS association .*handshake failed.*speaks DICOM TLS") as err:
        services.echo(settings(plain, pki, ca_bundle=pki["ca"], client_cert=pki["client"],
                               client_key=pki["client_key"]))
    assert err.value.transient is True
    close_pools()
