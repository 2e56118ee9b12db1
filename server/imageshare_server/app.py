"""Process entry point: wire settings, upstream client, service, health and metrics.

Start-up order matters: the gRPC port is bound and every servicer is added
before health says SERVING; on SIGTERM health flips to NOT_SERVING first, so
load balancers stop sending, every watch ends at once with UNAVAILABLE (its
caller reconnects to another replica), then in-flight listings and checks get
the grace period. SIGUSR1 dumps every thread's and every task's stack to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc
import httpx
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, CollectorRegistry

from imageshare_server import __version__
from imageshare_server.cache import CachePolicy, ShareCache
from imageshare_server.config import (
    Settings,
    build_parser,
    config_table,
    effective_config,
    settings_from,
    split_host_port,
)
from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.credentials import (
    Credentials,
    CredentialsProvider,
    CredentialsUnavailable,
    StaticCredentialsProvider,
    default_credentials_provider,
)
from imageshare_server.grpcapi.health import DrainingHealthServicer
from imageshare_server.grpcapi.reflection import enable_reflection
from imageshare_server.grpcapi.service import (
    METHODS,
    SERVICE_NAME,
    ImageShareService,
    add_to_server,
)
from imageshare_server.grpcapi.tls import TlsConfigError, server_credentials
from imageshare_server.listing.flight import FlightOptions
from imageshare_server.listing.source import SharedShareSource
from imageshare_server.observability.grpc_metrics import GrpcMetricsInterceptor
from imageshare_server.observability.http import MetricsServer
from imageshare_server.observability.logging import configure_logging
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.observability.stacks import install_stack_dump
from imageshare_server.observability.tracing import NO_TRACING, Tracer, TracingConfigError
from imageshare_server.observability.tracing_setup import configure_tracing
from imageshare_server.ratelimit import UpstreamRateLimiter
from imageshare_server.redaction import register_secret
from imageshare_server.redis_tier import setup as redis_tier
from imageshare_server.redis_tier.link import RedisLink
from imageshare_server.upstream.client import EcsClient, SignatureVersion
from imageshare_server.upstream.endpoints import EndpointResolver
from imageshare_server.upstream.retry import RetryBudget, RetryPolicy
from imageshare_server.upstream.transport import upstream_http_client
from imageshare_server.watch.hub import WatchHub

log = logging.getLogger("imageshare.server")

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
    """Everything the running server owns; ``stack`` releases it in reverse order."""

    settings: Settings
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    service: ImageShareService
    source: SharedShareSource
    limiter: UpstreamRateLimiter
    watches: WatchHub
    stack: contextlib.AsyncExitStack
    grpc_port: int
    metrics_port: int | None = None
    health_port: int | None = None
    emulator_url: str | None = None


async def _credentials(settings: Settings, stack: contextlib.AsyncExitStack) -> CredentialsProvider:
    """The official default chain; resolved once at start so a misconfiguration fails fast."""
    provider = default_credentials_provider(on_secret=register_secret)
    stack.push_async_callback(provider.aclose)
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


def _check_free(listen: str) -> None:
    """Fail start-up in one line when the port is taken, before grpc logs its own error."""
    host, port = split_host_port(listen)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As grpc binds: connections of a server that just stopped on this port (TIME_WAIT)
        # do not make it busy; a socket listening on it still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind the gRPC port: TLS (mTLS with a client CA) when a certificate is configured."""
    address = grpc_address(settings.listen)
    _check_free(settings.listen)
    try:
        if not settings.tls_cert:
            return server.add_insecure_port(address)
        try:
            credentials, _ = server_credentials(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
        except TlsConfigError as exc:
            raise StartupError(f"TLS: {exc}") from None
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        # grpc says only "Failed to bind to address": in use, or not this host's.
        raise StartupError(
            f"cannot listen on {address} (in use, or not an address of this host): {exc}"
        ) from None


def _start_emulator(
    settings: Settings, stack: contextlib.AsyncExitStack
) -> tuple[Settings, CredentialsProvider]:
    """The embedded emulator as the upstream, with its demo credentials.

    The emulator is a distribution of its own (``imageshare-emulator``): the
    server's wheel and image do not carry it, or its demo AccessKey.
    """
    if settings.upstream_endpoint:
        raise StartupError("--emulator and --upstream-endpoint exclude each other")
    try:
        from imageshare_emulator import (  # noqa: PLC0415
            DEMO_ACCESS_KEY_ID,
            DEMO_ACCESS_KEY_SECRET,
            Emulator,
        )
    except ImportError:
        raise StartupError(
            "--emulator needs the imageshare-emulator package, which is not installed "
            "(pip install ./emulator from the source tree)"
        ) from None
    emulator = Emulator(
        host="127.0.0.1", port=0, credentials={DEMO_ACCESS_KEY_ID: DEMO_ACCESS_KEY_SECRET}
    )
    emulator.start()
    stack.callback(emulator.stop)
    log.info("embedded ECS emulator started", extra={"event": "emulator", "url": emulator.url})
    demo = StaticCredentialsProvider(Credentials(DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET))
    return replace(settings, upstream_endpoint=emulator.url), demo


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the gRPC server: message sizes, keepalive, per-connection limits."""
    options = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # One connection cannot take every call slot: streams beyond this are refused
        # (RST_STREAM) before they reach the service.
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # Count streams as HTTP/2 does. grpc's default also counts streams it has
        # not freed yet, and then refuses calls of clients that keep to the limit
        # (a burst of 200 on one channel lost a third with REFUSED_STREAM).
        ("grpc.http.overload_protection", 0),
    ]
    if settings.max_connection_age > 0:
        # GOAWAY after the age (grpc adds +-10% jitter), so long-lived callers
        # reconnect and new replicas get their share; in-flight calls get the grace.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
        ]
    return options


def build_source(
    settings: Settings,
    *,
    http: httpx.AsyncClient,
    credentials: CredentialsProvider,
    endpoints: EndpointResolver,
    limiter: UpstreamRateLimiter,
    redis: RedisLink | None,
    clock: Clock,
    metrics: ServiceMetrics,
    tracer: Tracer = NO_TRACING,
) -> SharedShareSource:
    """The upstream client with its protections, behind the cache and single-flight.

    With ``redis`` the rate limit, the cache (as L2) and single-flight are
    shared by every replica, each falling back to the in-process one.
    """
    signature: SignatureVersion = "v1" if settings.signature_version == "v1" else "v3"
    shared_limiter = None
    if redis is not None:
        shared_limiter = redis_tier.limiter(
            settings,
            redis,
            credentials,
            limiter,
            buckets=endpoints.bucket,
            clock=clock,
            metrics=metrics,
        )
    client = EcsClient(
        http,
        credentials,
        endpoints,
        signature_version=signature,
        read_timeout=settings.read_timeout,
        retry=RetryPolicy(max_attempts=settings.upstream_max_attempts),
        retry_gate=RetryBudget(
            settings.retry_budget_tokens,
            settings.retry_budget_ratio,
            refill_per_second=settings.retry_budget_refill,
            clock=clock,
        ),
        limiter=shared_limiter or limiter,
        max_in_flight=settings.upstream_max_in_flight,
        max_response_bytes=settings.upstream_max_response_bytes,
        clock=clock,
        metrics=metrics,
        tracer=tracer,
    )
    cache = ShareCache(
        CachePolicy(
            ttl=settings.cache_ttl,
            stale_while_revalidate=settings.cache_stale_while_revalidate,
            stale_if_error=settings.cache_stale_if_error,
            negative_ttl=settings.cache_negative_ttl,
            max_entries=settings.cache_max_entries,
            max_bytes=settings.cache_max_bytes,
        ),
        clock=clock,
        metrics=metrics,
    )
    options = FlightOptions(
        page_size=settings.upstream_page_size,
        max_parallel_pages=settings.upstream_parallel_pages,
        timeout=settings.listing_timeout,
        upstream_qps=settings.upstream_qps,
        upstream_burst=settings.upstream_burst,
    )
    shared = None
    if redis is not None:
        shared = redis_tier.tier(settings, redis, cache.policy, clock, metrics)
    return SharedShareSource(
        client,
        cache,
        options,
        shared=shared,
        max_orphan_reads=settings.max_orphan_reads,
        clock=clock,
        metrics=metrics,
        tracer=tracer,
    )


async def start(
    settings: Settings,
    *,
    registry: CollectorRegistry = REGISTRY,
    clock: Clock = SYSTEM_CLOCK,
    credentials: CredentialsProvider | None = None,
) -> Runtime:
    """Bind, wire and start everything; returns once health says SERVING.

    Whatever was started is stopped again if a later step fails. Every metric
    goes to ``registry``; tests pass a fresh one, and their own ``clock`` and
    ``credentials``.
    """
    stack = contextlib.AsyncExitStack()
    try:
        return await _start(settings, stack, registry, clock, credentials)
    except BaseException:
        await stack.aclose()
        raise


async def _start(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    registry: CollectorRegistry,
    clock: Clock,
    credentials: CredentialsProvider | None,
) -> Runtime:
    if settings.emulator:
        settings, demo = _start_emulator(settings, stack)
        credentials = credentials or demo
    if credentials is None:
        credentials = await _credentials(settings, stack)
    endpoints = EndpointResolver(
        settings.upstream_endpoint or None,
        vpc=settings.upstream_vpc,
        extra_regions=settings.extra_region_set,
    )
    http = upstream_http_client(
        httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
        user_agent=f"imageshare/{__version__}",
    )
    stack.push_async_callback(http.aclose)
    # Nothing reads the _created samples; they were a quarter of all series.
    # (Process-wide in prometheus_client, hence here and not at import.)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = ServiceMetrics(registry)
    tracer = _tracer(stack)
    redis = await redis_tier.connect(settings, stack, metrics, tracer)
    limiter = UpstreamRateLimiter(
        settings.upstream_qps,
        settings.upstream_burst,
        buckets=endpoints.bucket,
        clock=clock,
        metrics=metrics,
    )
    source = build_source(
        settings,
        http=http,
        credentials=credentials,
        endpoints=endpoints,
        limiter=limiter,
        redis=redis,
        clock=clock,
        metrics=metrics,
        tracer=tracer,
    )
    # Closed before the HTTP client and Redis (the stack runs backwards).
    stack.push_async_callback(source.aclose)

    watches = WatchHub(
        source,
        interval=settings.watch_interval,
        max_watchers=settings.max_watchers,
        clock=clock,
        metrics=metrics,
    )
    stack.push_async_callback(watches.aclose)
    interceptor = GrpcMetricsInterceptor(registry, tracer=tracer)
    for method, kind in METHODS.items():
        interceptor.initialize(method, kind)
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(settings))
    # The concurrency limit lives in the service, not in grpc's
    # maximum_concurrent_rpcs, so that health checks (and watches) never count against it.
    service = ImageShareService(
        source,
        watches=watches,
        max_concurrent=settings.max_concurrent_rpcs,
        stall_timeout=settings.stream_stall_timeout,
        clock=clock,
    )
    add_to_server(service, server)
    health_servicer = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    grpc_port = _bind(server, settings)
    await server.start()
    stack.push_async_callback(server.stop, 0)
    health_port: int | None = None
    if settings.health_listen:
        # Kubelet gRPC probes cannot speak TLS: a plaintext port with health only.
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(grpc_address(settings.health_listen))
        await health_server.start()
        stack.push_async_callback(health_server.stop, 0)

    runtime = Runtime(
        settings,
        server,
        health_servicer,
        service,
        source,
        limiter,
        watches,
        stack,
        grpc_port,
        health_port=health_port,
        emulator_url=settings.upstream_endpoint if settings.emulator else None,
    )
    if settings.metrics_listen:
        host, port = split_host_port(settings.metrics_listen)
        loop = asyncio.get_running_loop()
        metrics.asyncio_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
        metrics_server = MetricsServer(
            host or "0.0.0.0", port, registry, ready=lambda: health_servicer.serving
        )
        runtime.metrics_port = metrics_server.port
        stack.callback(metrics_server.shutdown)

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


def _tracer(stack: contextlib.AsyncExitStack) -> Tracer:
    """OpenTelemetry tracing when the OTEL_* variables ask for it; flushed at the end."""
    try:
        tracer = configure_tracing()
    except TracingConfigError as exc:
        raise StartupError(f"tracing: {exc}") from None
    if tracer.enabled:
        stack.callback(tracer.shutdown)
        log.info("tracing on", extra={"event": "tracing"})
    return tracer


async def shutdown(runtime: Runtime, stop_now: asyncio.Event | None = None) -> None:
    """Drain: NOT_SERVING, end every watch (UNAVAILABLE), refuse new RPCs, give in-flight
    listings and checks the grace period."""
    stop_now = stop_now or asyncio.Event()
    await runtime.health.enter_graceful_shutdown()
    watchers = runtime.watches.watchers
    runtime.watches.close()
    log.info(
        "draining",
        extra={
            "event": "draining",
            "grace_period": runtime.settings.grace_period,
            "watches_ended": watchers,
        },
    )
    stop = asyncio.ensure_future(runtime.server.stop(runtime.settings.grace_period))
    forced = asyncio.ensure_future(stop_now.wait())
    await asyncio.wait({stop, forced}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.done():
        log.warning("second signal: cancelling in-flight RPCs", extra={"event": "forced_stop"})
        await runtime.server.stop(0)
        await stop
    forced.cancel()
    await runtime.stack.aclose()
    log.info("stopped", extra={"event": "stopped"})


async def serve(settings: Settings) -> None:
    # Handlers first: a SIGTERM that arrives while starting must drain, not kill.
    loop = asyncio.get_running_loop()
    first, second = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (second if first.is_set() else first).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    install_stack_dump(loop)
    runtime = await start(settings)
    await first.wait()
    await shutdown(runtime, second)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 after a drain (or a printed answer), 2 when the server could not start.

    Every start-up failure (a bad flag, a port in use, unreadable TLS files, no
    credentials) is one JSON log line with ``"event": "startup_failed"``, no traceback.
    """
    configure_logging("info")
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            sys.stdout.write(f"imageshare-server {__version__}\n")
            return 0
        if args.print_config_table:
            sys.stdout.write(config_table())
            return 0
        settings = settings_from(args)
    except ValueError as exc:  # UsageError included: argparse's own complaints
        log.critical(str(exc), extra={"event": "startup_failed"})
        return 2
    if args.print_config:
        sys.stdout.write(json.dumps(effective_config(settings), indent=2) + "\n")
        return 0
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
