"""Blocking client: for scripts, CLIs and thread-per-request services."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.experimental

from imageshare.v1 import image_share_pb2 as pb
from imageshare.v1.image_share_pb2_grpc import ImageShareServiceStub

from ._listing import (
    Deadline,
    ListingState,
    RetryHook,
    build_request,
    empty_stream_error,
    retry_delay,
)
from ._watching import (
    DEFAULT_RECONNECT,
    WatchState,
    check_request,
    ended_error,
    reconnect_delay,
    watch_request,
)
from .channel import DEFAULT_SERVICE_CONFIG, RetryPolicy, channel_options, default_retry
from .errors import from_rpc_error
from .models import ListingMetadata, ShareChange, ShareCheck, SharedAccount, ShareList

DEFAULT_TIMEOUT = 10.0

# Each stream is read on the thread that iterates it. By default grpc receives every message on
# its channel thread and hands it over through a condition variable: a thread switch (and the
# GIL) per message, which measured as the largest part of a Python caller's cost for a long
# listing (bench/README.md, scenario (c)). A listing is iterated by one thread, so nothing is
# lost; grpc still calls the option experimental.
SYNC_STREAM_OPTIONS: tuple[tuple[str, Any], ...] = (
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
)


class ShareListing:
    """One `ListImageShares` stream: iterate it for accounts; `metadata` once it started.

    Nothing is sent until `start()`, `metadata` or iteration. Starting retries UNAVAILABLE
    within the policy; after the first message, a failure raises `StreamInterruptedError`.
    Iterate it once. Leaving a `with` block early cancels the call.
    """

    def __init__(
        self,
        stub: ImageShareServiceStub,
        request: pb.ListImageSharesRequest,
        *,
        timeout: float | None,
        retry: RetryPolicy,
        metadata: Sequence[tuple[str, str]],
        on_retry: RetryHook | None,
    ) -> None:
        self._stub = stub
        self._request = request
        self._deadline = Deadline(timeout)
        self._retry = retry
        self._grpc_metadata = tuple(metadata)
        self._on_retry = on_retry
        self._state = ListingState()
        self._call: Any = None
        self._first: pb.ListImageSharesResponse | None = None

    def start(self) -> ListingMetadata:
        """Open the stream and wait for its first message (idempotent)."""
        if self._state.metadata is not None:
            return self._state.metadata
        while True:
            self._state.attempts += 1
            attempt = self._state.attempts
            remaining = self._deadline.remaining()
            if remaining is not None and remaining <= 0:
                raise self._deadline.expired_error(attempt - 1)
            call = self._stub.ListImageShares(
                self._request, timeout=remaining, metadata=self._grpc_metadata
            )
            self._call = call
            try:
                first: pb.ListImageSharesResponse = next(call)
            except StopIteration:
                raise empty_stream_error(attempt) from None
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=attempt)
                delay = retry_delay(error, attempt, self._retry, self._deadline)
                if delay is None:
                    raise error from exc
                if self._on_retry is not None:
                    self._on_retry(attempt, error, delay)
                time.sleep(delay)
                continue
            self._first = first
            self._state.take(first)
            return self._state.require_metadata()

    @property
    def metadata(self) -> ListingMetadata:
        """Listing-wide facts from the first message; starts the stream if needed."""
        return self.start()

    @property
    def upstream_request_ids(self) -> tuple[str, ...]:
        """Upstream RequestIds seen so far (all of them once the listing was read)."""
        return tuple(self._state.upstream_request_ids)

    @property
    def accounts_received(self) -> int:
        return self._state.accounts_received

    @property
    def attempts(self) -> int:
        return self._state.attempts

    def __iter__(self) -> Iterator[SharedAccount]:
        self.start()
        first, self._first = self._first, None
        if first is None:
            raise RuntimeError("a ShareListing can be iterated only once")
        try:
            yield from (SharedAccount.from_proto(a) for a in first.accounts)
            for msg in self._call:
                yield from self._state.take(msg)
            self._state.finished = True
        except grpc.RpcError as exc:
            if self._state.cancelled:
                return
            raise self._state.interrupted(
                from_rpc_error(exc, attempts=self._state.attempts)
            ) from exc
        finally:
            # A caller that breaks out of the loop is done with the stream: free the server.
            if not self._state.finished:
                self.cancel()

    def collect(self) -> ShareList:
        """Read the whole listing into memory."""
        accounts = list(self)
        return self._state.share_list(accounts)

    def cancel(self) -> None:
        """Stop the stream; the server stops paging the upstream for it."""
        self._state.cancelled = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> ShareListing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._state.finished:
            self.cancel()


class ShareWatch:
    """One image's share list and its changes, as `ShareChange` events: iterate it.

    The first event is the whole list (`snapshot`); then one per change, as the server
    sees it (every `--watch-interval`, 60 s by default). When the stream ends UNAVAILABLE
    (the server drains, the connection reached its age) or the server is at its watch
    limit, the watch reconnects with backoff and compares the new snapshot with what it
    held: what changed meanwhile comes as one `resumed` event, so no change is missed.
    Other errors (NOT_FOUND: the image was deleted) end the iteration with
    `ImageShareError`. `accounts`, `share_groups` and `is_public` are the list as of the
    last event. Leaving a `with` block, breaking out of the loop or `cancel()` ends it.
    """

    def __init__(
        self,
        stub: ImageShareServiceStub,
        request: pb.WatchImageSharesRequest,
        *,
        reconnect: RetryPolicy,
        metadata: Sequence[tuple[str, str]],
        on_retry: RetryHook | None,
    ) -> None:
        self._stub = stub
        self._request = request
        self._reconnect = reconnect
        self._grpc_metadata = tuple(metadata)
        self._on_retry = on_retry
        self._state = WatchState(request.region_id, request.image_id)
        self._call: Any = None
        self._cancelled = False

    @property
    def accounts(self) -> Mapping[str, SharedAccount]:
        return self._state.accounts

    @property
    def share_groups(self) -> tuple[str, ...]:
        return tuple(self._state.share_groups)

    @property
    def is_public(self) -> bool:
        return self._state.is_public

    @property
    def reconnects(self) -> int:
        """Streams opened again after the first one ended."""
        return self._state.reconnects

    def __iter__(self) -> Iterator[ShareChange]:
        failures = 0
        try:
            while not self._cancelled:
                call = self._stub.WatchImageShares(self._request, metadata=self._grpc_metadata)
                self._call = call
                try:
                    for msg in call:
                        failures = 0
                        change = self._state.apply(msg)
                        if change is not None:
                            yield change
                    error = ended_error()
                except grpc.RpcError as exc:
                    if self._cancelled:
                        return
                    error = from_rpc_error(exc, attempts=failures + 1)
                failures += 1
                delay = reconnect_delay(error, failures, self._reconnect)
                if delay is None:
                    raise error
                if self._on_retry is not None:
                    self._on_retry(failures, error, delay)
                time.sleep(delay)
                self._state.reconnects += 1
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop watching; the server lets go of the stream."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> ShareWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


class ImageShareClient:
    """Blocking client for `imageshare.v1.ImageShareService`; one per process, shared by threads.

    `timeout` (seconds) is the default deadline of each listing, retries included; None
    means no deadline, which a service should never choose. `credentials` switches to TLS.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        service_config: Mapping[str, Any] | None = DEFAULT_SERVICE_CONFIG,
        options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
        on_retry: RetryHook | None = None,
    ) -> None:
        opts = channel_options(service_config, [*SYNC_STREAM_OPTIONS, *options])
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        self._stub = ImageShareServiceStub(self._channel)
        self.target = target
        self.timeout = timeout
        self.retry = retry if retry is not None else default_retry(service_config)
        self._metadata = tuple(metadata)
        self._on_retry = on_retry

    def list_shares(
        self,
        region: str,
        image: str,
        *,
        owner_account: str = "",
        page_size: int = 0,
        bypass_cache: bool = False,
        timeout: float | None = None,
    ) -> ShareListing:
        """Accounts `image` in `region` is shared with, as a lazy `ShareListing`."""
        return ShareListing(
            self._stub,
            build_request(region, image, owner_account, page_size, bypass_cache),
            timeout=self.timeout if timeout is None else timeout,
            retry=self.retry,
            metadata=self._metadata,
            on_retry=self._on_retry,
        )

    def check(
        self,
        region: str,
        image: str,
        account_id: str,
        *,
        owner_account: str = "",
        bypass_cache: bool = False,
        timeout: float | None = None,
    ) -> ShareCheck:
        """Whether `account_id` may launch `image` (`CheckImageShare`): one small call,
        answered from the server's cache when it has the list.

        Retries UNAVAILABLE within the deadline, like a listing before its first message.
        """
        request = check_request(region, image, account_id, owner_account, bypass_cache)
        deadline = Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline.remaining()
            if remaining is not None and remaining <= 0:
                raise deadline.expired_error(attempt - 1)
            try:
                response = self._stub.CheckImageShare(
                    request, timeout=remaining, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=attempt)
                delay = retry_delay(error, attempt, self.retry, deadline)
                if delay is None:
                    raise error from exc
                if self._on_retry is not None:
                    self._on_retry(attempt, error, delay)
                time.sleep(delay)
                continue
            return ShareCheck.from_proto(response)

    def is_shared_with(
        self,
        region: str,
        image: str,
        account_id: str,
        *,
        owner_account: str = "",
        timeout: float | None = None,
    ) -> bool:
        """True when `account_id` may use the image: listed, or the image is public."""
        return self.check(
            region, image, account_id, owner_account=owner_account, timeout=timeout
        ).shared

    def watch(
        self,
        region: str,
        image: str,
        *,
        owner_account: str = "",
        reconnect: RetryPolicy | None = None,
    ) -> ShareWatch:
        """The share list of `image` and every change to it, as a lazy `ShareWatch`.

        `reconnect` bounds the reconnections in a row (default: for as long as it is
        iterated, backing off up to 10 s).
        """
        return ShareWatch(
            self._stub,
            watch_request(region, image, owner_account),
            reconnect=reconnect if reconnect is not None else DEFAULT_RECONNECT,
            metadata=self._metadata,
            on_retry=self._on_retry,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ImageShareClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
