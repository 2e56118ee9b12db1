"""Prometheus metrics that only this service can export, as one object on a registry.

The gRPC server metrics (``grpc_server_*``) live in ``grpc_metrics``; this
module holds the upstream, cache, watch, Redis and build metrics. Nothing is
registered at import: ``ServiceMetrics(registry)`` creates them on the
registry it is given (client_python's ``registry=`` idiom), so two apps in
one process, or a test, each get their own. Label values are bounded: no
image or account ids, regions only after validation (and ``other`` for a
region the service does not know), upstream codes from a known set.

Every labelled counter a panel or an alert reads is exported at zero for its
known label values from the start (``initialize_*``): a series born at 1 on
its first event is invisible to ``increase()`` and ``rate()``, so a single
rejected credential would never alert and panels would stay empty until then.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import grpc
from google import protobuf
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info

from imageshare_server import __version__
from imageshare_server.core.errors import (
    CREDENTIAL_CODES,
    KNOWN_UPSTREAM_CODES,
    PERMISSION_CODES,
    SERVER_CODES,
    THROTTLING_CODES,
)

# Label values of the watch metrics, created at zero so that increase() sees the first one.
SHARE_CHANGES = (
    "account_added", "account_removed", "group_added", "group_removed",
    "became_public", "became_private",
)  # fmt: skip
POLL_OUTCOMES = ("changed", "unchanged", "failed", "ended")

# 1 ms .. 30 s: loopback cache hits at the bottom, a slow upstream with
# retries at the top.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# The known label values, exported at zero from the start.
CACHE_RESULTS = ("hit", "miss", "stale", "bypass", "coalesced", "negative_hit")
STALE_REASONS = ("revalidating", "upstream_error", "deadline")
EVICTION_REASONS = ("size", "entries", "expired")
TRANSPORT_OUTCOMES = ("timeout", "connection_error", "malformed_response")
# Upstream codes a retry can follow (throttling, server errors, a reused nonce);
# "other" stands for any code outside the known set.
RETRY_REASONS = (
    *sorted(
        code
        for code in KNOWN_UPSTREAM_CODES
        if code.startswith((*THROTTLING_CODES, *SERVER_CODES, "HTTP5", "SignatureNonceUsed"))
    ),
    "other",
    *TRANSPORT_OUTCOMES,
)
CREDENTIAL_OUTCOMES = (
    *sorted(c for c in KNOWN_UPSTREAM_CODES if c.startswith(CREDENTIAL_CODES)),
    "other",
)
PERMISSION_OUTCOMES = (
    *sorted(c for c in KNOWN_UPSTREAM_CODES if c.startswith(PERMISSION_CODES)),
    "other",
)
REDIS_OPS = (
    "get", "set", "lease_acquire", "lease_release", "lease_renew", "rate_limit",
    "rate_limit_refund", "ping",
)  # fmt: skip
REDIS_CACHE_RESULTS = ("hit", "miss", "error")
LEASE_WAIT_OUTCOMES = ("result", "takeover", "fallback")

# Set by the image from its REVISION build argument (the commit it was built from).
REVISION_VARIABLE = "IMAGESHARE_REVISION"


def build_revision(environ: Mapping[str, str] | None = None) -> str:
    """The source revision the running build came from, or ``unknown``."""
    environ = os.environ if environ is None else environ
    return environ.get(REVISION_VARIABLE, "").strip() or "unknown"


class ServiceMetrics:
    """Every service metric, registered on ``registry`` (None: on no registry at all).

    ``revision`` goes into ``imageshare_build_info`` (default: ``$IMAGESHARE_REVISION``).
    """

    def __init__(
        self, registry: CollectorRegistry | None = REGISTRY, *, revision: str | None = None
    ) -> None:
        self.upstream_requests = Counter(
            "imageshare_upstream_requests_total",
            "Upstream OpenAPI attempts by outcome: OK, the upstream Code, or a transport "
            "error class.",
            ["action", "region", "outcome"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "imageshare_upstream_request_duration_seconds",
            "Duration of one upstream attempt, from send to parsed answer.",
            ["action", "region"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_retries = Counter(
            "imageshare_upstream_retries_total",
            "Upstream attempts that were retries, by the reason of the failure before them.",
            ["action", "reason"],
            registry=registry,
        )
        self.upstream_retries_denied = Counter(
            "imageshare_upstream_retries_denied_total",
            "Retries not made because the retry budget was spent.",
            ["action"],
            registry=registry,
        )
        self.upstream_in_flight = Gauge(
            "imageshare_upstream_in_flight_requests",
            "Upstream attempts under way.",
            registry=registry,
        )
        self.upstream_rate_limit_wait = Histogram(
            "imageshare_upstream_rate_limit_wait_seconds",
            "Time an upstream call waited for the upstream rate limiter.",
            buckets=(0.0, *LATENCY_BUCKETS),
            registry=registry,
        )
        self.upstream_pages = Histogram(
            "imageshare_upstream_pages_per_listing",
            "Upstream pages read to build one complete share list.",
            buckets=(1, 2, 3, 5, 10, 20, 50, 100),
            registry=registry,
        )
        self.cache_requests = Counter(
            "imageshare_cache_requests_total",
            "Share-list lookups by result: hit, miss, stale, bypass, coalesced, negative_hit.",
            ["result"],
            registry=registry,
        )
        self.cache_entries = Gauge(
            "imageshare_cache_entries",
            "Share lists held in the in-process cache.",
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "imageshare_cache_bytes",
            "Bytes held by the in-process cache (measured with sys.getsizeof).",
            registry=registry,
        )
        self.cache_evictions = Counter(
            "imageshare_cache_evictions_total",
            "Entries evicted from the in-process cache, by reason: size, entries, expired.",
            ["reason"],
            registry=registry,
        )
        self.cache_stale_serves = Counter(
            "imageshare_cache_stale_served_total",
            "Stale lists served, by why: revalidating (stale-while-revalidate), "
            "upstream_error, or deadline (the read would have ended after the caller's "
            "deadline).",
            ["reason"],
            registry=registry,
        )
        self.orphan_reads_cancelled = Counter(
            "imageshare_orphan_reads_cancelled_total",
            "Upstream reads cancelled because every caller of theirs left and no "
            "orphan-read slot was free to let them fill the cache.",
            registry=registry,
        )
        self.coalesced_waits = Counter(
            "imageshare_singleflight_coalesced_total",
            "Callers that joined an upstream read already under way instead of starting one.",
            registry=registry,
        )
        self.watchers = Gauge(
            "imageshare_watchers",
            "WatchImageShares streams open.",
            registry=registry,
        )
        self.watched_images = Gauge(
            "imageshare_watched_images",
            "Share lists polled for watchers (one poller per image, however many watch it).",
            registry=registry,
        )
        self.watch_polls = Counter(
            "imageshare_watch_polls_total",
            "Polls of watched share lists, by outcome: changed, unchanged, failed (nothing "
            "sent, the watch goes on), ended (the image is gone or forbidden: its watches end).",
            ["outcome"],
            registry=registry,
        )
        self.share_changes = Counter(
            "imageshare_share_changes_total",
            "Changes seen in watched share lists: account_added, account_removed, group_added, "
            "group_removed (one per account or group), became_public, became_private.",
            ["change"],
            registry=registry,
        )
        for change in SHARE_CHANGES:
            self.share_changes.labels(change)
        for outcome in POLL_OUTCOMES:
            self.watch_polls.labels(outcome)
        self.redis_up = Gauge(
            "imageshare_redis_up",
            "1 while the shared Redis answers (or none is configured); 0 while replicas "
            "fall back to their in-process cache and rate limit.",
            registry=registry,
        )
        self.redis_up.set(1)
        self.redis_errors = Counter(
            "imageshare_redis_errors_total",
            "Redis operations that failed or timed out, by operation.",
            ["op"],
            registry=registry,
        )
        self.redis_cache_requests = Counter(
            "imageshare_redis_cache_requests_total",
            "Shared (L2) cache lookups after an in-process miss, by result: hit, miss, error.",
            ["result"],
            registry=registry,
        )
        self.redis_lease_waits = Counter(
            "imageshare_redis_lease_waits_total",
            "Reads that found another replica holding the key's lease, by how the wait "
            "ended: result (its list arrived), takeover (the lease was free again), "
            "fallback (Redis failed).",
            ["outcome"],
            registry=registry,
        )
        self.credentials_rejected = Counter(
            "imageshare_upstream_credentials_rejected_total",
            "Upstream answers that rejected the service's own credentials, by upstream Code.",
            ["code"],
            registry=registry,
        )
        self.permission_denied = Counter(
            "imageshare_upstream_permission_denied_total",
            "Upstream answers that denied the service's own identity permission "
            "(Forbidden*: RAM policy, disabled AccessKey, risk control), by upstream Code.",
            ["code"],
            registry=registry,
        )
        self.asyncio_tasks = Gauge(
            "imageshare_asyncio_tasks",
            "Tasks alive in the server's event loop; steady growth under steady load is a leak.",
            registry=registry,
        )
        self.build_info = Info(
            "imageshare_build",
            "Version and source revision of the running imageshare server, and the grpcio "
            "and protobuf versions it runs on.",
            registry=registry,
        )
        self.build_info.info(
            {
                "version": __version__,
                "revision": revision if revision is not None else build_revision(),
                "grpcio": grpc.__version__,
                "protobuf": protobuf.__version__,
            }
        )
        self._initialize()

    def _initialize(self) -> None:
        """Zero-valued series for the label values known without any traffic."""
        # Kept: every call counts one, and a labelled lookup per call is not free.
        self.cache_results = {
            result: self.cache_requests.labels(result) for result in CACHE_RESULTS
        }
        for reason in STALE_REASONS:
            self.cache_stale_serves.labels(reason)
        for reason in EVICTION_REASONS:
            self.cache_evictions.labels(reason)
        for code in CREDENTIAL_OUTCOMES:
            self.credentials_rejected.labels(code)
        for code in PERMISSION_OUTCOMES:
            self.permission_denied.labels(code)

    def initialize_upstream(self, action: str) -> None:
        """Zero-valued retry series of an upstream ``action`` (its client calls this)."""
        for reason in RETRY_REASONS:
            self.upstream_retries.labels(action, reason)
        self.upstream_retries_denied.labels(action)

    def initialize_redis(self) -> None:
        """Zero-valued Redis series (the Redis link calls this: only with ``--redis-url``)."""
        for op in REDIS_OPS:
            self.redis_errors.labels(op)
        for result in REDIS_CACHE_RESULTS:
            self.redis_cache_requests.labels(result)
        for outcome in LEASE_WAIT_OUTCOMES:
            self.redis_lease_waits.labels(outcome)

    @classmethod
    def unregistered(cls) -> ServiceMetrics:
        """Metrics that count but are exported nowhere (library use, unit tests)."""
        return cls(registry=None)
