"""Temporary credentials that renew themselves ahead of expiry without stalling requests.

STS and the ECS metadata service hand out credentials that expire (typically after
an hour). Renewing them on the request path would add an STS round trip, or an
outage if STS is down, to whichever request happens to arrive at the wrong moment.
So, like the official SDK, the cached credentials have three ages:

* fresh: returned as they are;
* due for refresh (15 minutes before ``Expiration``): still returned at once, and one
  background task fetches new ones;
* expired (a minute before ``Expiration``, to absorb clock skew): callers wait for
  the refresh, because signing with them would fail anyway.

Only one refresh is ever in flight; every caller that has to wait shares it. A failed
background refresh keeps the still-valid credentials and is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from imageshare_server.core.credentials import Credentials
from imageshare_server.core.errors import CredentialsUnavailable

log = logging.getLogger(__name__)

REFRESH_MARGIN_SECONDS = 15 * 60
EXPIRY_MARGIN_SECONDS = 60.0
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


@dataclass(frozen=True)
class ExpiringCredentials:
    """Credentials plus the instant (Unix seconds) the issuer says they stop working."""

    credentials: Credentials
    expires_at: float


Fetch = Callable[[], Awaitable[ExpiringCredentials]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class _Cached:
    credentials: Credentials
    refresh_at: float
    usable_until: float


def _schedule(issued: ExpiringCredentials, now: float, margin: float) -> _Cached:
    lifetime = max(issued.expires_at - now, 0.0)
    # With the shortest STS sessions (900 s) a fixed 15-minute margin would make
    # every call a refresh; never refresh before half the lifetime has passed.
    refresh_at = max(issued.expires_at - margin, now + lifetime / 2)
    usable_until = issued.expires_at - min(EXPIRY_MARGIN_SECONDS, lifetime / 10)
    return _Cached(issued.credentials, refresh_at, usable_until)


def error_text(exc: BaseException) -> str:
    """A failure as text: our own messages as they are, others with their type name.

    Neither carries request data: STS parameters travel in bodies, not URLs.
    """
    if isinstance(exc, CredentialsUnavailable):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def safe_error(source: str, exc: BaseException) -> CredentialsUnavailable:
    """Turn any failure into an error that names the source."""
    if isinstance(exc, CredentialsUnavailable):
        return exc
    return CredentialsUnavailable(f"{source}: {error_text(exc)}")


class RefreshingCredentialsProvider:
    """A ``CredentialsProvider`` over any fetch of expiring credentials.

    Call :meth:`aclose` on shutdown so that a background refresh does not outlive
    the event loop.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        name: str,
        refresh_margin: float = REFRESH_MARGIN_SECONDS,
        clock: Clock = time.time,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._margin = refresh_margin
        self._clock = clock
        self._cached: _Cached | None = None
        self._task: asyncio.Task[Credentials] | None = None
        self._failures = 0
        self._retry_after = 0.0

    def describe(self) -> str:
        return self.name

    async def get(self) -> Credentials:
        now = self._clock()
        cached = self._cached
        if cached is not None and now < cached.usable_until:
            if now >= cached.refresh_at and now >= self._retry_after:
                self._start_refresh()
            return cached.credentials
        # Nothing usable: this caller has to wait. Shield the shared refresh so
        # that a cancelled request does not cancel it for everyone else.
        return await asyncio.shield(self._start_refresh())

    def _start_refresh(self) -> asyncio.Task[Credentials]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(
                self._refresh(), name=f"credentials-refresh:{self.name}"
            )
            self._task.add_done_callback(_consume_result)
        return self._task

    async def _refresh(self) -> Credentials:
        try:
            issued = await self._fetch()
        except Exception as exc:
            self._failures += 1
            delay = min(RETRY_BASE_SECONDS * 2 ** (self._failures - 1), RETRY_MAX_SECONDS)
            self._retry_after = self._clock() + delay
            error = safe_error(self.name, exc)
            log.warning(
                "credentials refresh failed",
                extra={"source": self.name, "error": str(error), "retry_in_s": delay},
            )
            raise error from None
        self._failures = 0
        self._retry_after = 0.0
        self._cached = _schedule(issued, self._clock(), self._margin)
        return issued.credentials

    async def settle(self) -> None:
        """Wait for a refresh in flight, if any, whatever its outcome (tests, shutdown)."""
        task = self._task
        if task is not None:
            await asyncio.wait([task])

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, CredentialsUnavailable):
                await task


def _consume_result(task: asyncio.Task[Credentials]) -> None:
    """Mark a background refresh's failure as seen: it has been logged already."""
    if not task.cancelled():
        task.exception()
