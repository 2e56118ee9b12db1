"""TLS and mTLS on the gRPC listener, over real sockets with certificates made at test time.

The app runs in this process (``tests.support.inprocess``) with its TLS flags; callers are
grpc.aio channels. No private key is ever committed: every certificate here is generated in
a temporary directory (``tests.support.x509``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import entry_points
from pathlib import Path

import grpc
import pytest

from imageshare.v1 import image_share_pb2_grpc
from imageshare_emulator import Emulator
from imageshare_server import app as server_app
from imageshare_server.config import parse_settings
from imageshare_server.grpcapi.tls import ReloadingCredentials, TlsConfigError, TlsFiles
from tests.support.client_health import SERVING, health_status, refused
from tests.support.inprocess import InProcessApp, Request, running
from tests.support.processes import BIN, DEMO_ENV, base_env
from tests.support.rpc import account_ids
from tests.support.x509 import Authority, Issued, Pki

REGION = "cn-hangzhou"
SMALL = "m-demo0000002"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def authorities() -> tuple[Authority, Authority]:
    return Authority.create("imageshare test CA"), Authority.create("untrusted test CA")


@pytest.fixture
def pki(tmp_path: Path, authorities: tuple[Authority, Authority]) -> Pki:
    return Pki.write(tmp_path, *authorities)


def tls_channel(target: str, root: bytes, client: Issued | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=None if client is None else client.key_pem,
        certificate_chain=None if client is None else client.cert_pem,
    )
    return grpc.aio.secure_channel(target, credentials)


@asynccontextmanager
async def connected(
    target: str, root: bytes, client: Issued | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """A new channel (a new connection, so a new handshake), closed afterwards."""
    channel = tls_channel(target, root, client)
    try:
        yield channel
    finally:
        await channel.close()


def events(app: InProcessApp, event: str) -> list[logging.LogRecord]:
    """The app's log records of ``event`` (the ``"event"`` field of its JSON lines)."""
    return [r for r in app.logs.records if getattr(r, "event", None) == event]


def announced_tls(app: InProcessApp) -> str:
    """The ``tls`` field of the app's ``serving`` line: off, tls or mtls."""
    (serving,) = events(app, "serving")
    return str(serving.tls)  # type: ignore[attr-defined]


async def list_small(channel: grpc.aio.Channel) -> list[str]:
    stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
    call = stub.ListImageShares(Request(region_id=REGION, image_id=SMALL), timeout=10)
    return account_ids([message async for message in call])


async def test_tls_serves_verified_clients_and_refuses_plaintext(ecs: Emulator, pki: Pki) -> None:
    async with running(ecs, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)) as app:
        assert announced_tls(app) == "tls"
        async with connected(app.target, pki.ca.pem) as channel:
            assert await health_status(channel) == SERVING
            assert await list_small(channel) == ["1234567890123456", "1234567890654321"]
        # A plain-text client cannot speak to a TLS port...
        assert await refused(grpc.aio.insecure_channel(app.target)) is UNAVAILABLE
        # ...and a client that does not trust the server's CA refuses the server.
        assert await refused(tls_channel(app.target, pki.other_ca.pem)) is UNAVAILABLE
        # Only the one verified call reached the upstream.
        assert ecs.knobs.counters()["total"] == 1


async def test_mtls_from_environment_requires_a_client_certificate_from_the_ca(
    ecs: Emulator, pki: Pki
) -> None:
    flags = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    flags += ["--tls-client-ca", str(pki.client_ca)]
    environment = {
        "IMAGESHARE_TLS_CERT": str(pki.cert),
        "IMAGESHARE_TLS_KEY": str(pki.key),
        "IMAGESHARE_TLS_CLIENT_CA": str(pki.client_ca),
    }
    # The environment configures exactly what the flags do...
    from_environment = parse_settings([], env=environment)
    assert from_environment == parse_settings(flags, env={})
    assert from_environment.tls_client_ca == str(pki.client_ca)
    # ...and those settings require a client certificate the CA issued.
    async with running(ecs, *flags) as app:
        assert announced_tls(app) == "mtls"
        good = pki.ca.issue("caller", server=False)
        foreign = pki.other_ca.issue("intruder", server=False)
        assert await refused(tls_channel(app.target, pki.ca.pem)) is UNAVAILABLE
        assert await refused(tls_channel(app.target, pki.ca.pem, foreign)) is UNAVAILABLE
        assert await refused(grpc.aio.insecure_channel(app.target)) is UNAVAILABLE
        async with connected(app.target, pki.ca.pem, good) as channel:
            assert await health_status(channel) == SERVING
            assert len(await list_small(channel)) == 2


async def test_rotated_certificate_is_served_to_new_connections(ecs: Emulator, pki: Pki) -> None:
    async with running(ecs, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)) as app:
        async with connected(app.target, pki.ca.pem) as channel:
            assert await health_status(channel) == SERVING
        assert events(app, "tls_reloaded") == []
        pki.rotate(pki.other_ca.issue("imageshare", server=True))
        async with connected(app.target, pki.other_ca.pem) as channel:
            assert await health_status(channel) == SERVING
        assert await refused(tls_channel(app.target, pki.ca.pem)) is UNAVAILABLE
        # Logged by the certificate fetcher, before the handshake that loaded it: once.
        assert len(events(app, "tls_reloaded")) == 1

        # A broken rotation (a key that belongs to another certificate) keeps the last good one.
        broken = pki.ca.issue("imageshare", server=True)
        pki.rotate(Issued(broken.cert_pem, pki.ca.issue("x", server=True).key_pem))
        async with connected(app.target, pki.other_ca.pem) as channel:
            assert await health_status(channel) == SERVING
        (failed,) = events(app, "tls_reload_failed")
        assert failed.levelno == logging.WARNING
        assert len(events(app, "tls_reloaded")) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "/nonexistent/tls.crt"], "tls_cert and tls_key must be given together"),
        (["--tls-client-ca", "/nonexistent/ca.crt"], "tls_client_ca needs tls_cert"),
    ],
)
def test_incomplete_tls_settings_are_refused_at_start(
    args: list[str],
    message: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused while the settings are read, before anything starts: one ``startup_failed``
    line naming the problem, and exit status 2 (the command runs ``sys.exit(main())``)."""
    commands = entry_points(group="console_scripts", name="imageshare-server")
    assert {command.value for command in commands} == {"imageshare_server.app:main"}
    for name in [n for n in os.environ if n.startswith("IMAGESHARE_")]:
        monkeypatch.delenv(name)
    # main() would hand every record of the rest of the session to its own JSON handler on
    # stderr; here the records go to caplog instead.
    monkeypatch.setattr(server_app, "configure_logging", lambda *_args, **_kwargs: None)
    assert server_app.main(["--emulator", "--listen", "127.0.0.1:0", *args]) == 2
    (failed,) = [r for r in caplog.records if getattr(r, "event", None) == "startup_failed"]
    assert failed.levelno == logging.CRITICAL
    assert message in failed.getMessage()


@pytest.mark.subprocess
def test_unusable_key_fails_start_without_echoing_the_key(pki: Pki) -> None:
    """A subprocess on purpose: what an operator sees of a failed start is the process's
    exit status and every byte of its stderr (the JSON formatter, any traceback), and that
    is main()'s doing, which installs signal handlers and runs its own event loop, so it
    cannot run inside the test process."""
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
