"""Credentials served over HTTP by a local agent (``ALIBABA_CLOUD_CREDENTIALS_URI``).

The document has the same shape as the ECS metadata service's role credentials.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from imageshare_server.core.errors import CredentialsUnavailable
from imageshare_server.credentials.imds import credentials_from_document
from imageshare_server.credentials.refreshing import ExpiringCredentials

URI_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


@dataclass(frozen=True)
class CredentialsUriFetcher:
    http: httpx.AsyncClient
    uri: str

    async def __call__(self) -> ExpiringCredentials:
        response = await self.http.get(self.uri, timeout=URI_TIMEOUT)
        if response.status_code != 200:
            raise CredentialsUnavailable(f"credentials URI answered HTTP {response.status_code}")
        return credentials_from_document(response.text, "credentials URI")
