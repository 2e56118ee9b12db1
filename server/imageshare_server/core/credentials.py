"""Who the service is upstream: the credentials it signs with, and where it gets them.

The secret and the STS token are kept out of ``repr`` so that a credentials
object that ends up in a log line, a traceback or an error never shows them.
The providers themselves (the official default chain) live in
``imageshare_server.credentials``; the upstream client needs only this
protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)


class CredentialsProvider(Protocol):
    async def get(self) -> Credentials:
        """Return current credentials, refreshing them when they are about to expire."""
        ...
