"""Start-up that fails half way stops everything it had started (``app.start``'s exit stack).

The failure is a real one: the gRPC port is taken, which ``start`` only finds out after the
embedded emulator, the credentials chain and the Redis link are up.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from imageshare_emulator import Emulator
from imageshare_emulator.sts import StsStandIn
from imageshare_server import app
from imageshare_server.config import parse_settings
from imageshare_server.credentials import chain
from tests.support.redis_server import RedisServer


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def clients_of(server: RedisServer) -> int:
    """Connections the redis-server has, besides the one asking."""
    probe = server.client()
    try:
        return len(probe.client_list()) - 1
    finally:
        probe.close()


def live_threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def live_tasks(prefix: str) -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(prefix)]


@pytest.mark.redis
async def test_a_failed_start_stops_the_emulator_and_the_redis_link(
    busy_port: int, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = parse_settings(
        [
            *("--emulator", "--redis-url", own_redis.url, "--metrics-listen", ""),
            *("--listen", f"127.0.0.1:{busy_port}"),
        ],
        env={},
    )
    emulators_before = set(live_threads("ecs-emulator-"))  # the session's own, if any
    with pytest.raises(app.StartupError, match=f"cannot listen on 127.0.0.1:{busy_port}"):
        await app.start(settings, registry=CollectorRegistry())
    # They did start: the log says so.
    events = {getattr(r, "event", None) for r in caplog.records}
    assert {"emulator", "redis"} <= events
    assert set(live_threads("ecs-emulator-")) == emulators_before
    assert live_tasks("redis probe") == []
    assert clients_of(own_redis) == 0


@pytest.mark.redis
async def test_a_failed_start_closes_the_credentials_chain_and_the_redis_link(
    busy_port: int,
    own_redis: RedisServer,
    ecs: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chain's credentials come from STS (RRSA), so it runs refreshes and owns a client."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.rrsa-token-for-the-lifecycle-test.sig")
    built: list[chain.ChainCredentialsProvider] = []
    real = chain.default_credentials_provider

    def spy(*args: Any, **kwargs: Any) -> chain.ChainCredentialsProvider:
        provider = real(*args, **kwargs)
        built.append(provider)
        return provider

    monkeypatch.setattr(app, "default_credentials_provider", spy)
    with StsStandIn(
        accepted_tokens={token.read_text()}, credential_store=ecs.credential_store
    ) as sts:
        for name, value in {
            "ALIBABA_CLOUD_ROLE_ARN": "acs:ram::1234567890123456:role/imageshare",
            "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": "acs:ram::1234567890123456:oidc-provider/ack",
            "ALIBABA_CLOUD_OIDC_TOKEN_FILE": str(token),
            "ALIBABA_CLOUD_STS_ENDPOINT": sts.url,
            "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true",
            "HOME": str(tmp_path),
        }.items():
            monkeypatch.setenv(name, value)
        for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"):
            monkeypatch.delenv(name, raising=False)
        settings = parse_settings(
            [
                *("--upstream-endpoint", ecs.url, "--redis-url", own_redis.url),
                *("--metrics-listen", "", "--listen", f"127.0.0.1:{busy_port}"),
            ],
            env={},
        )
        with pytest.raises(app.StartupError, match="cannot listen"):
            await app.start(settings, registry=CollectorRegistry())
    assert len(built) == 1
    provider = built[0]
    assert provider.describe().startswith("oidc")  # it got as far as STS credentials
    assert provider.closed
    assert live_tasks("credentials-refresh") == []
    assert live_tasks("redis probe") == []
    assert clients_of(own_redis) == 0
