"""RRSA: trade the pod's projected OIDC token for STS credentials of a RAM role.

The kubelet rotates the token file, so it is read again on every exchange; a token
cached from start-up would be rejected once it expires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from imageshare_server.core.errors import CredentialsUnavailable
from imageshare_server.credentials.refreshing import ExpiringCredentials
from imageshare_server.credentials.sts import DEFAULT_DURATION_SECONDS, assume_role_with_oidc

ACK_TOKEN_FILE = "/var/run/secrets/ack.alibabacloud.com/rrsa-tokens/token"  # noqa: S105 - a path


def default_session_name() -> str:
    return f"imageshare-{int(time.time())}"


@dataclass(frozen=True)
class OidcRoleArnFetcher:
    http: httpx.AsyncClient
    sts_endpoint: str
    role_arn: str
    oidc_provider_arn: str
    token_file: Path
    role_session_name: str
    duration_seconds: int = DEFAULT_DURATION_SECONDS
    policy: str | None = None
    on_token: Callable[[str], None] | None = None

    async def _read_token(self) -> str:
        try:
            token = await asyncio.to_thread(self.token_file.read_text, encoding="utf-8")
        except OSError as exc:
            raise CredentialsUnavailable(
                f"OIDC token file {str(self.token_file)!r} is unreadable: {exc.strerror}"
            ) from None
        token = token.strip()
        if not token:
            raise CredentialsUnavailable(f"OIDC token file {str(self.token_file)!r} is empty")
        if self.on_token is not None:
            self.on_token(token)
        return token

    async def __call__(self) -> ExpiringCredentials:
        return await assume_role_with_oidc(
            self.http,
            self.sts_endpoint,
            role_arn=self.role_arn,
            oidc_provider_arn=self.oidc_provider_arn,
            oidc_token=await self._read_token(),
            role_session_name=self.role_session_name,
            duration_seconds=self.duration_seconds,
            policy=self.policy,
        )
