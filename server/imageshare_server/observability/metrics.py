"""Prometheus metrics that only this service can export.

The gRPC server metrics (``grpc_server_*``) live in ``grpc_metrics``; this
module holds the upstream, cache and build metrics. Label values are bounded:
no image or account ids, regions only after validation (and ``other`` for a
valid region the service does not know).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from imageshare_server import __version__

# 1 ms .. 30 s: loopback cache hits at the bottom, a slow upstream with
# retries at the top.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

UPSTREAM_REQUESTS = Counter(
    "imageshare_upstream_requests_total",
    "Upstream OpenAPI attempts by outcome: OK, the upstream Code, or a transport error class.",
    ["action", "region", "outcome"],
)
UPSTREAM_DURATION = Histogram(
    "imageshare_upstream_request_duration_seconds",
    "Duration of one upstream attempt, from send to parsed answer.",
    ["action", "region"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_RETRIES = Counter(
    "imageshare_upstream_retries_total",
    "Upstream attempts that were retries, by the reason of the failure before them.",
    ["action", "reason"],
)
UPSTREAM_RETRIES_DENIED = Counter(
    "imageshare_upstream_retries_denied_total",
    "Retries not made because the retry budget was spent.",
    ["action"],
)
UPSTREAM_IN_FLIGHT = Gauge(
    "imageshare_upstream_in_flight_requests",
    "Upstream attempts under way.",
)
UPSTREAM_RATE_LIMIT_WAIT = Histogram(
    "imageshare_upstream_rate_limit_wait_seconds",
    "Time an upstream call waited for the upstream rate limiter.",
    buckets=(0.0, *LATENCY_BUCKETS),
)
UPSTREAM_PAGES = Histogram(
    "imageshare_upstream_pages_per_listing",
    "Upstream pages read to build one complete share list.",
    buckets=(1, 2, 3, 5, 10, 20, 50, 100),
)

CACHE_REQUESTS = Counter(
    "imageshare_cache_requests_total",
    "Share-list lookups by result: hit, miss, stale, bypass, coalesced, negative_hit.",
    ["result"],
)
CACHE_ENTRIES = Gauge("imageshare_cache_entries", "Share lists held in the in-process cache.")
CACHE_BYTES = Gauge("imageshare_cache_bytes", "Approximate bytes held by the in-process cache.")
CACHE_EVICTIONS = Counter(
    "imageshare_cache_evictions_total",
    "Entries evicted from the in-process cache, by reason: size, entries, expired.",
    ["reason"],
)
CACHE_STALE_SERVES = Counter(
    "imageshare_cache_stale_served_total",
    "Stale lists served, by why: revalidating (stale-while-revalidate), upstream_error, or "
    "deadline (the read would have ended after the caller's deadline).",
    ["reason"],
)
ORPHAN_READS_CANCELLED = Counter(
    "imageshare_orphan_reads_cancelled_total",
    "Upstream reads cancelled because every caller of theirs left and no orphan-read slot "
    "was free to let them fill the cache.",
)
COALESCED_WAITS = Counter(
    "imageshare_singleflight_coalesced_total",
    "Callers that joined an upstream read already under way instead of starting one.",
)

REDIS_UP = Gauge(
    "imageshare_redis_up",
    "1 while the shared Redis answers (or none is configured); 0 while replicas fall back "
    "to their in-process cache and rate limit.",
)
REDIS_UP.set(1)
REDIS_ERRORS = Counter(
    "imageshare_redis_errors_total",
    "Redis operations that failed or timed out, by operation.",
    ["op"],
)
REDIS_CACHE_REQUESTS = Counter(
    "imageshare_redis_cache_requests_total",
    "Shared (L2) cache lookups after an in-process miss, by result: hit, miss, error.",
    ["result"],
)
REDIS_LEASE_WAITS = Counter(
    "imageshare_redis_lease_waits_total",
    "Reads that found another replica holding the key's lease, by how the wait ended: "
    "result (its list arrived), takeover (the lease was free again), fallback (Redis failed).",
    ["outcome"],
)

CREDENTIALS_REJECTED = Counter(
    "imageshare_upstream_credentials_rejected_total",
    "Upstream answers that rejected the service's own credentials, by upstream Code.",
    ["code"],
)

ASYNCIO_TASKS = Gauge(
    "imageshare_asyncio_tasks",
    "Tasks alive in the server's event loop; steady growth under steady load is a leak.",
)

BUILD_INFO = Info("imageshare_build", "Version of the running imageshare server.")
BUILD_INFO.info({"version": __version__})
