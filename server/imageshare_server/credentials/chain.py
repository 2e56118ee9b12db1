"""The official default credentials chain of the Alibaba Cloud SDKs.

Sources, in the SDK's order:

1. ``ALIBABA_CLOUD_ACCESS_KEY_ID``/``_SECRET`` (+ ``ALIBABA_CLOUD_SECURITY_TOKEN``);
2. RRSA/OIDC: ``ALIBABA_CLOUD_ROLE_ARN``, ``ALIBABA_CLOUD_OIDC_PROVIDER_ARN`` and
   ``ALIBABA_CLOUD_OIDC_TOKEN_FILE`` → STS ``AssumeRoleWithOIDC``;
3. the ``aliyun`` CLI profile in ``~/.aliyun/config.json``;
4. the SDK credentials file (``ALIBABA_CLOUD_CREDENTIALS_FILE`` or
   ``~/.alibabacloud/credentials.ini``);
5. the ECS instance RAM role (IMDSv2), unless ``ALIBABA_CLOUD_ECS_METADATA_DISABLED=true``;
6. ``ALIBABA_CLOUD_CREDENTIALS_URI``.

Which sources are *candidates* is decided when the chain is built, from configuration
alone (variables set, files present), without network traffic. The first ``get()`` then
tries the candidates in order and pins the first that delivers, as the SDK does with
``reuse_last_provider``: the instance role and the credentials URI can only be told
apart from a failure by asking. After that, every ``get()`` goes to the pinned source.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from imageshare_server.core.credentials import Credentials, CredentialsProvider
from imageshare_server.core.errors import CredentialsUnavailable
from imageshare_server.credentials._base import StaticCredentialsProvider, credentials_from_env
from imageshare_server.credentials.imds import EcsRamRoleFetcher, metadata_endpoint
from imageshare_server.credentials.oidc import OidcRoleArnFetcher, default_session_name
from imageshare_server.credentials.profiles import (
    EcsRamRoleSpec,
    OidcSpec,
    ProfileSpec,
    RamRoleArnSpec,
    StaticSpec,
    cli_profile_spec,
    ini_profile_spec,
)
from imageshare_server.credentials.refreshing import (
    REFRESH_MARGIN_SECONDS,
    Clock,
    ExpiringCredentials,
    Fetch,
    RefreshingCredentialsProvider,
    error_text,
)
from imageshare_server.credentials.sts import assume_role, sts_endpoint
from imageshare_server.credentials.uri import CredentialsUriFetcher


class NamedProvider:
    """A provider with a name for the start-up log line; never shows the secret."""

    def __init__(self, name: str, inner: CredentialsProvider) -> None:
        self.name = name
        self._inner = inner

    def describe(self) -> str:
        return self.name

    async def get(self) -> Credentials:
        return await self._inner.get()

    async def settle(self) -> None:
        if isinstance(self._inner, RefreshingCredentialsProvider):
            await self._inner.settle()

    async def aclose(self) -> None:
        if isinstance(self._inner, RefreshingCredentialsProvider):
            await self._inner.aclose()


class _Builder:
    """Turns profile specs into providers that share one HTTP client and clock."""

    def __init__(
        self,
        env: Mapping[str, str],
        http: httpx.AsyncClient,
        *,
        clock: Clock,
        metadata: str | None,
        refresh_margin: float,
        on_secret: SecretSink,
    ) -> None:
        self.on_secret = on_secret
        self.env = env
        self.http = http
        self.clock = clock
        self.metadata = metadata
        self.refresh_margin = refresh_margin

    def refreshing(self, name: str, fetch: Fetch) -> RefreshingCredentialsProvider:
        return RefreshingCredentialsProvider(
            fetch,
            name=name,
            refresh_margin=self.refresh_margin,
            clock=self.clock,
        )

    def from_spec(self, source: str, spec: ProfileSpec) -> NamedProvider:
        if isinstance(spec, StaticSpec):
            creds = Credentials(spec.access_key_id, spec.access_key_secret, spec.security_token)
            kind = "sts_token" if spec.security_token else "access_key"
            return NamedProvider(f"{source}/{kind}", StaticCredentialsProvider(creds))
        if isinstance(spec, OidcSpec):
            name = f"{source}/oidc_role_arn"
            return NamedProvider(name, self.refreshing(name, self.oidc(spec)))
        if isinstance(spec, EcsRamRoleSpec):
            name = f"{source}/ecs_ram_role"
            return NamedProvider(name, self.refreshing(name, self.ecs_ram_role(spec.role_name)))
        name = f"{source}/ram_role_arn"
        return NamedProvider(name, self.refreshing(name, self.ram_role_arn(spec)))

    def oidc(self, spec: OidcSpec) -> OidcRoleArnFetcher:
        return OidcRoleArnFetcher(
            http=self.http,
            sts_endpoint=sts_endpoint(self.env, region=spec.sts_region, vpc=spec.vpc),
            role_arn=spec.role_arn,
            oidc_provider_arn=spec.oidc_provider_arn,
            token_file=Path(spec.token_file),
            role_session_name=spec.role_session_name or default_session_name(),
            duration_seconds=spec.duration_seconds,
            policy=spec.policy,
            on_token=self.on_secret,
        )

    def ecs_ram_role(self, role_name: str | None) -> EcsRamRoleFetcher:
        return EcsRamRoleFetcher(
            self.http,
            endpoint=metadata_endpoint(self.env, self.metadata),
            role_name=role_name or self.env.get("ALIBABA_CLOUD_ECS_METADATA") or None,
        )

    def ram_role_arn(self, spec: RamRoleArnSpec) -> Fetch:
        endpoint = sts_endpoint(self.env, region=spec.sts_region, vpc=spec.vpc)
        source = Credentials(spec.access_key_id, spec.access_key_secret)
        session = spec.role_session_name or default_session_name()

        async def fetch() -> ExpiringCredentials:
            return await assume_role(
                self.http,
                endpoint,
                credentials=source,
                role_arn=spec.role_arn,
                role_session_name=session,
                duration_seconds=spec.duration_seconds,
                policy=spec.policy,
                external_id=spec.external_id,
            )

        return fetch


Candidate = tuple[str, Callable[[], NamedProvider]]
SecretSink = Callable[[str], None]


def _ignore(_: str) -> None:
    return None


def _is_true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() == "true"


def _home(env: Mapping[str, str], home: Path | None) -> Path:
    if home is not None:
        return home
    return Path(env.get("HOME") or Path.home())


def _candidates(b: _Builder, home: Path) -> list[Candidate]:
    env = b.env
    found: list[Candidate] = []
    static = credentials_from_env(env)
    if static is not None:
        found.append(("env", lambda: NamedProvider("env", StaticCredentialsProvider(static))))

    oidc_vars = [
        env.get(k, "").strip()
        for k in (
            "ALIBABA_CLOUD_ROLE_ARN",
            "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
            "ALIBABA_CLOUD_OIDC_TOKEN_FILE",
        )
    ]
    if all(oidc_vars):
        role_arn, provider_arn, token_file = oidc_vars
        spec = OidcSpec(
            role_arn=role_arn,
            oidc_provider_arn=provider_arn,
            token_file=token_file,
            role_session_name=env.get("ALIBABA_CLOUD_ROLE_SESSION_NAME", "").strip() or None,
        )
        found.append(
            (
                "oidc_role_arn",
                lambda: NamedProvider("oidc_role_arn", b.refreshing("oidc_role_arn", b.oidc(spec))),
            )
        )

    profile_name = env.get("ALIBABA_CLOUD_PROFILE", "").strip() or None
    cli_file = home / ".aliyun" / "config.json"
    if not _is_true(env, "ALIBABA_CLOUD_CLI_PROFILE_DISABLED") and cli_file.is_file():
        found.append(
            (
                "cli_profile",
                lambda: b.from_spec("cli_profile", cli_profile_spec(cli_file, profile_name)),
            )
        )

    ini_file = Path(
        env.get("ALIBABA_CLOUD_CREDENTIALS_FILE", "").strip()
        or home / ".alibabacloud" / "credentials.ini"
    )
    if ini_file.is_file():
        found.append(
            (
                "profile",
                lambda: b.from_spec(
                    "profile", ini_profile_spec(ini_file, profile_name or "default")
                ),
            )
        )

    if not _is_true(env, "ALIBABA_CLOUD_ECS_METADATA_DISABLED"):
        found.append(
            (
                "ecs_ram_role",
                lambda: NamedProvider(
                    "ecs_ram_role", b.refreshing("ecs_ram_role", b.ecs_ram_role(None))
                ),
            )
        )

    uri = env.get("ALIBABA_CLOUD_CREDENTIALS_URI", "").strip()
    if uri:
        found.append(
            (
                "credentials_uri",
                lambda: NamedProvider(
                    "credentials_uri",
                    b.refreshing("credentials_uri", CredentialsUriFetcher(b.http, uri)),
                ),
            )
        )
    return found


class ChainCredentialsProvider:
    """The default chain: tries candidates on first use, then sticks to the one that worked.

    ``describe()`` names the source in use (``"pending: env, ecs_ram_role"`` before the
    first ``get()``). ``aclose()`` stops background refreshes and closes the HTTP client
    if the chain created it.
    """

    def __init__(
        self,
        candidates: list[Candidate],
        *,
        owned_http: httpx.AsyncClient | None = None,
        on_secret: SecretSink = _ignore,
    ) -> None:
        self._on_secret = on_secret
        self._last: Credentials | None = None
        self._candidates = candidates
        self._owned_http = owned_http
        self._chosen: NamedProvider | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def candidates(self) -> list[str]:
        return [name for name, _ in self._candidates]

    def describe(self) -> str:
        if self._chosen is not None:
            return self._chosen.describe()
        return "pending: " + (", ".join(self.candidates) or "no source configured")

    async def get(self) -> Credentials:
        chosen = self._chosen
        if chosen is None:
            async with self._lock:
                if self._chosen is None:
                    return self._seen(await self._choose())
                chosen = self._chosen
        return self._seen(await chosen.get())

    def _seen(self, credentials: Credentials) -> Credentials:
        """Hand every new secret to the log redactor before anything can log it."""
        if credentials is not self._last:
            self._last = credentials
            self._on_secret(credentials.access_key_secret)
            if credentials.security_token:
                self._on_secret(credentials.security_token)
        return credentials

    async def _choose(self) -> Credentials:
        errors: list[str] = []
        for name, build in self._candidates:
            provider: NamedProvider | None = None
            try:
                # Building may read a profile file: keep that off the event loop.
                provider = await asyncio.to_thread(build)
                credentials = await provider.get()
            except Exception as exc:
                errors.append(f"{name}: {error_text(exc)}")
                if provider is not None:
                    await provider.aclose()
                continue
            self._chosen = provider
            return credentials
        if not errors:
            raise CredentialsUnavailable("no credentials source is configured")
        raise CredentialsUnavailable(
            "no credentials source in the chain worked: " + "; ".join(errors)
        )

    async def settle(self) -> None:
        """Wait until no background refresh is in flight (for tests and orderly shutdown)."""
        if self._chosen is not None:
            await self._chosen.settle()

    @property
    def closed(self) -> bool:
        """True once ``aclose`` ran: no refresh runs and the owned HTTP client is closed."""
        return self._closed

    async def aclose(self) -> None:
        self._closed = True
        if self._chosen is not None:
            await self._chosen.aclose()
        if self._owned_http is not None:
            await self._owned_http.aclose()


def default_credentials_provider(
    env: Mapping[str, str] | None = None,
    *,
    http: httpx.AsyncClient | None = None,
    home: Path | None = None,
    metadata_endpoint: str | None = None,
    clock: Clock | None = None,
    refresh_margin: float = REFRESH_MARGIN_SECONDS,
    on_secret: SecretSink = _ignore,
) -> ChainCredentialsProvider:
    """Build the default chain from ``env`` (default ``os.environ``) without network I/O.

    ``http`` is used for STS, the metadata service and credentials URIs; when omitted
    the chain creates and owns one. ``metadata_endpoint`` (or the environment variable
    ``ALIBABA_CLOUD_ECS_METADATA_ENDPOINT``) replaces ``http://100.100.100.200``.
    ``on_secret`` receives every AccessKey secret, STS token and OIDC token the chain
    obtains, before they are used, so a log redactor can learn them.
    """
    env = os.environ if env is None else env
    owned = None
    if http is None:
        http = owned = httpx.AsyncClient()
    builder = _Builder(
        env,
        http,
        clock=clock or time.time,
        metadata=metadata_endpoint,
        refresh_margin=refresh_margin,
        on_secret=on_secret,
    )
    return ChainCredentialsProvider(
        _candidates(builder, _home(env, home)), owned_http=owned, on_secret=on_secret
    )
