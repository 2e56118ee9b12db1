"""The shared (L2) share-list store: one Redis string per key, read by every replica.

A value is a version byte and zlib-compressed compact JSON of the list with
its wall-clock read time, so any replica can tell how old it is and apply
the same fresh / stale-while-revalidate / stale-if-error windows as the
in-process cache; Redis drops it when the stale-if-error window ends. A
NotFound answer is stored too, for the negative TTL, so replicas do not each
spend a call to learn that an image is gone.

Wall clocks of replicas differ by milliseconds under NTP; the windows are
seconds to minutes, so ages measured across replicas are good enough.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from datetime import datetime
from typing import Any

from imageshare_server.cache import CachePolicy
from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import UpstreamErrorData
from imageshare_server.core.types import Account, ShareKey, ShareList
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.redis_tier.link import RedisLink, RedisUnavailable

_VERSION = b"\x01"


def list_key(prefix: str, key: ShareKey) -> str:
    # Region and image ids cannot contain ':' (validation), so the owner, last, is unambiguous.
    return f"{prefix}list:{key.region_id}:{key.image_id}:{key.owner_account}"


def encode(shares: ShareList) -> bytes:
    body = {
        "t": shares.read_time,
        "g": list(shares.share_groups),
        "r": list(shares.request_ids),
        "a": [
            [a.aliyun_id, a.shared_time.isoformat()] if a.shared_time else [a.aliyun_id]
            for a in shares.accounts
        ],
    }
    return _pack(body)


def encode_negative(error: UpstreamErrorData, now: float) -> bytes:
    body = {
        "t": now,
        "e": [error.code, error.message, error.http_status, error.request_id],
    }
    return _pack(body)


def _pack(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return _VERSION + zlib.compress(raw, 1)


def decode(
    key: ShareKey, data: bytes, clock: Clock = SYSTEM_CLOCK
) -> ShareList | UpstreamErrorData:
    """The stored list, with ``read_monotonic`` set so in-process ages come out right."""
    if not data.startswith(_VERSION):
        raise ValueError("unknown shared cache value version")
    body = json.loads(zlib.decompress(data[1:]))
    if "e" in body:
        code, message, status, request_id = body["e"]
        return UpstreamErrorData(str(code), str(message), int(status), str(request_id))
    read_time = float(body["t"])
    age = max(0.0, clock.time() - read_time)
    return ShareList(
        key=key,
        accounts=tuple(
            Account(row[0], datetime.fromisoformat(row[1]) if len(row) > 1 else None)
            for row in body["a"]
        ),
        share_groups=tuple(body["g"]),
        request_ids=tuple(body["r"]),
        read_time=read_time,
        read_monotonic=clock.monotonic() - age,
    )


class RedisShareStore:
    def __init__(
        self,
        link: RedisLink,
        policy: CachePolicy,
        *,
        prefix: str,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ServiceMetrics.unregistered()
        self._link = link
        self._policy = policy
        self._prefix = prefix
        self._clock = clock

    async def get(self, key: ShareKey) -> ShareList | UpstreamErrorData | None:
        """The stored value, None if there is none; ``RedisUnavailable`` if Redis failed."""
        name = list_key(self._prefix, key)
        try:
            data = await self._link.call("get", lambda r: r.get(name))
        except RedisUnavailable:
            self._metrics.redis_cache_requests.labels("error").inc()
            raise
        if not isinstance(data, bytes):
            self._metrics.redis_cache_requests.labels("miss").inc()
            return None
        try:
            value = decode(key, data, self._clock)
        except (ValueError, KeyError, IndexError, TypeError, zlib.error):
            # Written by an incompatible version: treat as absent, the next read overwrites it.
            self._metrics.redis_cache_requests.labels("miss").inc()
            return None
        self._metrics.redis_cache_requests.labels("hit").inc()
        return value

    async def put(self, shares: ShareList) -> None:
        """Store ``shares`` until its stale-if-error window ends; Redis failures are swallowed."""
        policy = self._policy
        keep = policy.ttl + max(policy.stale_while_revalidate, policy.stale_if_error)
        remaining = keep - max(0.0, self._clock.time() - shares.read_time)
        if remaining <= 0.001:
            return
        await self._set(shares.key, encode(shares), remaining)

    async def put_negative(self, key: ShareKey, error: UpstreamErrorData) -> None:
        if self._policy.negative_ttl > 0:
            data = encode_negative(error, self._clock.time())
            await self._set(key, data, self._policy.negative_ttl)

    async def _set(self, key: ShareKey, data: bytes, seconds: float) -> None:
        name = list_key(self._prefix, key)
        milliseconds = max(1, int(seconds * 1000))
        with contextlib.suppress(RedisUnavailable):  # the L1 still has it
            await self._link.call("set", lambda r: r.set(name, data, px=milliseconds))
