"""TLS and mutual TLS on loopback with throw-away certificates."""
from __future__ import annotations

import datetime as dt

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine.client import OperatorClient, ServiceError
from engine.service.config import ServiceConfig
from engine.service.server import VeilfaceServer
from tests.support import TOKENS, make_config


def _cert(name, issuer_key=None, issuer_name=None, ca=False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                            critical=False)
    cert = b.sign(issuer_key or key, hashes.SHA256())
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    kpem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    return key, cert, pem(cert), kpem


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_pem, _ = _cert("veilface-test-ca", ca=True)
    _, _, srv_pem, srv_key = _cert("localhost", ca_key, ca_cert.subject)
    _, _, cli_pem, cli_key = _cert("device-1", ca_key, ca_cert.subject)
    files = {}
    for name, data in {"ca": ca_pem, "srv": srv_pem, "srv_key": srv_key, "cli": cli_pem, "cli_key": cli_key}.items():
        (d / f"{name}.pem").write_bytes(data)
        files[name] = str(d / f"{name}.pem")
    return files


def test_tls(tmp_path, pki):
    cfg = make_config(tmp_path, tls_cert=pki["srv"], tls_key=pki["srv_key"])
    with VeilfaceServer(cfg) as srv:
        c = OperatorClient(srv.target, TOKENS["auditor"], tls_ca=pki["ca"], server_name="localhost")
        assert c.verify_audit_chain().ok
        plain = OperatorClient(srv.target, TOKENS["auditor"], timeout=2)
        with pytest.raises(ServiceError) as ei:
            plain.verify_audit_chain()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_client_certificate(tmp_path, pki):
    cfg = make_config(tmp_path, tls_cert=pki["srv"], tls_key=pki["srv_key"], tls_client_ca=pki["ca"])
    with VeilfaceServer(cfg) as srv:
        ok = OperatorClient(srv.target, TOKENS["auditor"], tls_ca=pki["ca"], client_cert=pki["cli"],
                            client_key=pki["cli_key"], server_name="localhost")
        assert ok.verify_audit_chain().ok
        no_cert = OperatorClient(srv.target, TOKENS["auditor"], tls_ca=pki["ca"], server_name="localhost", timeout=2)
        with pytest.raises(ServiceError) as ei:
            no_cert.verify_audit_chain()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE


def test_remote_needs_tls_and_explicit_setting(tmp_path, pki):
    from engine.service.status import BadRequest
    with pytest.raises(BadRequest):
        VeilfaceServer(make_config(tmp_path, host="0.0.0.0"))
    with pytest.raises(BadRequest):
        ServiceConfig(host="0.0.0.0", allow_remote=True, data_dir=str(tmp_path)).validate()
