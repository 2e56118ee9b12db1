"""The one Redis connection a replica shares its cache, leases and rate limit through.

Redis is an optimisation, never a dependency: every operation has a short
timeout, and the first failure marks the link down for ``retry_after``
seconds, during which operations fail at once (``RedisUnavailable``) so
callers fall back to in-process behaviour without waiting on a dead socket.
A background probe (PING) brings the link back when Redis returns. Each
transition is logged once and exported as ``imageshare_redis_up``.

``redis`` (redis-py) is imported only when a URL is configured, so a
deployment without Redis never loads it. With tracing on, each operation made
inside a trace is a client span (``redis <op>``; no keys or values).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.observability.tracing import NO_TRACING, Tracer
from imageshare_server.redaction import register_secret

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis failed, timed out, or is known to be down; use the in-process path."""


def describe_url(url: str) -> str:
    """The URL without credentials, fit for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisLink:
    def __init__(
        self,
        client: Redis,
        *,
        description: str,
        timeout: float = 0.25,
        retry_after: float = 1.0,
        metrics: ServiceMetrics | None = None,
        tracer: Tracer = NO_TRACING,
    ) -> None:
        self._metrics = metrics or ServiceMetrics.unregistered()
        self._metrics.initialize_redis()
        self._tracer = tracer
        self.client = client
        self.description = description
        self.timeout = timeout
        self.retry_after = retry_after
        self._up = True
        self._retry_at = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._detached: set[asyncio.Task[Any]] = set()
        self._metrics.redis_up.set(1)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 0.25,
        metrics: ServiceMetrics | None = None,
        tracer: Tracer = NO_TRACING,
    ) -> RedisLink:
        """Connect lazily to ``redis://`` or ``rediss://`` (TLS); the password stays out of logs."""
        from redis.asyncio import Redis  # noqa: PLC0415  (optional dependency)
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415

        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("redis_url must start with redis:// or rediss://")
        register_secret(parts.password)
        client = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One attempt: a retry would only stretch the wait the fallback exists to avoid.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            max_connections=64,
        )
        return cls(
            client, description=describe_url(url), timeout=timeout, metrics=metrics, tracer=tracer
        )

    @property
    def up(self) -> bool:
        return self._up

    def available(self) -> bool:
        """False while the link is down: until the probe (or, without one, ``retry_after``)."""
        if self._up:
            return True
        return self._probe is None and time.monotonic() >= self._retry_at

    async def call(
        self, op: str, action: Callable[[Redis], Awaitable[T]], *, force: bool = False
    ) -> T:
        """Run one Redis operation within the timeout, or raise ``RedisUnavailable``."""
        if not force and not self.available():
            raise RedisUnavailable(op)
        with self._tracer.span(f"redis {op}", kind="client", only_in_trace=True) as span:
            if span.recording:
                span.set("db.system.name", "redis")
                span.set("db.operation.name", op)
                span.set("server.address", self.description)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result of
                # an operation that finished as the caller was cancelled, and the cancel is lost.
                async with asyncio.timeout(self.timeout):
                    result = await action(self.client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(op, exc)
                span.set("error.type", type(exc).__name__)
                raise RedisUnavailable(op) from None
        self._succeeded()
        return result

    async def call_detached(self, op: str, action: Callable[[Redis], Awaitable[Any]]) -> None:
        """Run an operation that must finish even when its caller is cancelled (a refund).

        It runs as a task of its own, and ``aclose`` waits for such tasks before it closes
        the connection: a replica that stops while callers are queued gives their slots
        back instead of failing each refund on a closed connection.
        """
        task = asyncio.ensure_future(self.call(op, action))
        self._detached.add(task)
        task.add_done_callback(self._detached_done)
        with contextlib.suppress(RedisUnavailable):
            await asyncio.shield(task)

    def _detached_done(self, task: asyncio.Task[Any]) -> None:
        self._detached.discard(task)
        if not task.cancelled():
            task.exception()  # a failure was counted by ``call``; nobody else will look

    def _failed(self, op: str, exc: BaseException) -> None:
        self._metrics.redis_errors.labels(op).inc()
        self._retry_at = time.monotonic() + self.retry_after
        if self._up:
            self._up = False
            self._metrics.redis_up.set(0)
            log.warning(
                "redis unavailable; using the in-process cache and rate limit",
                extra={
                    "event": "redis_down",
                    "redis": self.description,
                    "op": op,
                    "error": type(exc).__name__,
                },
            )

    def _succeeded(self) -> None:
        if not self._up:
            self._up = True
            self._metrics.redis_up.set(1)
            log.info(
                "redis is back; sharing cache and rate limit again",
                extra={"event": "redis_up", "redis": self.description},
            )

    async def ping(self) -> bool:
        try:
            await self.call("ping", _ping, force=True)
        except RedisUnavailable:
            return False
        return True

    def start_probe(self, interval: float = 1.0) -> None:
        """Check the link every ``interval`` seconds so ``up`` and the gauge follow Redis."""

        async def probe() -> None:
            while True:
                await self.ping()
                await asyncio.sleep(interval)

        self._probe = asyncio.get_running_loop().create_task(probe(), name="redis probe")

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self._detached:  # each is bounded by the timeout already
            await asyncio.wait(set(self._detached))
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.aclose()
        except Exception as exc:  # closing a dead connection must not fail shutdown
            log.debug("closing redis: %s", type(exc).__name__)


async def _ping(client: Any) -> bool:
    return bool(await client.ping())
