"""Process entry point: wire settings, upstream client, service, health and metrics.

Start-up order matters: the gRPC port is bound and every servicer is added
before health says SERVING; on SIGTERM health flips to NOT_SERVING first, so
load balancers stop sending, then in-flight streams get the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from imageshare.v1 import image_share_pb2
from imageshare_server import __version__
from imageshare_server.cache import CachePolicy, ShareCache
from imageshare_server.config import (
    Settings,
    build_parser,
    config_table,
    settings_from,
    split_host_port,
)
from imageshare_server.ecs.client import EcsClient, SignatureVersion
from imageshare_server.ecs.credentials import (
    DEMO_ACCESS_KEY_ID,
    DEMO_ACCESS_KEY_SECRET,
    Credentials,
    CredentialsProvider,
    CredentialsUnavailable,
    StaticCredentialsProvider,
)
from imageshare_server.ecs.credentials_chain import default_credentials_provider
from imageshare_server.ecs.endpoints import EndpointResolver
from imageshare_server.ecs.retry import RetryBudget, RetryPolicy
from imageshare_server.flight import FlightOptions
from imageshare_server.healthcheck import DrainingHealthServicer
from imageshare_server.observability import metrics
from imageshare_server.observability.grpc_metrics import GrpcMetricsInterceptor
from imageshare_server.observability.logging import configure_logging, register_secret
from imageshare_server.ratelimit import UpstreamRateLimiter
from imageshare_server.replicas import setup as replicas
from imageshare_server.replicas.link import RedisLink
from imageshare_server.service import ImageShareService, add_to_server
from imageshare_server.source import SharedShareSource
from imageshare_server.tls import TlsConfigError, server_credentials

log = logging.getLogger("imageshare.server")

SERVICE_NAME = image_share_pb2.DESCRIPTOR.services_by_name["ImageShareService"].full_name
LIST_METHOD = f"/{SERVICE_NAME}/ListImageShares"
# Requests are a few hundred bytes; anything near this limit is abuse.
MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024
MAX_SEND_MESSAGE_BYTES = 4 * 1024 * 1024


class StartupError(Exception):
    """Configuration that cannot work; reported in one line, exit code 2."""


def grpc_address(listen: str) -> str:
    host, port = split_host_port(listen)
    if not host:
        host = "[::]"
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass
class Runtime:
    """Everything the running server owns, so shutdown can release it in order."""

    settings: Settings
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    http: httpx.AsyncClient
    grpc_port: int
    metrics_port: int | None = None
    closers: list[Any] = field(default_factory=list)


async def _credentials(settings: Settings, closers: list[Any]) -> CredentialsProvider:
    """The official default chain; resolved once at start so a misconfiguration fails fast."""
    if settings.emulator:
        return StaticCredentialsProvider(Credentials(DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET))
    provider = default_credentials_provider(on_secret=register_secret)
    closers.append(provider.aclose)
    try:
        await provider.get()
    except CredentialsUnavailable as exc:
        raise StartupError(
            f"no upstream credentials: {exc} (set ALIBABA_CLOUD_ACCESS_KEY_ID and "
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET, use RRSA, or run with --emulator)"
        ) from None
    log.info(
        "upstream credentials resolved",
        extra={"event": "credentials", "source": provider.describe()},
    )
    return provider


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind the gRPC port: TLS (mTLS with a client CA) when a certificate is configured."""
    if not settings.tls_cert:
        port: int = server.add_insecure_port(grpc_address(settings.listen))
        return port
    try:
        credentials, _ = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
    except TlsConfigError as exc:
        raise StartupError(f"TLS: {exc}") from None
    port = server.add_secure_port(grpc_address(settings.listen), credentials)
    return port


def _start_emulator(settings: Settings, closers: list[Any]) -> Settings:
    if not settings.emulator:
        return settings
    if settings.upstream_endpoint:
        raise StartupError("--emulator and --upstream-endpoint exclude each other")
    # Imported here: a production process never loads the emulator.
    from imageshare_server.emulator import Emulator  # noqa: PLC0415

    emulator = Emulator(
        host="127.0.0.1", port=0, credentials={DEMO_ACCESS_KEY_ID: DEMO_ACCESS_KEY_SECRET}
    )
    emulator.start()
    closers.append(emulator.stop)
    log.info("embedded ECS emulator started", extra={"event": "emulator", "url": emulator.url})
    return replace(settings, upstream_endpoint=emulator.url)


def build_source(
    settings: Settings,
    http: httpx.AsyncClient,
    credentials: CredentialsProvider,
    endpoints: EndpointResolver,
    redis: RedisLink | None = None,
) -> SharedShareSource:
    """The upstream client with its protections, behind the cache and single-flight.

    With ``redis`` the rate limit, the cache (as L2) and single-flight are
    shared by every replica, each falling back to the in-process one.
    """
    signature: SignatureVersion = "v1" if settings.signature_version == "v1" else "v3"
    local_limiter = UpstreamRateLimiter(settings.upstream_qps, settings.upstream_burst)
    client = EcsClient(
        http,
        credentials,
        endpoints,
        signature_version=signature,
        read_timeout=settings.read_timeout,
        retry=RetryPolicy(max_attempts=settings.upstream_max_attempts),
        retry_gate=RetryBudget(settings.retry_budget_tokens, settings.retry_budget_ratio),
        limiter=local_limiter
        if redis is None
        else replicas.limiter(settings, redis, credentials, local_limiter),
    )
    cache = ShareCache(
        CachePolicy(
            ttl=settings.cache_ttl,
            stale_while_revalidate=settings.cache_stale_while_revalidate,
            stale_if_error=settings.cache_stale_if_error,
            negative_ttl=settings.cache_negative_ttl,
            max_entries=settings.cache_max_entries,
            max_bytes=settings.cache_max_bytes,
        )
    )
    options = FlightOptions(
        page_size=settings.upstream_page_size,
        max_parallel_pages=settings.upstream_parallel_pages,
    )
    return SharedShareSource(
        client,
        cache,
        options,
        max_parallel_pages_total=settings.upstream_max_in_flight,
        shared=None if redis is None else replicas.tier(settings, redis, cache.policy),
    )


async def start(settings: Settings) -> Runtime:
    """Bind, wire and start everything; returns once health says SERVING."""
    closers: list[Any] = []
    settings = _start_emulator(settings, closers)
    credentials = await _credentials(settings, closers)
    endpoints = EndpointResolver(settings.upstream_endpoint or None, vpc=settings.upstream_vpc)
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        follow_redirects=False,
        # Proxy variables must not reroute signed requests behind the operator's back.
        trust_env=False,
        headers={"user-agent": f"imageshare/{__version__}"},
    )
    redis = replicas.connect(settings, closers)
    source = build_source(settings, http, credentials, endpoints, redis)

    interceptor = GrpcMetricsInterceptor()
    interceptor.initialize(LIST_METHOD, "server_stream")
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    # The concurrency limit lives in the service, not in grpc's
    # maximum_concurrent_rpcs, so that health checks never count against it.
    add_to_server(ImageShareService(source, max_concurrent=settings.max_concurrent_rpcs), server)
    health_servicer = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    grpc_port = _bind(server, settings)
    await server.start()
    health_port: int | None = None
    if settings.health_listen:
        # Kubelet gRPC probes cannot speak TLS: a plaintext port with health only.
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(grpc_address(settings.health_listen))
        await health_server.start()
        closers.append(lambda: health_server.stop(0))

    runtime = Runtime(settings, server, health_servicer, http, grpc_port, closers=closers)
    if settings.metrics_listen:
        host, port = split_host_port(settings.metrics_listen)
        loop = asyncio.get_running_loop()
        metrics.ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))
        metrics_server, _ = start_http_server(port, addr=host or "0.0.0.0")
        runtime.metrics_port = metrics_server.server_port
        closers.append(metrics_server.shutdown)

    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        extra={
            "event": "serving",
            "grpc_port": runtime.grpc_port,
            "metrics_port": runtime.metrics_port,
            "health_port": health_port,
            "upstream": "emulator"
            if settings.emulator
            else settings.upstream_endpoint or "official",
            "signature_version": settings.signature_version,
            "tls": "mtls" if settings.tls_client_ca else "tls" if settings.tls_cert else "off",
            "version": __version__,
        },
    )
    return runtime


async def shutdown(runtime: Runtime, stop_now: asyncio.Event) -> None:
    """Drain: NOT_SERVING, refuse new RPCs, give in-flight ones the grace period."""
    await runtime.health.enter_graceful_shutdown()
    log.info("draining", extra={"event": "draining", "grace_period": runtime.settings.grace_period})
    stop = asyncio.ensure_future(runtime.server.stop(runtime.settings.grace_period))
    forced = asyncio.ensure_future(stop_now.wait())
    await asyncio.wait({stop, forced}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.done():
        log.warning("second signal: cancelling in-flight RPCs", extra={"event": "forced_stop"})
        await runtime.server.stop(0)
        await stop
    forced.cancel()
    await runtime.http.aclose()
    for close in reversed(runtime.closers):
        result = close()
        if inspect.isawaitable(result):
            await result
    log.info("stopped", extra={"event": "stopped"})


async def serve(settings: Settings) -> None:
    # Handlers first: a SIGTERM that arrives while starting must drain, not kill.
    loop = asyncio.get_running_loop()
    first, second = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (second if first.is_set() else first).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    runtime = await start(settings)
    await first.wait()
    await shutdown(runtime, second)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_config_table:
        sys.stdout.write(config_table())
        return 0
    try:
        settings = settings_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        log.critical(str(exc), extra={"event": "startup_failed"})
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
