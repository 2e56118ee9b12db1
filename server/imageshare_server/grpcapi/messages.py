"""Turn share chunks into response messages of the caller's page size, and build the
answers of CheckImageShare and the messages of WatchImageShares.

Upstream pages and response messages are independent: a message may take
accounts from two upstream pages, and one upstream page may fill several
messages.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from typing import TypeAlias

from google.protobuf import duration_pb2, timestamp_pb2

from imageshare.v1 import image_share_pb2
from imageshare_server.cache import CacheEntry
from imageshare_server.core.clock import Clock
from imageshare_server.core.types import PUBLIC_GROUP, Account, CacheStatus, ShareKey, ShareQuery
from imageshare_server.listing.source import ShareAnswer, ShareChunk
from imageshare_server.watch.hub import WatchEvent

Response = image_share_pb2.ListImageSharesResponse
ProtoCacheStatus: TypeAlias = image_share_pb2.CacheStatus.ValueType
PROTO_CACHE_STATUS: dict[CacheStatus | None, ProtoCacheStatus] = {
    None: image_share_pb2.CACHE_STATUS_UNSPECIFIED,
    CacheStatus.MISS: image_share_pb2.CACHE_STATUS_MISS,
    CacheStatus.HIT: image_share_pb2.CACHE_STATUS_HIT,
    CacheStatus.STALE: image_share_pb2.CACHE_STATUS_STALE,
    CacheStatus.BYPASS: image_share_pb2.CACHE_STATUS_BYPASS,
    CacheStatus.COALESCED: image_share_pb2.CACHE_STATUS_COALESCED,
}
_CACHED = (CacheStatus.HIT, CacheStatus.STALE)


def build_cached_messages(entry: CacheEntry, query: ShareQuery) -> Callable[[], list[bytes]]:
    """How to build the serialized messages of a cached list at ``query.page_size``.

    They lack only ``cache_status`` and ``cache_age``; ``hit_suffix`` supplies
    those per call. Appending a serialized message to another merges them
    (protobuf's wire format), so a hit costs one small serialization. The
    cache keeps what this builds (``ShareCache.messages``).
    """

    def build() -> list[bytes]:
        shares = entry.shares
        assert shares is not None
        builder = MessageBuilder(query)
        chunk = ShareChunk(
            accounts=shares.accounts,
            share_groups=shares.share_groups,
            total_count=shares.total_count,
            request_ids=(),
            cache_status=None,
            read_time=shares.read_time,
        )
        built = [*builder.feed(chunk), *builder.finish()]
        return [m.SerializeToString() for m in built]

    return build


_SMALL_VARINTS = [bytes((value,)) for value in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


_VARINT, _LENGTH_DELIMITED = 0, 2
_STATUS_FIELDS = {
    status: _tag(Response.CACHE_STATUS_FIELD_NUMBER, _VARINT) + _varint(value)
    for status, value in PROTO_CACHE_STATUS.items()
    if status is not None
}
_AGE_TAG = _tag(Response.CACHE_AGE_FIELD_NUMBER, _LENGTH_DELIMITED)
_SECONDS_TAG = _tag(duration_pb2.Duration.SECONDS_FIELD_NUMBER, _VARINT)
_NANOS_TAG = _tag(duration_pb2.Duration.NANOS_FIELD_NUMBER, _VARINT)


def hit_suffix(status: CacheStatus, stored_monotonic: float, clock: Clock) -> bytes:
    """``cache_status`` and ``cache_age`` of one call, serialized as protobuf would.

    Written out by hand: it is the one thing a cache hit serializes, on every call.
    """
    age = max(0, int((clock.monotonic() - stored_monotonic) * 1e9))
    seconds, nanos = divmod(age, 1_000_000_000)
    duration = (_SECONDS_TAG + _varint(seconds) if seconds else b"") + (
        _NANOS_TAG + _varint(nanos) if nanos else b""
    )
    return _STATUS_FIELDS[status] + _AGE_TAG + _varint(len(duration)) + duration


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def account_message(account: Account) -> image_share_pb2.SharedAccount:
    message = image_share_pb2.SharedAccount(aliyun_id=account.aliyun_id)
    when = account.shared_time
    if when is not None:
        # What Timestamp.FromDatetime sets (a naive time is UTC), at a third of its cost:
        # a cold read builds one per account before its first message can go out.
        delta = (when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)) - _EPOCH
        stamp = message.shared_time
        stamp.seconds = delta.days * 86_400 + delta.seconds
        stamp.nanos = delta.microseconds * 1_000
    return message


class MessageBuilder:
    """Accumulates chunks, emits full messages; ``finish`` sends the rest (>= 1 message).

    It builds fresh reads (and, with no status, the cached form of a list); a cached
    list's ``cache_age`` comes from ``hit_suffix`` at the moment of each call.
    """

    def __init__(self, query: ShareQuery) -> None:
        self._query = query
        self._pending: list[image_share_pb2.SharedAccount] = []
        self._request_ids: list[str] = []
        self._groups: list[str] | None = None
        self._total = 0
        self._status: CacheStatus | None = None
        self._read_time = 0.0
        self._sent = 0

    @property
    def messages_sent(self) -> int:
        return self._sent

    def feed(self, chunk: ShareChunk) -> Iterator[Response]:
        if self._groups is None:
            self._groups = list(chunk.share_groups)
            self._status = chunk.cache_status
            self._read_time = chunk.read_time
        self._total = chunk.total_count
        self._request_ids.extend(chunk.request_ids)
        self._pending.extend(account_message(a) for a in chunk.accounts)
        size = self._query.page_size
        while len(self._pending) >= size:
            batch, self._pending = self._pending[:size], self._pending[size:]
            yield self._message(batch)

    def finish(self) -> Iterator[Response]:
        if self._pending or self._sent == 0:
            batch, self._pending = self._pending, []
            yield self._message(batch)

    def _message(self, accounts: list[image_share_pb2.SharedAccount]) -> Response:
        message = Response(
            accounts=accounts,
            total_count=self._total,
            region_id=self._query.key.region_id,
            image_id=self._query.key.image_id,
            upstream_request_ids=self._request_ids,
            cache_status=PROTO_CACHE_STATUS[self._status],
        )
        self._request_ids = []
        if self._sent == 0 and self._groups:
            message.share_groups.extend(image_share_pb2.ShareGroup(group=g) for g in self._groups)
        if self._read_time:
            message.read_time.CopyFrom(_timestamp(self._read_time))
        self._sent += 1
        return message


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def check_response(
    answer: ShareAnswer, account: Account | None, clock: Clock
) -> image_share_pb2.CheckImageShareResponse:
    """The answer to a check: via ACCOUNT when listed, else PUBLIC when shared with ``all``."""
    response = image_share_pb2.CheckImageShareResponse(
        total_count=answer.total_count,
        cache_status=PROTO_CACHE_STATUS[answer.cache_status],
        upstream_request_ids=answer.request_ids,
    )
    if account is not None:
        response.shared = True
        response.via = image_share_pb2.SHARE_VIA_ACCOUNT
        if account.shared_time is not None:
            response.shared_time.FromDatetime(account.shared_time)
    elif PUBLIC_GROUP in answer.share_groups:
        response.shared = True
        response.via = image_share_pb2.SHARE_VIA_PUBLIC
    if answer.read_time:
        response.read_time.CopyFrom(_timestamp(answer.read_time))
        age = max(0, int((clock.time() - answer.read_time) * 1e9))
        response.cache_age.FromNanoseconds(age if answer.cache_status in _CACHED else 0)
    return response


def watch_message(event: WatchEvent, key: ShareKey) -> bytes:
    """The serialized message of ``event``, built once and kept on it for every watcher."""
    if event.encoded is not None:
        return event.encoded
    shares = event.shares
    message = image_share_pb2.WatchImageSharesResponse(
        snapshot=event.snapshot,
        total_count=shares.total_count,
        region_id=key.region_id,
        image_id=key.image_id,
    )
    change = event.change
    if change is None:
        accounts, groups = shares.accounts, shares.share_groups
    else:
        accounts, groups = change.added, change.groups_added
        message.removed_aliyun_ids.extend(change.removed)
        message.removed_share_groups.extend(change.groups_removed)
    message.accounts.extend(account_message(a) for a in accounts)
    message.share_groups.extend(image_share_pb2.ShareGroup(group=g) for g in groups)
    if shares.read_time:
        message.read_time.CopyFrom(_timestamp(shares.read_time))
    event.encoded = message.SerializeToString()
    return event.encoded
