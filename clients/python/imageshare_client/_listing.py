"""State and decisions shared by the sync and async listings; no I/O here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from imageshare.v1 import image_share_pb2 as pb

from .channel import RetryPolicy
from .errors import ImageShareError, StreamInterruptedError
from .models import ListingMetadata, SharedAccount, ShareList

RetryHook = Callable[[int, ImageShareError, float], None]
"""Called before each retry with (failed attempt number, its error, backoff seconds)."""


def build_request(
    region: str, image: str, owner_account: str, page_size: int, bypass_cache: bool
) -> pb.ListImageSharesRequest:
    return pb.ListImageSharesRequest(
        region_id=region,
        image_id=image,
        owner_account=owner_account,
        page_size=page_size,
        bypass_cache=bypass_cache,
    )


class Deadline:
    """One deadline for the whole listing, retries and backoff included."""

    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def expired_error(self, attempts: int) -> ImageShareError:
        return ImageShareError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "deadline exceeded before the first message",
            attempts=attempts,
        )


def retry_delay(
    error: ImageShareError, attempt: int, policy: RetryPolicy, deadline: Deadline
) -> float | None:
    """Backoff before the next attempt, or None when `error` must reach the caller.

    Only UNAVAILABLE is retried: the other codes say something about the request (or the
    deadline), which a second identical request would not change. A backoff that would
    outlive the deadline is not worth sleeping through.
    """
    if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= policy.max_attempts:
        return None
    delay = policy.backoff(attempt)
    remaining = deadline.remaining()
    if remaining is not None and delay >= remaining:
        return None
    return delay


def empty_stream_error(attempts: int) -> ImageShareError:
    return ImageShareError(
        grpc.StatusCode.INTERNAL,
        "server closed the stream without a message (every listing has at least one)",
        attempts=attempts,
    )


@dataclass(slots=True)
class ListingState:
    """What the stream has told us so far."""

    metadata: ListingMetadata | None = None
    upstream_request_ids: list[str] = field(default_factory=list)
    accounts_received: int = 0
    attempts: int = 0
    cancelled: bool = False
    finished: bool = False

    def take(self, msg: pb.ListImageSharesResponse) -> list[SharedAccount]:
        if self.metadata is None:
            self.metadata = ListingMetadata.from_first_message(msg)
        self.upstream_request_ids.extend(msg.upstream_request_ids)
        accounts = [SharedAccount.from_proto(a) for a in msg.accounts]
        self.accounts_received += len(accounts)
        return accounts

    def interrupted(self, error: ImageShareError) -> StreamInterruptedError:
        return StreamInterruptedError(error, accounts_received=self.accounts_received)

    def require_metadata(self) -> ListingMetadata:
        if self.metadata is None:
            raise RuntimeError("listing not started: await start() or iterate first")
        return self.metadata

    def share_list(self, accounts: list[SharedAccount]) -> ShareList:
        return ShareList(
            metadata=self.require_metadata(),
            accounts=tuple(accounts),
            upstream_request_ids=tuple(self.upstream_request_ids),
        )
