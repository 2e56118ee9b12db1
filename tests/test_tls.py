"""TLS and mTLS on the gRPC listener, over real sockets with certificates made at test time.

No private key is ever committed: every certificate here is generated in a
temporary directory by the ``cryptography`` package.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imageshare.v1 import image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from imageshare_server.grpcapi.tls import ReloadingCredentials, TlsConfigError, TlsFiles
from tests.support.processes import BIN, DEMO_ENV, ServerProcess, base_env
from tests.support.rpc import account_ids, list_all

REGION = "cn-hangzhou"
SMALL = "m-demo0000002"
NOW = datetime.datetime.now(datetime.UTC)
StartServer = Callable[..., ServerProcess]


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Authority:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(self, common_name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _builder(subject, self.cert.subject, key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=1))
    )


@dataclass(frozen=True)
class Pki:
    ca: Authority
    other_ca: Authority
    cert: Path
    key: Path
    client_ca: Path

    def rotate(self, issued: Issued) -> None:
        """Replace the server's files the way Kubernetes does: write aside, rename over."""
        for path, data in ((self.cert, issued.cert_pem), (self.key, issued.key_pem)):
            staging = path.with_suffix(".new")
            staging.write_bytes(data)
            os.replace(staging, path)


@pytest.fixture(scope="module")
def authorities() -> tuple[Authority, Authority]:
    return Authority.create("imageshare test CA"), Authority.create("untrusted test CA")


@pytest.fixture
def pki(tmp_path: Path, authorities: tuple[Authority, Authority]) -> Pki:
    ca, other = authorities
    server = ca.issue("imageshare", server=True)
    pki = Pki(ca, other, tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt")
    pki.cert.write_bytes(server.cert_pem)
    pki.key.write_bytes(server.key_pem)
    pki.key.chmod(0o600)
    pki.client_ca.write_bytes(ca.pem)
    return pki


def _channel(target: str, root: bytes, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=None if client is None else client.key_pem,
        certificate_chain=None if client is None else client.cert_pem,
    )
    return grpc.secure_channel(target, credentials)


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(response.status)


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as caught:
        _health(channel)
    assert isinstance(caught.value, grpc.Call)
    return caught.value.code()


def test_tls_serves_verified_clients_and_refuses_plaintext(
    start_server: StartServer, emulator: EmulatorAdmin, pki: Pki
) -> None:
    server: ServerProcess = start_server("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    assert server.ready["tls"] == "tls"
    with _channel(server.target, pki.ca.pem) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        assert account_ids(list_all(stub, region_id=REGION, image_id=SMALL)) == [
            "1234567890123456",
            "1234567890654321",
        ]
    # A plain-text client cannot speak to a TLS port...
    assert _refused(grpc.insecure_channel(server.target)) is grpc.StatusCode.UNAVAILABLE
    # ...and a client that does not trust the server's CA refuses the server.
    assert _refused(_channel(server.target, pki.other_ca.pem)) is grpc.StatusCode.UNAVAILABLE
    # Only the one verified call reached the upstream.
    assert emulator.counters()["total"] == 1


def test_mtls_from_environment_requires_a_client_certificate_from_the_ca(
    start_server: StartServer, pki: Pki
) -> None:
    server: ServerProcess = start_server(
        env={
            "IMAGESHARE_TLS_CERT": str(pki.cert),
            "IMAGESHARE_TLS_KEY": str(pki.key),
            "IMAGESHARE_TLS_CLIENT_CA": str(pki.client_ca),
        }
    )
    assert server.ready["tls"] == "mtls"
    good = pki.ca.issue("caller", server=False)
    foreign = pki.other_ca.issue("intruder", server=False)
    assert _refused(_channel(server.target, pki.ca.pem)) is grpc.StatusCode.UNAVAILABLE
    assert _refused(_channel(server.target, pki.ca.pem, foreign)) is grpc.StatusCode.UNAVAILABLE
    assert _refused(grpc.insecure_channel(server.target)) is grpc.StatusCode.UNAVAILABLE
    with _channel(server.target, pki.ca.pem, good) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        assert len(account_ids(list_all(stub, region_id=REGION, image_id=SMALL))) == 2


def test_rotated_certificate_is_served_to_new_connections(
    start_server: StartServer, pki: Pki
) -> None:
    server: ServerProcess = start_server("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    with _channel(server.target, pki.ca.pem) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    pki.rotate(pki.other_ca.issue("imageshare", server=True))
    with _channel(server.target, pki.other_ca.pem) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert _refused(_channel(server.target, pki.ca.pem)) is grpc.StatusCode.UNAVAILABLE
    server.wait_for("tls_reloaded", timeout=5)

    # A broken rotation (a key that belongs to another certificate) keeps the last good one.
    broken = pki.ca.issue("imageshare", server=True)
    pki.rotate(Issued(broken.cert_pem, pki.ca.issue("x", server=True).key_pem))
    with _channel(server.target, pki.other_ca.pem) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert server.wait_for("tls_reload_failed", timeout=5)["level"] == "warning"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "/nonexistent/tls.crt"], "tls_cert and tls_key must be given together"),
        (["--tls-client-ca", "/nonexistent/ca.crt"], "tls_client_ca needs tls_cert"),
    ],
)
def test_incomplete_tls_settings_are_refused_at_start(args: list[str], message: str) -> None:
    result = subprocess.run(
        [str(BIN / "imageshare-server"), "--emulator", "--listen", "127.0.0.1:0", *args],
        check=False,
        env=base_env(DEMO_ENV),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_unusable_key_fails_start_without_echoing_the_key(pki: Pki) -> None:
    stray = pki.ca.issue("stray", server=True)
    pki.key.write_bytes(stray.key_pem)
    result = subprocess.run(
        [
            str(BIN / "imageshare-server"),
            "--emulator",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--tls-cert",
            str(pki.cert),
            "--tls-key",
            str(pki.key),
        ],
        check=False,
        env=base_env(DEMO_ENV),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "TLS:" in result.stderr
    assert "startup_failed" in result.stderr
    key_body = stray.key_pem.decode().splitlines()[1]
    assert key_body not in result.stderr


def test_fetcher_reports_no_change_until_the_files_change(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    credentials = ReloadingCredentials(TlsFiles(pki.cert, pki.key, pki.client_ca))
    assert credentials.fetch() is None
    pki.rotate(pki.ca.issue("imageshare", server=True))
    assert credentials.fetch() is not None
    assert credentials.fetch() is None
    assert credentials.reloads == 1
    # A missing file mid-rotation is not an error: keep what works.
    pki.key.unlink()
    assert credentials.fetch() is None
    with pytest.raises(TlsConfigError, match="cannot read"):
        ReloadingCredentials(TlsFiles(pki.cert, pki.key))
    with caplog.at_level(logging.WARNING):
        pki.key.write_bytes(b"not a key")
        assert credentials.fetch() is None
    assert "keeping the previous certificate" in caplog.text
