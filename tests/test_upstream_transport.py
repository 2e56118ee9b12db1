"""The upstream's HTTP transport against a real HTTP/1.1 server on loopback (no mocks).

What the signed requests rely on is checked here: the URL exactly as signed, no cookie
kept, bounded waits, errors as httpx's.

The server is a few lines of asyncio in this process, so each test can make it do
what an upstream or a proxy in front of it may do: close an idle kept-alive
connection, never answer, cut a body short, send a large one, read slowly.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import pytest

from imageshare_server.upstream.transport import UpstreamTransport, upstream_http_client
from tests.support.waiting import until
from tests.support.x509 import Authority

BIG = 2 * 1024 * 1024


@dataclass
class Upstream:
    """A loopback HTTP/1.1 server; what it does depends on the request's path."""

    url: str = ""
    connections: int = 0
    targets: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    closed_idle: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                target = lines[0].split(" ")[1]
                path = target.split("?")[0]
                headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
                self.targets.append(target)
                self.headers.append(headers)
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if path == "/hang":
                    await self.release.wait()
                    return
                if path == "/truncated":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
                    await writer.drain()
                    return
                payload = {
                    "/big": b"b" * BIG,
                    "/length": str(len(body)).encode(),
                }.get(path, b"ok")
                cookie = b"Set-Cookie: session=upstream\r\n" if path == "/cookie" else b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n" % (cookie, len(payload))
                )
                writer.write(payload)
                await writer.drain()
                if path == "/close":
                    # Kept alive by the answer, then closed while idle (as servers and
                    # load balancers do after their own idle timeout).
                    writer.close()
                    self.closed_idle.set()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state.url = f"http://127.0.0.1:{port}"
    async with server:
        yield state
        state.release.set()


@pytest.fixture
def transport() -> UpstreamTransport:
    # Kept-alive connections expire after a minute: only the server's close ends them here.
    return UpstreamTransport(limits=httpx.Limits(keepalive_expiry=60))


def pooled_and_open(transport: UpstreamTransport) -> int:
    """Kept-alive connections aiohttp would reuse (it has no public view of its pool)."""
    session = transport._session
    assert session is not None
    assert isinstance(session.connector, aiohttp.BaseConnector)
    return sum(
        proto.is_connected() for conns in session.connector._conns.values() for proto, _ in conns
    )


@pytest.fixture
async def http(transport: UpstreamTransport) -> AsyncIterator[httpx.AsyncClient]:
    client = upstream_http_client(httpx.Timeout(5), user_agent="test", transport=transport)
    async with client:
        yield client


async def test_sequential_requests_reuse_one_connection(
    upstream: Upstream, http: httpx.AsyncClient
) -> None:
    for _ in range(5):
        response = await http.post(f"{upstream.url}/ok")
        assert response.content == b"ok"
    assert upstream.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(
    upstream: Upstream, transport: UpstreamTransport, http: httpx.AsyncClient
) -> None:
    """A kept-alive connection the server closed is never used again: reusing it would
    fail the next request ("Server disconnected")."""
    assert (await http.post(f"{upstream.url}/close")).content == b"ok"
    await upstream.closed_idle.wait()
    await until(lambda: pooled_and_open(transport) == 0, within=5)
    assert (await http.post(f"{upstream.url}/ok")).content == b"ok"
    assert upstream.connections == 2


async def test_the_url_goes_out_exactly_as_signed(
    upstream: Upstream, http: httpx.AsyncClient
) -> None:
    """Signatures cover the query string as encoded: nothing may re-quote it."""
    query = "?Signature=a%2Bb%2Fc%3D&Name=%7Etilde%20space&Empty=&Z=%25"
    await http.post(f"{upstream.url}/ok{query}")
    assert upstream.targets == [f"/ok{query}"]


async def test_cookies_the_upstream_sets_are_never_sent_back(
    upstream: Upstream, http: httpx.AsyncClient
) -> None:
    await http.post(f"{upstream.url}/cookie")
    await http.post(f"{upstream.url}/ok")
    assert "cookie" not in upstream.headers[1]


async def test_concurrent_requests_each_get_a_connection_and_keep_it(
    upstream: Upstream, http: httpx.AsyncClient
) -> None:
    for _ in range(3):
        answers = await asyncio.gather(*(http.post(f"{upstream.url}/ok") for _ in range(8)))
        assert [a.content for a in answers] == [b"ok"] * 8
    assert 1 < upstream.connections <= 8


async def test_an_answer_that_never_comes_is_a_read_timeout(
    upstream: Upstream, http: httpx.AsyncClient
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await http.post(f"{upstream.url}/hang", timeout=httpx.Timeout(5, read=0.2))


async def test_a_body_cut_short_is_a_protocol_error(
    upstream: Upstream, http: httpx.AsyncClient
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post(f"{upstream.url}/truncated")
    # The connection it came on is not pooled: the next request gets a new one, whole.
    assert (await http.post(f"{upstream.url}/ok")).content == b"ok"
    assert upstream.connections == 2


async def test_nobody_listening_is_a_connect_error(http: httpx.AsyncClient) -> None:
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    with pytest.raises(httpx.ConnectError):
        await http.post(f"http://127.0.0.1:{port}/ok")


async def test_large_bodies_both_ways_arrive_whole(
    upstream: Upstream, http: httpx.AsyncClient
) -> None:
    """Past the buffers' high-water marks: reading pauses and resumes, writing waits."""
    big = await http.post(f"{upstream.url}/big")
    assert big.content == b"b" * BIG
    sent = await http.post(f"{upstream.url}/length", content=b"u" * (8 * 1024 * 1024))
    assert sent.content == str(8 * 1024 * 1024).encode()
    assert upstream.connections == 1


async def test_tls_is_verified_against_the_context_given(
    upstream: Upstream, tmp_path: Path
) -> None:
    ca = Authority.create("upstream-test-ca")
    issued = ca.issue("localhost", server=True)
    (tmp_path / "tls.crt").write_bytes(issued.cert_pem)
    (tmp_path / "tls.key").write_bytes(issued.key_pem)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cadata=ca.pem.decode())
    async with server:
        transport = UpstreamTransport(limits=httpx.Limits(), ssl_context=trusting)
        async with httpx.AsyncClient(transport=transport) as client:
            answer = await client.post(f"https://localhost:{port}/ok")
            assert answer.content == b"ok"
        # The default context (public CAs) refuses the test CA's certificate.
        async with httpx.AsyncClient(transport=UpstreamTransport(limits=httpx.Limits())) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.post(f"https://localhost:{port}/ok")
