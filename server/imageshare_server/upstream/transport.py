"""The upstream's HTTP client: httpx's client API on aiohttp's connection pool.

httpx stays the client the upstream code talks to (requests, timeouts, streaming,
one exception hierarchy); underneath, ``UpstreamTransport`` sends each request with
aiohttp, whose HTTP parser is compiled and whose pool lives on the event loop.
httpx's own transport (httpcore, h11, and anyio under asyncio) cost about 1.4 ms of
CPU per request here, three times what this one costs through the same httpx client:
a cold read of a large list sends its pages at once, and that CPU was most of the
server's share of the read's time.

What the transport guarantees the signed requests: the URL goes out exactly as
signed (no re-quoting), no proxy from the environment, no cookie kept or sent, no
redirect followed, and the body handed to httpx undecoded (httpx decodes it, and
the client caps its size as it arrives). aiohttp's errors are raised as httpx's.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import ssl
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx
import yarl

# What UpstreamTransport takes from httpx.Limits: max_connections and keepalive_expiry.
# aiohttp's pool has no cap of its own on idle connections (max_keepalive_connections):
# idle connections count against max_connections and close after keepalive_expiry.
DEFAULT_LIMITS = httpx.Limits(max_connections=200)

# aiohttp's errors as httpx's, most specific first (what httpx's own transport raises).
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (TimeoutError, httpx.TimeoutException),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.NetworkError),
)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        for source, target in _ERRORS:
            if isinstance(exc, source):
                raise target(str(exc) or type(exc).__name__) from exc
        raise  # pragma: no cover - the last entry catches every ClientError


class _ResponseStream(httpx.AsyncByteStream):
    """The body as it arrives; closing it early closes the connection instead of pooling it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class UpstreamTransport(httpx.AsyncBaseTransport):
    """httpx's transport for the upstream, on one aiohttp session (HTTP/1.1, pooled).

    The session is made on first use, on the running event loop. Of ``limits`` it
    honours ``max_connections`` and ``keepalive_expiry`` (see ``DEFAULT_LIMITS``).
    """

    def __init__(self, *, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self._limits = limits
        # The same trust store as httpx's own transport (certifi), unless told otherwise.
        self._ssl = ssl_context or httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections or 0,  # httpx's None and aiohttp's 0: no limit
            keepalive_timeout=self._limits.keepalive_expiry,  # None, in both: no expiry
            ssl=self._ssl,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeouts = request.extensions.get("timeout", {})
        body = request.content or None
        with _as_httpx_errors():
            response = await session.request(
                request.method,
                yarl.URL(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeouts.get("pool"),
                    sock_connect=timeouts.get("connect"),
                    sock_read=timeouts.get("read"),
                ),
            )
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Accept no cookie: a signed request carries what was signed, and nothing the upstream set."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


def upstream_http_client(
    timeout: httpx.Timeout,
    *,
    user_agent: str,
    transport: UpstreamTransport | None = None,
) -> httpx.AsyncClient:
    """The client the server sends the upstream its signed requests with.

    No redirect followed, no proxy taken from the environment (proxy variables must not
    reroute signed requests behind the operator's back), no cookie kept. ``transport``
    defaults to an ``UpstreamTransport`` with ``DEFAULT_LIMITS``.
    """
    return httpx.AsyncClient(
        transport=transport or UpstreamTransport(limits=DEFAULT_LIMITS),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
        headers={"user-agent": user_agent},
    )
