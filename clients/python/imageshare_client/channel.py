"""Channel defaults shared by the sync and async clients.

Two layers of retry, each covering what the other cannot see:

* the gRPC service config below lets the channel itself retry UNAVAILABLE. That is safe for a
  server-streaming call because gRPC commits an attempt as soon as response headers arrive, so
  a stream that has started is never replayed;
* `RetryPolicy` is the client's own loop, for UNAVAILABLE that reaches the application before
  the first message (retry throttling kicked in, or the channel gave up). It too stops at the
  first message.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imageshare.v1 import image_share_pb2

SERVICE_NAME = image_share_pb2.DESCRIPTOR.services_by_name["ImageShareService"].full_name

# Large listings are streamed in chunks of at most 100 accounts, so 4 MiB is plenty; the limit
# is explicit so that a misbehaving peer cannot make the client buffer arbitrary amounts.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_RETRY_POLICY: Mapping[str, Any] = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

DEFAULT_SERVICE_CONFIG: Mapping[str, Any] = {
    # With a target that resolves to every pod (dns:///<name>-headless.<ns>.svc:50051),
    # calls spread over all of them; with one address it is the same as pick_first.
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": SERVICE_NAME}],
            "timeout": "10s",
            "maxRequestMessageBytes": 64 * 1024,
            "maxResponseMessageBytes": MAX_MESSAGE_BYTES,
            "retryPolicy": _RETRY_POLICY,
        },
        # A watch runs until it ends: no default deadline (the entry naming the method
        # wins over the service's).
        {
            "name": [{"service": SERVICE_NAME, "method": "WatchImageShares"}],
            "maxRequestMessageBytes": 64 * 1024,
            "maxResponseMessageBytes": MAX_MESSAGE_BYTES,
            "retryPolicy": _RETRY_POLICY,
        },
    ],
    # Stops a fleet of clients from multiplying load on a server that is already failing.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}


def channel_options(
    service_config: Mapping[str, Any] | None = DEFAULT_SERVICE_CONFIG,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """Options for a long-lived channel shared by many calls.

    Keepalive pings every 30 s find a dead connection (a restarted pod, a silently dropped
    NAT entry) before a call waits on it; they are sent only while calls are active, which
    stays under the server's default ping policy (minimum 5 minutes without calls).
    """
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 64 * 1024),
        ("grpc.enable_retries", 1),
        ("grpc.primary_user_agent", "imageshare-python-client/0.1"),
    ]
    if service_config is not None:
        options.append(("grpc.service_config", json.dumps(service_config)))
    options.extend(extra)
    return options


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter, for UNAVAILABLE before the first message.

    Full jitter (a uniform draw up to the exponential cap) keeps clients that failed together
    from retrying together.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff(self, failed_attempts: int) -> float:
        """Seconds to wait after `failed_attempts` (1-based) failed attempts."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (failed_attempts - 1))
        return random.uniform(0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


def default_retry(service_config: Mapping[str, Any] | None) -> RetryPolicy:
    """The client's own retries: none when the channel retries (the service config's policy).

    The channel's retryPolicy covers every retry a listing can take (UNAVAILABLE before
    the first message: the server answers such failures without headers, so gRPC may
    retry them), and its retryThrottling stops retries fleet-wide when the server is
    failing; a loop around it would multiply attempts and ignore the throttling. Without
    a service config (``service_config=None``) the channel does not retry, and the
    client's loop does the same job.
    """
    for method in (service_config or {}).get("methodConfig", []):
        if "retryPolicy" in method:
            return NO_RETRY
    return RetryPolicy()
