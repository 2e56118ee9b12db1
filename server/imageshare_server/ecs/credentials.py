"""Credentials the service signs upstream calls with.

The secret and the STS token are kept out of ``repr`` so that a credentials
object that ends up in a log line, a traceback or an error never shows them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

DEMO_ACCESS_KEY_ID = "LTAI5tDemoAccessKeyId"
DEMO_ACCESS_KEY_SECRET = "DemoAccessKeySecretForTheEmulator"  # noqa: S105 - public demo value


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)


class CredentialsUnavailable(Exception):
    """No provider in the chain could supply credentials."""


class CredentialsProvider(Protocol):
    async def get(self) -> Credentials:
        """Return current credentials, refreshing them when they are about to expire."""
        ...


class StaticCredentialsProvider:
    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def get(self) -> Credentials:
        return self._credentials


def credentials_from_env(env: Mapping[str, str] | None = None) -> Credentials | None:
    """AccessKey (and optional STS token) from the official environment variables."""
    env = os.environ if env is None else env
    key_id = env.get("ALIBABA_CLOUD_ACCESS_KEY_ID", "").strip()
    secret = env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "").strip()
    if not key_id or not secret:
        return None
    token = env.get("ALIBABA_CLOUD_SECURITY_TOKEN", "").strip() or None
    return Credentials(key_id, secret, token)
