"""The AccessKeys the emulator accepts, permanent or temporary (STS)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

# The public demo AccessKey: what `make run` and the tests sign with. It opens nothing but
# this emulator, and lives only in this distribution, never in the server's.
DEMO_ACCESS_KEY_ID = "LTAI5tDemoAccessKeyId"
DEMO_ACCESS_KEY_SECRET = "DemoAccessKeySecretForTheEmulator"  # noqa: S105 - public demo value


@dataclass(frozen=True)
class StoredKey:
    access_key_id: str
    secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class CredentialStore:
    """Thread-safe key table; an STS stand-in issues temporary keys through ``add``."""

    def __init__(self, keys: Mapping[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, StoredKey] = {}
        for key_id, secret in (keys or {}).items():
            self.add(key_id, secret)

    def add(
        self,
        access_key_id: str,
        secret: str,
        security_token: str | None = None,
        expires_at: float | None = None,
    ) -> None:
        with self._lock:
            self._keys[access_key_id] = StoredKey(access_key_id, secret, security_token, expires_at)

    def remove(self, access_key_id: str) -> None:
        with self._lock:
            self._keys.pop(access_key_id, None)

    def lookup(self, access_key_id: str) -> StoredKey | None:
        with self._lock:
            return self._keys.get(access_key_id)

    def key_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)


def default_keys(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The official environment variables when set, else the public demo key."""
    env = os.environ if env is None else env
    key_id = env.get("ALIBABA_CLOUD_ACCESS_KEY_ID", "").strip()
    secret = env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "").strip()
    if key_id and secret:
        return {key_id: secret}
    return {DEMO_ACCESS_KEY_ID: DEMO_ACCESS_KEY_SECRET}


def now() -> float:
    return time.time()
