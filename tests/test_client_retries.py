"""The Python client retries exactly as Go, Java and Node callers do: by the service config.

One call against a service whose upstream is down makes the service config's
``maxAttempts`` RPCs, no more; once ``retryThrottling`` has cut in, one. The server's own
``grpc_server_started_total`` counts what arrived.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from imageshare_client import DEFAULT_SERVICE_CONFIG, ImageShareClient, ImageShareError
from imageshare_client.channel import NO_RETRY, RetryPolicy, default_retry
from imageshare_emulator import Emulator
from tests.support.inprocess import InProcessApp, running

LIST = {
    "grpc_type": "server_stream",
    "grpc_service": "imageshare.v1.ImageShareService",
    "grpc_method": "ListImageShares",
}
MAX_ATTEMPTS = DEFAULT_SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]["maxAttempts"]


def started(app: InProcessApp) -> int:
    return int(app.metric("grpc_server_started_total", **LIST))


def fail(client: ImageShareClient) -> ImageShareError:
    with pytest.raises(ImageShareError) as failed:
        client.list_shares("cn-hangzhou", "m-demo0000001").collect()
    return failed.value


async def test_one_call_makes_the_service_configs_attempts_and_none_once_throttled(
    ecs: Emulator,
) -> None:
    ecs.knobs.set(down=True)
    async with running(ecs, "--cache-ttl", "0", "--upstream-max-attempts", "1") as app:
        with ImageShareClient(app.target) as client:
            error = await asyncio.to_thread(fail, client)
            assert error.code is grpc.StatusCode.UNAVAILABLE
            assert started(app) == MAX_ATTEMPTS == 3
            # Each failed attempt costs the channel a token of its 10, and retries stop
            # at half: the second call is cut short, and from the third on none retries.
            for _ in range(4):
                await asyncio.to_thread(fail, client)
        assert started(app) == 3 + 2 + 1 + 1 + 1


def test_the_clients_own_loop_runs_only_without_the_channels_retry_policy() -> None:
    assert default_retry(DEFAULT_SERVICE_CONFIG) is NO_RETRY
    assert default_retry(None) == RetryPolicy()
    assert ImageShareClient("127.0.0.1:1").retry is NO_RETRY
    assert ImageShareClient("127.0.0.1:1", service_config=None).retry == RetryPolicy()
