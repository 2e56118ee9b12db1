"""Credentials of the ECS instance RAM role, from the metadata service (IMDSv2 only).

IMDSv2 first obtains a session token with a ``PUT`` (which a server-side request
forgery through a GET cannot do), then presents it on every read. Unlike the official
SDK this client never falls back to unauthenticated IMDSv1 reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import httpx

from imageshare_server.core.errors import CredentialsUnavailable
from imageshare_server.credentials.refreshing import ExpiringCredentials
from imageshare_server.credentials.sts import expiring_credentials

DEFAULT_METADATA_ENDPOINT = "http://100.100.100.200"
TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path
ROLE_PATH = "/latest/meta-data/ram/security-credentials/"
TOKEN_TTL_SECONDS = 21600
# The metadata service answers in milliseconds; a slow answer means "not on ECS".
IMDS_TIMEOUT = httpx.Timeout(1.0)
_ROLE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def metadata_endpoint(env: Mapping[str, str], override: str | None = None) -> str:
    """Base URL of the metadata service; overridable so tests never reach 100.100.100.200."""
    value = (override or env.get("ALIBABA_CLOUD_ECS_METADATA_ENDPOINT", "")).strip()
    if not value:
        return DEFAULT_METADATA_ENDPOINT
    return value.rstrip("/") if "://" in value else f"http://{value.rstrip('/')}"


def credentials_from_document(text: str, source: str) -> ExpiringCredentials:
    """Parse the JSON document that the metadata service and credentials URIs both serve."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise CredentialsUnavailable(f"{source}: response is not JSON") from None
    if not isinstance(doc, dict) or doc.get("Code") != "Success":
        code = doc.get("Code") if isinstance(doc, dict) else None
        raise CredentialsUnavailable(f"{source}: Code is {code!r}, not 'Success'")
    return expiring_credentials(doc, source)


class EcsRamRoleFetcher:
    """Fetches the instance role's credentials; the role name is discovered when not given."""

    def __init__(
        self, http: httpx.AsyncClient, *, endpoint: str, role_name: str | None = None
    ) -> None:
        self._http = http
        self._endpoint = endpoint
        self._role_name = role_name or None

    async def _token(self) -> str:
        response = await self._http.put(
            f"{self._endpoint}{TOKEN_PATH}",
            headers={"X-aliyun-ecs-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
            timeout=IMDS_TIMEOUT,
        )
        if response.status_code != 200 or not response.text:
            raise CredentialsUnavailable(
                f"ECS metadata: token request failed with HTTP {response.status_code}"
            )
        return response.text

    async def _read(self, path: str, token: str) -> str:
        response = await self._http.get(
            f"{self._endpoint}{path}",
            headers={"X-aliyun-ecs-metadata-token": token},
            timeout=IMDS_TIMEOUT,
        )
        if response.status_code != 200:
            raise CredentialsUnavailable(
                f"ECS metadata: {path} answered HTTP {response.status_code}"
            )
        return response.text

    async def __call__(self) -> ExpiringCredentials:
        token = await self._token()
        role = self._role_name
        if role is None:
            listing = (await self._read(ROLE_PATH, token)).split()
            if not listing:
                raise CredentialsUnavailable("ECS metadata: the instance has no RAM role attached")
            role = listing[0]
        if not _ROLE_NAME.match(role):
            raise CredentialsUnavailable(f"ECS metadata: invalid RAM role name {role!r}")
        return credentials_from_document(await self._read(ROLE_PATH + role, token), "ECS metadata")
