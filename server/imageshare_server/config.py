"""All server settings in one typed place.

Every setting is a field of ``Settings``; its command-line flag
(``--cache-ttl``) and environment variable (``IMAGESHARE_CACHE_TTL``) are
derived from the field name, so the three can never drift apart. Flags win
over the environment, the environment over defaults. The README's
configuration table is generated from here (``imageshare-server --print-config-table``)
and a test keeps the two equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

from imageshare_server.core.rules import is_region_id

ENV_PREFIX = "IMAGESHARE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _opt(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A setting: its default, its help, and the bounds ``Settings`` checks it against."""
    metadata = {
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "above": above,
        "maximum": maximum,
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    listen: str = _opt(":50051", "gRPC listen address HOST:PORT (empty host: all interfaces).")
    metrics_listen: str = _opt(
        ":9464", "Prometheus /metrics listen address HOST:PORT; empty disables it."
    )
    upstream_endpoint: str = _opt(
        "",
        "Upstream URL for every region (the emulator, a private endpoint); empty: the official "
        "HTTPS endpoint of the request's region.",
    )
    upstream_vpc: bool = _opt(False, "Use the VPC endpoints ecs-vpc.<region>.aliyuncs.com.")
    signature_version: str = _opt(
        "v3", "Upstream signature: v3 (ACS3-HMAC-SHA256) or v1 (HMAC-SHA1).", choices=("v3", "v1")
    )
    emulator: bool = _opt(
        False, "Run the embedded ECS emulator (demo data, demo credentials) as the upstream."
    )
    cache_ttl: float = _opt(
        60.0, "Seconds a share list stays fresh in the cache; 0 disables it.", minimum=0
    )
    cache_stale_while_revalidate: float = _opt(
        30.0,
        "Seconds after the TTL a list is still served while one background refresh runs.",
        minimum=0,
    )
    cache_stale_if_error: float = _opt(
        600.0,
        "Seconds after the TTL a list is served when the upstream fails transiently.",
        minimum=0,
    )
    cache_negative_ttl: float = _opt(
        5.0, "Seconds a NotFound answer is cached; 0 disables it.", minimum=0
    )
    cache_max_entries: int = _opt(
        10_000, "Most share lists the in-process cache holds (LRU).", minimum=1
    )
    cache_max_bytes: int = _opt(
        64 * 1024 * 1024,
        "Approximate memory bound of the in-process cache, bytes (LRU).",
        minimum=1,
    )
    upstream_qps: float = _opt(
        20.0,
        "Upstream calls per second per region, for all callers together; 0: no limit.",
        minimum=0,
    )
    upstream_burst: int = _opt(
        20, "Upstream calls that may go at once before the QPS applies.", minimum=1
    )
    upstream_parallel_pages: int = _opt(
        10,
        "Pages of one share list read at the same time after page 1, when they do not all "
        "fit in --upstream-burst (those that do are read at once).",
        minimum=1,
    )
    upstream_max_in_flight: int = _opt(
        64,
        "Upstream HTTP requests under way at once, in all (rate-limit waits not included).",
        minimum=1,
    )
    upstream_max_response_bytes: int = _opt(
        4 * 1024 * 1024,
        "Largest upstream answer read, bytes; a larger one counts as malformed (UNAVAILABLE).",
        minimum=1024,
    )
    listing_timeout: float = _opt(
        30.0,
        "Seconds one complete upstream read of a share list may take: every page, retry and "
        "rate-limit wait.",
        above=0,
    )
    max_orphan_reads: int = _opt(
        8,
        "Upstream reads that may go on, to fill the cache, after every caller waiting for them "
        "has left (background refreshes included); beyond it they are cancelled.",
        minimum=0,
    )
    extra_regions: str = _opt(
        "",
        "Comma-separated region ids to give rate-limit buckets of their own, beyond the regions "
        "the service knows; other unknown regions share one bucket.",
    )
    retry_budget_tokens: float = _opt(
        20.0,
        "Retry budget size: each transient upstream failure takes a token, and retries stop "
        "while half or fewer are left (gRPC retryThrottling maxTokens).",
        minimum=1,
    )
    retry_budget_ratio: float = _opt(
        1.0,
        "Tokens each successful upstream attempt puts back (gRPC retryThrottling tokenRatio).",
        above=0,
    )
    retry_budget_refill: float = _opt(
        2.0,
        "Tokens the retry budget regains per second, on top of what successes put back.",
        minimum=0,
    )
    connect_timeout: float = _opt(5.0, "Upstream connect timeout, seconds.", above=0)
    read_timeout: float = _opt(10.0, "Upstream read timeout per attempt, seconds.", above=0)
    upstream_page_size: int = _opt(
        100, "PageSize of upstream calls (1-100).", minimum=1, maximum=100
    )
    upstream_max_attempts: int = _opt(
        4,
        "Upstream attempts per page in all (first try plus retries).",
        minimum=1,
    )
    max_concurrent_rpcs: int = _opt(
        1000, "Concurrent RPCs beyond which new calls get RESOURCE_EXHAUSTED at once.", minimum=1
    )
    watch_interval: float = _opt(
        60.0,
        "Seconds between two upstream reads of a watched image's share list (one read per "
        "image and interval, however many callers watch it).",
        minimum=1,
    )
    max_watchers: int = _opt(
        10_000,
        "Watches (WatchImageShares streams) open at once beyond which new ones get "
        "RESOURCE_EXHAUSTED; they do not count against --max-concurrent-rpcs.",
        minimum=1,
    )
    health_listen: str = _opt(
        "",
        "Extra plaintext HOST:PORT serving only grpc.health.v1, for kubelet probes when the "
        "gRPC port uses TLS; empty: none.",
    )
    max_connection_age: float = _opt(
        300.0,
        "Seconds after which a caller's connection is sent GOAWAY, so callers reconnect and "
        "spread over new replicas; 0: unlimited.",
        minimum=0,
    )
    max_connection_age_grace: float = _opt(
        30.0,
        "Seconds calls on a connection past its age may still take before it is closed.",
        minimum=0,
    )
    max_streams_per_connection: int = _opt(
        100,
        "Calls one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).",
        minimum=1,
    )
    stream_stall_timeout: float = _opt(
        30.0,
        "Seconds a stream may wait for its caller to read before it is ended with UNAVAILABLE "
        "and its slot freed.",
        above=0,
    )
    grace_period: float = _opt(
        20.0,
        "Seconds in-flight RPCs may take to finish after SIGTERM before they are cancelled.",
        above=0,
    )
    log_level: str = _opt(
        "info", "Log level.", choices=("debug", "info", "warning", "error", "critical")
    )
    tls_cert: str = _opt(
        "",
        "PEM certificate chain file for the gRPC listener; with --tls-key enables TLS. "
        "Re-read when the file changes.",
    )
    tls_key: str = _opt("", "PEM private key file for --tls-cert.")
    tls_client_ca: str = _opt(
        "",
        "PEM CA bundle file; when set, callers must present a client certificate it signed "
        "(mTLS). Needs --tls-cert.",
    )
    redis_url: str = _opt(
        "",
        "Shared Redis for the share-list cache, cross-replica single-flight and the upstream "
        "rate limit (redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS); empty: in-process.",
    )
    redis_timeout: float = _opt(
        0.25,
        "Seconds any Redis operation may take before the replica falls back to in-process.",
        above=0,
    )
    redis_lease_ttl: float = _opt(
        5.0,
        "Seconds a replica's read lease lives unless renewed; a dead reader's is taken over.",
        above=0,
    )
    redis_key_prefix: str = _opt(
        "imageshare:", "Prefix of every Redis key; give deployments sharing a Redis their own."
    )
    rate_limit_account: str = _opt(
        "",
        "Name of the Alibaba Cloud account whose quota the shared rate limit guards (one Redis "
        "bucket per account and region); empty: the AccessKey ID, or one bucket for all STS "
        "sessions.",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_bounds(f.name, getattr(self, f.name), f.metadata)
        for region in self.extra_region_set:
            if not is_region_id(region):
                raise ValueError(f"extra_regions: {region!r} is not a region id")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError("redis_url must start with redis:// or rediss://")

    @property
    def extra_region_set(self) -> frozenset[str]:
        return frozenset(r.strip() for r in self.extra_regions.split(",") if r.strip())


def _check_bounds(name: str, value: Any, metadata: Mapping[str, Any]) -> None:
    minimum, above, maximum = metadata["minimum"], metadata["above"], metadata["maximum"]
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}")
    if minimum is not None and value < minimum:
        raise ValueError(
            f"{name} must not be negative" if minimum == 0 else f"{name} must be at least {minimum}"
        )
    if above is not None and value <= above:
        raise ValueError(f"{name} must be positive")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _convert(kind: type, raw: str, env: str) -> Any:
    if kind is bool:
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ValueError(f"{env}: expected true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env}: expected {kind.__name__}, got {raw!r}") from None


_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


def _fields() -> list[tuple[dataclasses.Field[Any], type]]:
    return [(f, _TYPES[str(f.type)]) for f in dataclasses.fields(Settings)]


class UsageError(ValueError):
    """A flag or variable the settings cannot use; reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Not argparse's usage text on stderr: start-up failures are one JSON log line.
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="imageshare-server",
        description="gRPC service: who is a custom Alibaba Cloud ECS image shared with?",
    )
    for f, kind in _fields():
        # argparse formats help with %: a literal one in our text must be doubled.
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}, default {f.default!r}]"
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            parser.add_argument(
                flag_name(f.name),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(f.name),
                type=kind,
                default=None,
                choices=f.metadata["choices"],
                help=help_text,
            )
    parser.add_argument(
        "--print-config-table",
        action="store_true",
        help="Print the configuration table (Markdown) and exit.",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="Print the effective settings (flags over environment over defaults) as JSON, "
        "secrets redacted, and exit.",
    )
    parser.add_argument("--version", action="store_true", help="Print the version and exit.")
    return parser


def effective_config(settings: Settings) -> dict[str, Any]:
    """Every setting by flag name, as the server would use it; credentials in URLs redacted."""
    shown: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name == "redis_url" and value:
            parts = urlsplit(value)
            if parts.password:
                netloc = parts.netloc.replace(f":{parts.password}@", ":[redacted]@", 1)
                value = parts._replace(netloc=netloc).geturl()
        shown[f.name] = value
    return shown


def settings_from(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f, kind in _fields():
        flag_value = getattr(args, f.name)
        if flag_value is not None:
            values[f.name] = flag_value
        elif env_name(f.name) in env:
            values[f.name] = _convert(kind, env[env_name(f.name)], env_name(f.name))
            choices = f.metadata["choices"]
            if choices and values[f.name] not in choices:
                raise ValueError(f"{env_name(f.name)}: expected one of {', '.join(choices)}")
    return Settings(**values)


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    return settings_from(build_parser().parse_args(argv), env)


def config_table() -> str:
    """The README's configuration table."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f, kind in _fields():
        default = str(f.default).lower() if kind is bool else str(f.default)
        shown = f"`{default}`" if default else "(empty)"
        rows.append(
            f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | {shown} | {f.metadata['help']} |"
        )
    return "\n".join(rows) + "\n"


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` with an empty host meaning all interfaces; IPv6 in brackets."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)
