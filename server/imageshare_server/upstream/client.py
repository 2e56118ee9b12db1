"""The DescribeImageSharePermission client: sign, send, parse, retry.

Transport (the pooled ``httpx.AsyncClient``) is injected so one pool serves
the whole process, and tests point it at the emulator without mocks. Every
attempt gets a fresh nonce and timestamp.

What an attempt may hold, and for how long:

* a rate-limit token is queued for only until the read's deadline
  (``ReadDeadline.at``); a read whose turn would come too late is refused at
  once, and the read learns how long it queues (``ReadDeadline.queued``);
* one of ``max_in_flight`` connection slots is held around the HTTP request
  alone, never during a rate-limit wait or a retry's back-off;
* the request as a whole (connect, headers, body) is bounded by the smaller
  of ``read_timeout`` and what is left of the deadline, and its body by
  ``max_response_bytes``.

Answers are untrusted: a body that is too large, too deep, badly encoded or
not the documented shape is a transient ``malformed_response`` (retried,
then UNAVAILABLE, and a stale list may be served instead).

Traced (when tracing is on): one span per page, and under it one per attempt
(page, attempt number, HTTP status, upstream code and RequestId, the reason
of the retry) with the rate-limit wait as its child. No URL, header or body
goes into a span: V1 signatures and STS tokens travel in the query string.
Every answered attempt's RequestId, failed ones included, is reported to the
read (``ReadDeadline.upstream_answer``) for the RPC's log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any, Literal, Protocol

import httpx

from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.credentials import Credentials, CredentialsProvider
from imageshare_server.core.deadline import NO_DEADLINE, ReadDeadline
from imageshare_server.core.errors import (
    DeadlineExceededError,
    UpstreamApiError,
    UpstreamBusyError,
    UpstreamError,
    UpstreamTransportError,
    bounded_request_id,
)
from imageshare_server.core.types import Account, SharePage
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.observability.tracing import NO_TRACING, Span, Tracer, exemplar
from imageshare_server.upstream.endpoints import Endpoint, EndpointResolver, region_label
from imageshare_server.upstream.retry import RetryPolicy, UnlimitedRetries
from imageshare_server.upstream.signing import canonical_query, sign_v1, sign_v3

log = logging.getLogger(__name__)

ACTION = "DescribeImageSharePermission"
API_VERSION = "2014-05-26"
SignatureVersion = Literal["v3", "v1"]

DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# A TotalCount beyond this is not a share list (the default quota is 50 accounts).
MAX_TOTAL_COUNT = 1_000_000
# Alibaba Cloud account ids are digit strings (16 digits today).
_ALIYUN_ID = re.compile(r"[0-9]{1,32}")
_GROUP = re.compile(r"[\x21-\x7e]{1,64}")
# Below this, an attempt could not even be sent before the deadline.
_MIN_ATTEMPT_SECONDS = 0.001

PAGE_SPAN = "imageshare.upstream.page"
ATTEMPT_SPAN = f"ecs {ACTION}"
RATE_LIMIT_SPAN = "imageshare.rate_limit.wait"


class RetryGate(Protocol):
    """Decides whether a retry may be spent (see ``retry.RetryBudget``), per rate-limit bucket."""

    def on_success(self, bucket: str) -> None: ...

    def on_failure(self, bucket: str) -> None: ...

    def allow_retry(self, bucket: str) -> bool: ...


class Limiter(Protocol):
    """Waits for an upstream slot in ``region_id`` (see ``ratelimit.UpstreamRateLimiter``)."""

    async def acquire(self, region_id: str, read: ReadDeadline) -> None: ...


class EcsClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        credentials: CredentialsProvider,
        endpoints: EndpointResolver,
        *,
        signature_version: SignatureVersion = "v3",
        read_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        retry_gate: RetryGate | None = None,
        limiter: Limiter | None = None,
        max_in_flight: int = 64,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
        tracer: Tracer = NO_TRACING,
    ) -> None:
        self._http = http
        self._credentials = credentials
        self._endpoints = endpoints
        self._signature_version = signature_version
        self._read_timeout = read_timeout
        self._retry = retry or RetryPolicy()
        self._gate: RetryGate = retry_gate or UnlimitedRetries()
        self._limiter = limiter
        self._max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_response_bytes = max_response_bytes
        self._clock = clock
        self._metrics = metrics or ServiceMetrics.unregistered()
        self._metrics.initialize_upstream(ACTION)
        self._tracer = tracer

    async def describe_image_share_permission(
        self,
        region_id: str,
        image_id: str,
        *,
        page_number: int,
        page_size: int,
        owner_account: str = "",
        deadline: ReadDeadline = NO_DEADLINE,
    ) -> SharePage:
        """Read one page, retrying transient failures while ``deadline`` allows."""
        params = {
            "RegionId": region_id,
            "ImageId": image_id,
            "PageNumber": str(page_number),
            "PageSize": str(page_size),
        }
        if owner_account:
            params["OwnerAccount"] = owner_account
        bucket = self._endpoints.bucket(region_id)
        with self._tracer.span(PAGE_SPAN) as span:
            if span.recording:
                span.set("cloud.region", region_id)
                span.set("imageshare.page", page_number)
                span.set("imageshare.page_size", page_size)
            attempt = 1
            retry_reason = ""
            while True:
                try:
                    page = await self._traced_attempt(
                        region_id, params, deadline, attempt, retry_reason
                    )
                except UpstreamError as exc:
                    span.set("imageshare.attempts", attempt)
                    if not exc.retryable:
                        raise
                    self._gate.on_failure(bucket)
                    if attempt >= self._retry.max_attempts:
                        raise
                    delay = self._retry.delay(attempt, exc)
                    limit = deadline.at()
                    if limit is not None and self._clock.monotonic() + delay >= limit:
                        raise
                    if not self._gate.allow_retry(bucket):
                        self._metrics.upstream_retries_denied.labels(ACTION).inc()
                        span.set("imageshare.retry_denied", True)
                        raise
                    self._metrics.upstream_retries.labels(ACTION, exc.outcome).inc()
                    await self._clock.sleep(delay)
                    attempt += 1
                    retry_reason = exc.outcome
                else:
                    self._gate.on_success(bucket)
                    span.set("imageshare.attempts", attempt)
                    return page

    async def _traced_attempt(
        self,
        region_id: str,
        params: Mapping[str, str],
        deadline: ReadDeadline,
        attempt: int,
        retry_reason: str,
    ) -> SharePage:
        """One attempt, parsed, in a span of its own."""
        with self._tracer.span(ATTEMPT_SPAN, kind="client") as span:
            if span.recording:
                span.set("imageshare.page", int(params["PageNumber"]))
                span.set("imageshare.attempt", attempt)
                span.set("http.request.method", "POST")
                if retry_reason:
                    span.set("imageshare.retry.reason", retry_reason)
            try:
                return parse_page(await self._attempt(region_id, params, deadline, span))
            except UpstreamError as exc:
                span.set("imageshare.upstream.outcome", exc.outcome)
                raise

    @contextlib.asynccontextmanager
    async def _slot(self, deadline: ReadDeadline) -> AsyncIterator[None]:
        """One of the ``max_in_flight`` connection slots, or ``UpstreamBusyError`` in time."""
        if self._slots.locked():
            wait_until = deadline.at()
            remaining = None if wait_until is None else wait_until - self._clock.monotonic()
            deadline.waiting_for_slot(True)
            try:
                async with asyncio.timeout(remaining):
                    await self._slots.acquire()
            except TimeoutError:
                raise UpstreamBusyError(self._max_in_flight) from None
            finally:
                deadline.waiting_for_slot(False)
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    async def _attempt(
        self, region_id: str, params: Mapping[str, str], deadline: ReadDeadline, span: Span
    ) -> dict[str, Any]:
        if self._limiter is not None:
            with self._tracer.span(RATE_LIMIT_SPAN):
                await self._limiter.acquire(region_id, deadline)
            deadline.admitted()
        async with self._slot(deadline):
            timeout = self._read_timeout
            cut_by_deadline = False
            limit = deadline.at()
            if limit is not None:
                left = limit - self._clock.monotonic()
                if left <= _MIN_ATTEMPT_SECONDS:
                    raise DeadlineExceededError("caller deadline reached before the upstream call")
                cut_by_deadline = left < timeout
                timeout = min(timeout, left)
            return await self._send(
                region_id, params, timeout, cut_by_deadline, deadline=deadline, span=span
            )

    async def _send(
        self,
        region_id: str,
        params: Mapping[str, str],
        seconds: float,
        cut_by_deadline: bool,
        *,
        deadline: ReadDeadline,
        span: Span,
    ) -> dict[str, Any]:
        endpoint = self._endpoints.resolve(region_id)
        credentials = await self._credentials.get()
        url, headers = self._signed(endpoint, params, credentials)
        region = region_label(region_id)
        outcome = "OK"
        status = 0
        request_id = ""
        started = time.perf_counter()
        self._metrics.upstream_in_flight.inc()
        try:
            # One bound for the whole exchange: httpx's own timeouts are per read,
            # so a body trickling in byte by byte would otherwise never time out.
            async with asyncio.timeout(seconds):
                status, response_headers, body = await self._exchange(url, headers, seconds=seconds)
            answer = _decode(status, response_headers, body)
            request_id = bounded_request_id(str(answer.get("RequestId") or ""))
            return answer
        except UpstreamError as exc:
            outcome = exc.outcome
            if isinstance(exc, UpstreamApiError):
                request_id = exc.request_id
                self._count_identity_failure(exc, credentials.access_key_id)
            raise
        except (TimeoutError, httpx.TimeoutException):
            outcome = "timeout"
            if cut_by_deadline:
                # The caller's deadline ran out, not the upstream's patience: no retry can
                # help, and the caller must hear DEADLINE_EXCEEDED, not UNAVAILABLE.
                raise DeadlineExceededError(
                    "caller deadline reached during the upstream call"
                ) from None
            raise UpstreamTransportError("timeout", "no complete answer in time") from None
        except httpx.DecodingError:
            outcome = "malformed_response"
            raise UpstreamTransportError("malformed_response", "body cannot be decoded") from None
        except httpx.RequestError as exc:
            outcome = "connection_error"
            raise UpstreamTransportError("connection_error", type(exc).__name__) from None
        except asyncio.CancelledError:
            outcome = "canceled"
            raise
        finally:
            self._metrics.upstream_in_flight.dec()
            self._metrics.upstream_duration.labels(ACTION, region).observe(
                time.perf_counter() - started, exemplar()
            )
            self._metrics.upstream_requests.labels(ACTION, region, outcome).inc()
            if request_id:
                deadline.upstream_answer(request_id)
            if span.recording:
                _describe_answer(span, endpoint.host, outcome, status, request_id)

    def _signed(
        self, endpoint: Endpoint, params: Mapping[str, str], credentials: Credentials
    ) -> tuple[str, dict[str, str]]:
        """The URL and headers of one signed POST (a fresh nonce and timestamp each time)."""
        if self._signature_version == "v3":
            headers = sign_v3(
                method="POST",
                host=endpoint.host,
                action=ACTION,
                version=API_VERSION,
                query=params,
                credentials=credentials,
            )
            query = canonical_query(params.items())
        else:
            signed = sign_v1(
                method="POST",
                action=ACTION,
                version=API_VERSION,
                params=params,
                credentials=credentials,
            )
            headers = {"host": endpoint.host}
            query = canonical_query(signed.items())
        return f"{endpoint.base_url}/?{query}", headers

    def _count_identity_failure(self, exc: UpstreamApiError, access_key_id: str) -> None:
        """Count and log loudly an answer that says the service's own identity is refused."""
        if exc.is_credentials:
            self._metrics.credentials_rejected.labels(exc.outcome).inc()
            log.error(
                "upstream rejected the service's own credentials: %s (RequestId %s)",
                exc,
                exc.request_id,
                extra={"upstream_code": exc.code, "access_key_id": access_key_id},
            )
        elif exc.is_permission_denied:
            self._metrics.permission_denied.labels(exc.outcome).inc()
            log.error(
                "upstream denied the service's own identity permission: %s (RequestId %s)",
                exc,
                exc.request_id,
                extra={"upstream_code": exc.code, "access_key_id": access_key_id},
            )

    async def _exchange(
        self, url: str, headers: Mapping[str, str], *, seconds: float
    ) -> tuple[int, httpx.Headers, bytes]:
        """POST and read the (decoded) body, refusing one larger than the configured cap."""
        limit = self._max_response_bytes
        async with self._http.stream("POST", url, headers=headers, timeout=seconds) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise UpstreamTransportError(
                    "malformed_response", f"body of {declared} bytes exceeds {limit}"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise UpstreamTransportError(
                        "malformed_response", f"body exceeds {limit} bytes"
                    )
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)


def _describe_answer(span: Span, host: str, outcome: str, status: int, request_id: str) -> None:
    """What an attempt's span says about the answer; never the URL, headers or body."""
    span.set("server.address", host)
    span.set("imageshare.upstream.outcome", outcome)
    if status:
        span.set("http.response.status_code", status)
    if request_id:
        span.set("imageshare.upstream.request_id", request_id)


def _decode(status: int, headers: httpx.Headers, raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        if status >= 500:
            raise UpstreamApiError(
                f"HTTP{status}", "non-JSON error body", http_status=status
            ) from None
        raise UpstreamTransportError("malformed_response", "body is not JSON") from None
    if not isinstance(body, dict):
        raise UpstreamTransportError("malformed_response", "body is not a JSON object")
    if status != 200 or ("Code" in body and "TotalCount" not in body):
        retry_after = headers.get("x-acs-retry-after", "")
        raise UpstreamApiError(
            str(body.get("Code") or f"HTTP{status}"),
            str(body.get("Message") or ""),
            http_status=status,
            request_id=str(body.get("RequestId") or ""),
            retry_after=int(retry_after) / 1000 if retry_after.isdigit() else None,
        )
    return body


def _items(container: Any, key: str) -> list[Any]:
    if not isinstance(container, dict):
        return []
    items = container.get(key)
    return items if isinstance(items, list) else []


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _aliyun_id(value: Any) -> str:
    """An account id, verbatim; a JSON number keeps its digits. Anything else is malformed."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _ALIYUN_ID.fullmatch(text):
        raise ValueError("AliyunId is not a digit string")
    return text


def _group(value: Any) -> str:
    if not isinstance(value, str) or not _GROUP.fullmatch(value):
        raise ValueError("Group is not a short printable string")
    return value


def _count(value: Any, name: str, maximum: int) -> int:
    number = int(value)
    if not 0 <= number <= maximum:
        raise ValueError(f"{name} {number} is out of range")
    return number


def parse_page(body: Mapping[str, Any]) -> SharePage:
    """Parse a success body into a page, or raise a transient ``malformed_response``."""
    try:
        accounts = tuple(
            Account(_aliyun_id(item["AliyunId"]), _parse_time(item.get("SharedTime")))
            for item in _items(body.get("Accounts"), "Account")
            if isinstance(item, dict) and item.get("AliyunId") not in (None, "")
        )
        groups = tuple(
            _group(item["Group"])
            for item in _items(body.get("ShareGroups"), "ShareGroup")
            if isinstance(item, dict) and item.get("Group")
        )
        request_id = body.get("RequestId", "")
        return SharePage(
            request_id=request_id if isinstance(request_id, str) and len(request_id) <= 64 else "",
            page_number=_count(body.get("PageNumber", 1), "PageNumber", MAX_TOTAL_COUNT),
            page_size=_count(body.get("PageSize", len(accounts)), "PageSize", MAX_TOTAL_COUNT),
            total_count=_count(body["TotalCount"], "TotalCount", MAX_TOTAL_COUNT),
            accounts=accounts,
            share_groups=groups,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise UpstreamTransportError("malformed_response", f"unexpected body: {exc}") from None
