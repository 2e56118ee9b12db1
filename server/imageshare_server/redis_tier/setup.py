"""Wire the optional Redis tier from settings; without ``--redis-url`` redis-py is never loaded."""

from __future__ import annotations

import contextlib
import logging

from imageshare_server.cache import CachePolicy
from imageshare_server.config import Settings
from imageshare_server.core.clock import Clock
from imageshare_server.core.credentials import CredentialsProvider
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.observability.tracing import NO_TRACING, Tracer
from imageshare_server.ratelimit import BucketNames, UpstreamRateLimiter
from imageshare_server.redis_tier.link import RedisLink
from imageshare_server.redis_tier.ratelimit import RedisRateLimiter
from imageshare_server.redis_tier.tier import RedisTier

log = logging.getLogger(__name__)


async def connect(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    metrics: ServiceMetrics,
    tracer: Tracer = NO_TRACING,
) -> RedisLink | None:
    """The link to ``--redis-url``, probed in the background; None when none is configured.

    Start-up never waits for Redis: a replica that starts while Redis is down
    serves from its own cache and joins the shared tier when Redis answers.
    """
    if not settings.redis_url:
        return None
    link = RedisLink.from_url(
        settings.redis_url, timeout=settings.redis_timeout, metrics=metrics, tracer=tracer
    )
    link.start_probe()
    stack.push_async_callback(link.aclose)
    log.info(
        "sharing cache, reads and rate limit through redis",
        extra={"event": "redis", "redis": link.description},
    )
    return link


def limiter(
    settings: Settings,
    link: RedisLink,
    credentials: CredentialsProvider,
    fallback: UpstreamRateLimiter,
    *,
    buckets: BucketNames,
    clock: Clock,
    metrics: ServiceMetrics,
) -> RedisRateLimiter:
    """One bucket per account and region for all replicas; ``fallback`` while Redis is away."""
    configured = settings.rate_limit_account

    async def account() -> str:
        if configured:
            return configured
        current = await credentials.get()
        if current.security_token:
            # Every pod's STS session has its own AccessKey ID, rotating: keying by it
            # would give each pod a bucket of its own and share nothing.
            return "sts"
        return current.access_key_id

    return RedisRateLimiter(
        link,
        settings.upstream_qps,
        settings.upstream_burst,
        account=account,
        prefix=settings.redis_key_prefix,
        fallback=fallback,
        buckets=buckets,
        clock=clock,
        metrics=metrics,
    )


def tier(
    settings: Settings,
    link: RedisLink,
    policy: CachePolicy,
    clock: Clock,
    metrics: ServiceMetrics,
) -> RedisTier:
    return RedisTier(
        link,
        policy,
        prefix=settings.redis_key_prefix,
        lease_ttl=settings.redis_lease_ttl,
        clock=clock,
        metrics=metrics,
    )
