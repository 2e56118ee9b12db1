"""The DescribeImageSharePermission client: sign, send, parse, retry.

Transport (the pooled ``httpx.AsyncClient``) is injected so one pool serves
the whole process, and tests point it at the emulator without mocks. Every
attempt gets a fresh nonce and timestamp, and is bounded by the caller's
remaining deadline so that no upstream call outlives the RPC it serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Protocol

import httpx

from imageshare_server.ecs.credentials import CredentialsProvider
from imageshare_server.ecs.endpoints import EndpointResolver, region_label
from imageshare_server.ecs.errors import UpstreamApiError, UpstreamError, UpstreamTransportError
from imageshare_server.ecs.model import Account, SharePage
from imageshare_server.ecs.retry import RetryPolicy, UnlimitedRetries
from imageshare_server.ecs.signing import canonical_query, sign_v1, sign_v3
from imageshare_server.observability import metrics

log = logging.getLogger(__name__)

ACTION = "DescribeImageSharePermission"
API_VERSION = "2014-05-26"
SignatureVersion = Literal["v3", "v1"]


class RetryGate(Protocol):
    """Decides whether a retry may be spent (see ``retry.RetryBudget``)."""

    def on_success(self) -> None: ...

    def on_failure(self) -> None: ...

    def allow_retry(self) -> bool: ...


class Limiter(Protocol):
    """Waits for an upstream slot in ``region_id`` (see ``ratelimit.UpstreamRateLimiter``)."""

    async def acquire(self, region_id: str, deadline: float | None) -> None: ...


class DeadlineExceededError(Exception):
    """Not enough of the caller's deadline is left for another upstream attempt."""


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
    ) -> None:
        self._http = http
        self._credentials = credentials
        self._endpoints = endpoints
        self._signature_version = signature_version
        self._read_timeout = read_timeout
        self._retry = retry or RetryPolicy()
        self._gate: RetryGate = retry_gate or UnlimitedRetries()
        self._limiter = limiter

    async def describe_image_share_permission(
        self,
        region_id: str,
        image_id: str,
        *,
        page_number: int,
        page_size: int,
        owner_account: str = "",
        deadline: float | None = None,
    ) -> SharePage:
        """Read one page, retrying transient failures within ``deadline`` (``time.monotonic()``)."""
        params = {
            "RegionId": region_id,
            "ImageId": image_id,
            "PageNumber": str(page_number),
            "PageSize": str(page_size),
        }
        if owner_account:
            params["OwnerAccount"] = owner_account
        attempt = 1
        while True:
            try:
                page = parse_page(await self._attempt(region_id, params, deadline))
            except UpstreamError as exc:
                if not exc.retryable:
                    raise
                self._gate.on_failure()
                if attempt >= self._retry.max_attempts:
                    raise
                delay = self._retry.delay(attempt, exc)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise
                if not self._gate.allow_retry():
                    metrics.UPSTREAM_RETRIES_DENIED.labels(ACTION).inc()
                    raise
                metrics.UPSTREAM_RETRIES.labels(ACTION, exc.outcome).inc()
                await asyncio.sleep(delay)
                attempt += 1
            else:
                self._gate.on_success()
                return page

    async def _attempt(
        self, region_id: str, params: Mapping[str, str], deadline: float | None
    ) -> dict[str, Any]:
        if self._limiter is not None:
            await self._limiter.acquire(region_id, deadline)
        timeout = self._read_timeout
        cut_by_deadline = False
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0.001:
                raise DeadlineExceededError("caller deadline reached before the upstream call")
            cut_by_deadline = left < timeout
            timeout = min(timeout, left)
        endpoint = self._endpoints.resolve(region_id)
        credentials = await self._credentials.get()
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
        url = f"{endpoint.base_url}/?{query}"
        region = region_label(region_id)
        outcome = "OK"
        started = time.perf_counter()
        metrics.UPSTREAM_IN_FLIGHT.inc()
        try:
            response = await self._http.post(url, headers=headers, timeout=timeout)
            return _decode(response)
        except UpstreamError as exc:
            outcome = exc.outcome
            if isinstance(exc, UpstreamApiError) and exc.is_credentials:
                metrics.CREDENTIALS_REJECTED.labels(exc.outcome).inc()
                log.error(
                    "upstream rejected the service's own credentials: %s (RequestId %s)",
                    exc,
                    exc.request_id,
                    extra={"upstream_code": exc.code, "access_key_id": credentials.access_key_id},
                )
            raise
        except httpx.TimeoutException as exc:
            outcome = "timeout"
            if cut_by_deadline:
                # The caller's deadline ran out, not the upstream's patience: no retry can
                # help, and the caller must hear DEADLINE_EXCEEDED, not UNAVAILABLE.
                raise DeadlineExceededError(
                    "caller deadline reached during the upstream call"
                ) from None
            raise UpstreamTransportError("timeout", type(exc).__name__) from None
        except httpx.TransportError as exc:
            outcome = "connection_error"
            raise UpstreamTransportError("connection_error", type(exc).__name__) from None
        except asyncio.CancelledError:
            outcome = "canceled"
            raise
        finally:
            metrics.UPSTREAM_IN_FLIGHT.dec()
            metrics.UPSTREAM_DURATION.labels(ACTION, region).observe(time.perf_counter() - started)
            metrics.UPSTREAM_REQUESTS.labels(ACTION, region, outcome).inc()


def _decode(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        if response.status_code >= 500:
            raise UpstreamApiError(
                f"HTTP{response.status_code}",
                "non-JSON error body",
                http_status=response.status_code,
            ) from None
        raise UpstreamTransportError("malformed_response", "body is not JSON") from None
    if not isinstance(body, dict):
        raise UpstreamTransportError("malformed_response", "body is not a JSON object")
    if response.status_code != 200 or ("Code" in body and "TotalCount" not in body):
        retry_after = response.headers.get("x-acs-retry-after")
        raise UpstreamApiError(
            str(body.get("Code") or f"HTTP{response.status_code}"),
            str(body.get("Message") or ""),
            http_status=response.status_code,
            request_id=str(body.get("RequestId") or ""),
            retry_after=int(retry_after) / 1000 if retry_after and retry_after.isdigit() else None,
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


def parse_page(body: Mapping[str, Any]) -> SharePage:
    """Parse a success body. ``AliyunId`` may be a JSON number: keep its digits verbatim."""
    try:
        accounts = tuple(
            Account(str(item["AliyunId"]), _parse_time(item.get("SharedTime")))
            for item in _items(body.get("Accounts"), "Account")
            if isinstance(item, dict) and item.get("AliyunId") not in (None, "")
        )
        groups = tuple(
            str(item["Group"])
            for item in _items(body.get("ShareGroups"), "ShareGroup")
            if isinstance(item, dict) and item.get("Group")
        )
        return SharePage(
            request_id=str(body.get("RequestId", "")),
            page_number=int(body.get("PageNumber", 1)),
            page_size=int(body.get("PageSize", len(accounts))),
            total_count=int(body["TotalCount"]),
            accounts=accounts,
            share_groups=groups,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamTransportError("malformed_response", f"unexpected body: {exc}") from None
