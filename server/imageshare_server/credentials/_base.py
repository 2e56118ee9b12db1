"""The simplest providers: fixed credentials, and the official environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping

from imageshare_server.core.credentials import Credentials


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
