"""Calls to STS (Security Token Service): ``AssumeRoleWithOIDC`` and ``AssumeRole``.

Parameters travel in a form body, not in the query string as the official SDK puts
them: request URLs end up in HTTP client logs, and neither the OIDC token nor a
security token may. STS accepts both forms; the V1 signature covers form parameters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime

import httpx

from imageshare_server.core.credentials import Credentials
from imageshare_server.core.errors import CredentialsUnavailable
from imageshare_server.credentials.refreshing import ExpiringCredentials
from imageshare_server.redaction import redact
from imageshare_server.upstream.signing import sign_v1, utc_timestamp

STS_VERSION = "2015-04-01"
DEFAULT_DURATION_SECONDS = 3600
STS_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
_REGION = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def sts_endpoint(
    env: Mapping[str, str],
    *,
    region: str | None = None,
    vpc: bool | None = None,
) -> str:
    """Base URL of STS: ``ALIBABA_CLOUD_STS_ENDPOINT``, else the regional or central host.

    ``region``/``vpc`` come from a profile and win over the environment, like the SDK.
    The explicit endpoint may be a bare host (``https`` is implied) or a full URL.
    """
    explicit = env.get("ALIBABA_CLOUD_STS_ENDPOINT", "").strip()
    if explicit:
        return explicit.rstrip("/") if "://" in explicit else f"https://{explicit.rstrip('/')}"
    if vpc is None:
        vpc = env.get("ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED", "").strip().lower() == "true"
    region = region or env.get("ALIBABA_CLOUD_STS_REGION", "").strip()
    prefix = "sts-vpc" if vpc else "sts"
    if not region:
        return "https://sts.aliyuncs.com"
    if not _REGION.match(region):
        raise CredentialsUnavailable(f"invalid STS region {region!r}")
    return f"https://{prefix}.{region}.aliyuncs.com"


def parse_expiration(value: object, source: str) -> float:
    if not isinstance(value, str):
        raise CredentialsUnavailable(f"{source}: response has no Expiration")
    try:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise CredentialsUnavailable(f"{source}: unparseable Expiration {value!r}") from None
    return parsed.timestamp()


def expiring_credentials(fields: Mapping[str, object], source: str) -> ExpiringCredentials:
    """Temporary credentials from the shape STS, the metadata service and credential URIs share."""
    key_id, secret, token = (
        fields.get("AccessKeyId"),
        fields.get("AccessKeySecret"),
        fields.get("SecurityToken"),
    )
    if not (isinstance(key_id, str) and isinstance(secret, str) and isinstance(token, str)):
        raise CredentialsUnavailable(f"{source}: credentials are incomplete")
    return ExpiringCredentials(
        Credentials(key_id, secret, token), parse_expiration(fields.get("Expiration"), source)
    )


def _credentials_from(
    response: httpx.Response, action: str, hidden: list[str]
) -> ExpiringCredentials:
    source = f"STS {action}"
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise CredentialsUnavailable(f"{source}: HTTP {response.status_code}, body is not JSON")
    if response.status_code != 200:
        code = body.get("Code", "?")
        message = redact(str(body.get("Message", "")), also=hidden)
        request_id = body.get("RequestId", "?")
        raise CredentialsUnavailable(
            f"{source}: HTTP {response.status_code} {code}: {message} (RequestId {request_id})"
        )
    creds = body.get("Credentials")
    if not isinstance(creds, dict):
        raise CredentialsUnavailable(f"{source}: response has no Credentials")
    return expiring_credentials(creds, source)


async def assume_role_with_oidc(
    http: httpx.AsyncClient,
    endpoint: str,
    *,
    role_arn: str,
    oidc_provider_arn: str,
    oidc_token: str,
    role_session_name: str,
    duration_seconds: int = DEFAULT_DURATION_SECONDS,
    policy: str | None = None,
) -> ExpiringCredentials:
    """Exchange an OIDC token for STS credentials. The call is not signed: the token is
    the proof."""
    form = {
        "Action": "AssumeRoleWithOIDC",
        "Version": STS_VERSION,
        "Format": "JSON",
        "Timestamp": utc_timestamp(),
        "DurationSeconds": str(duration_seconds),
        "RoleArn": role_arn,
        "OIDCProviderArn": oidc_provider_arn,
        "OIDCToken": oidc_token,
        "RoleSessionName": role_session_name,
    }
    if policy:
        form["Policy"] = policy
    response = await http.post(f"{endpoint}/", data=form, timeout=STS_TIMEOUT)
    return _credentials_from(response, "AssumeRoleWithOIDC", [oidc_token])


async def assume_role(
    http: httpx.AsyncClient,
    endpoint: str,
    *,
    credentials: Credentials,
    role_arn: str,
    role_session_name: str,
    duration_seconds: int = DEFAULT_DURATION_SECONDS,
    policy: str | None = None,
    external_id: str | None = None,
) -> ExpiringCredentials:
    """Assume a RAM role with long-lived (or STS) credentials; V1-signed like the SDK."""
    params = {
        "DurationSeconds": str(duration_seconds),
        "RoleArn": role_arn,
        "RoleSessionName": role_session_name,
    }
    if policy:
        params["Policy"] = policy
    if external_id:
        params["ExternalId"] = external_id
    form = sign_v1(
        method="POST",
        action="AssumeRole",
        version=STS_VERSION,
        params=params,
        credentials=credentials,
    )
    response = await http.post(f"{endpoint}/", data=form, timeout=STS_TIMEOUT)
    hidden = [credentials.access_key_secret, credentials.security_token or ""]
    return _credentials_from(response, "AssumeRole", hidden)
