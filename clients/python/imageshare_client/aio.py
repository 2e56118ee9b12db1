"""asyncio client (grpc.aio): for asyncio services that call imageshare concurrently."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

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
from .client import DEFAULT_TIMEOUT
from .errors import from_rpc_error
from .models import ListingMetadata, ShareChange, ShareCheck, SharedAccount, ShareList


class AsyncShareListing:
    """One `ListImageShares` stream for asyncio: `async for` accounts, `await start()` first
    if you need `metadata` before iterating.

    Cancelling the task that iterates cancels the RPC. Leaving an `async with` block early
    cancels it too.
    """

    def __init__(
        self,
        stub: Any,
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
        self._iterated = False

    async def start(self) -> ListingMetadata:
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
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, attempts=attempt)
                delay = retry_delay(error, attempt, self._retry, self._deadline)
                if delay is None:
                    raise error from exc
                if self._on_retry is not None:
                    self._on_retry(attempt, error, delay)
                await asyncio.sleep(delay)
                continue
            except asyncio.CancelledError:
                call.cancel()
                raise
            if first is grpc.aio.EOF:
                raise empty_stream_error(attempt)
            self._first = first
            self._state.take(first)
            return self._state.require_metadata()

    @property
    def metadata(self) -> ListingMetadata:
        """Listing-wide facts from the first message; `RuntimeError` before `start()`."""
        return self._state.require_metadata()

    @property
    def upstream_request_ids(self) -> tuple[str, ...]:
        return tuple(self._state.upstream_request_ids)

    @property
    def accounts_received(self) -> int:
        return self._state.accounts_received

    @property
    def attempts(self) -> int:
        return self._state.attempts

    def __aiter__(self) -> AsyncIterator[SharedAccount]:
        if self._iterated:
            raise RuntimeError("an AsyncShareListing can be iterated only once")
        self._iterated = True
        return self._accounts()

    async def _accounts(self) -> AsyncIterator[SharedAccount]:
        await self.start()
        first, self._first = self._first, None
        call = self._call
        try:
            if first is not None:
                for raw in first.accounts:
                    yield SharedAccount.from_proto(raw)
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    self._state.finished = True
                    return
                for account in self._state.take(msg):
                    yield account
        except grpc.aio.AioRpcError as exc:
            if self._state.cancelled:
                return
            raise self._state.interrupted(
                from_rpc_error(exc, attempts=self._state.attempts)
            ) from exc
        finally:
            # Cancelled task, `break` followed by aclose(), or an error: free the server.
            if not self._state.finished:
                self.cancel()

    async def collect(self) -> ShareList:
        """Read the whole listing into memory."""
        accounts = [account async for account in self]
        return self._state.share_list(accounts)

    def cancel(self) -> None:
        """Stop the stream; the server stops paging the upstream for it."""
        self._state.cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncShareListing:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._state.finished:
            self.cancel()


class AsyncShareWatch:
    """`ShareWatch` for asyncio: `async for change in watch`, same events and reconnection.

    Cancelling the task that iterates, leaving an `async with` block or `cancel()` ends it.
    """

    def __init__(
        self,
        stub: Any,
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
        return self._state.reconnects

    def __aiter__(self) -> AsyncIterator[ShareChange]:
        return self._changes()

    async def _changes(self) -> AsyncIterator[ShareChange]:
        failures = 0
        try:
            while not self._cancelled:
                call = self._stub.WatchImageShares(self._request, metadata=self._grpc_metadata)
                self._call = call
                try:
                    while (msg := await call.read()) is not grpc.aio.EOF:
                        failures = 0
                        change = self._state.apply(msg)
                        if change is not None:
                            yield change
                    error = ended_error()
                except grpc.aio.AioRpcError as exc:
                    if self._cancelled:
                        return
                    error = from_rpc_error(exc, attempts=failures + 1)
                failures += 1
                delay = reconnect_delay(error, failures, self._reconnect)
                if delay is None:
                    raise error
                if self._on_retry is not None:
                    self._on_retry(failures, error, delay)
                await asyncio.sleep(delay)
                self._state.reconnects += 1
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop watching; the server lets go of the stream."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncShareWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


class AsyncImageShareClient:
    """asyncio client for `imageshare.v1.ImageShareService`; create it inside the event loop
    that uses it, one per loop. Same defaults as `ImageShareClient`.
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
        opts = channel_options(service_config, options)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=opts)
        self._stub: Any = ImageShareServiceStub(self._channel)
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
    ) -> AsyncShareListing:
        """Accounts `image` in `region` is shared with, as a lazy `AsyncShareListing`."""
        return AsyncShareListing(
            self._stub,
            build_request(region, image, owner_account, page_size, bypass_cache),
            timeout=self.timeout if timeout is None else timeout,
            retry=self.retry,
            metadata=self._metadata,
            on_retry=self._on_retry,
        )

    async def check(
        self,
        region: str,
        image: str,
        account_id: str,
        *,
        owner_account: str = "",
        bypass_cache: bool = False,
        # A gRPC deadline sent to the server, which asyncio.timeout could not do.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ShareCheck:
        """Whether `account_id` may launch `image` (`CheckImageShare`); see the sync twin."""
        request = check_request(region, image, account_id, owner_account, bypass_cache)
        deadline = Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline.remaining()
            if remaining is not None and remaining <= 0:
                raise deadline.expired_error(attempt - 1)
            try:
                response = await self._stub.CheckImageShare(
                    request, timeout=remaining, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, attempts=attempt)
                delay = retry_delay(error, attempt, self.retry, deadline)
                if delay is None:
                    raise error from exc
                if self._on_retry is not None:
                    self._on_retry(attempt, error, delay)
                await asyncio.sleep(delay)
                continue
            return ShareCheck.from_proto(response)

    async def is_shared_with(
        self,
        region: str,
        image: str,
        account_id: str,
        *,
        owner_account: str = "",
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bool:
        """True when `account_id` may use the image: listed, or the image is public."""
        answer = await self.check(
            region, image, account_id, owner_account=owner_account, timeout=timeout
        )
        return answer.shared

    def watch(
        self,
        region: str,
        image: str,
        *,
        owner_account: str = "",
        reconnect: RetryPolicy | None = None,
    ) -> AsyncShareWatch:
        """The share list of `image` and every change to it, as a lazy `AsyncShareWatch`."""
        return AsyncShareWatch(
            self._stub,
            watch_request(region, image, owner_account),
            reconnect=reconnect if reconnect is not None else DEFAULT_RECONNECT,
            metadata=self._metadata,
            on_retry=self._on_retry,
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncImageShareClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
