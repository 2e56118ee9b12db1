"""Request signatures for the Alibaba Cloud OpenAPI (RPC style).

Two algorithms, both as the official SDKs produce them:

* ACS3-HMAC-SHA256 ("V3"), the SDK default: the signature covers the method,
  the canonical query string, every header sent (``host``, ``content-type``
  and all ``x-acs-*``) and the SHA-256 of the body.
* HMAC-SHA1 with ``SignatureVersion=1.0`` ("V1"; the SDK calls it "v2"): the
  signature covers every parameter, query and form alike.

The same canonicalisation functions serve the client that signs and the
emulator that verifies, so a bug cannot hide by being symmetric: the unit
tests pin both to the official vectors and to the official SDK's output.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from urllib.parse import quote

from imageshare_server.core.credentials import Credentials

V3_ALGORITHM = "ACS3-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def percent_encode(value: str) -> str:
    """RFC 3986 encoding as ECS expects it: only ``A-Z a-z 0-9 - _ . ~`` stay as they are."""
    return quote(value, safe="-_.~", encoding="utf-8")


def new_nonce() -> str:
    """A fresh nonce: every attempt, retries included, must use its own."""
    return secrets.token_hex(16)


def utc_timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """Encoded ``k=v`` pairs joined by ``&``; an empty value stays ``k=``.

    Pairs are sorted by their raw names, before encoding, as the official SDK sorts them: the
    two orders differ once a name holds a character that needs encoding.
    """
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params))


def canonical_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    signed_names: Collection[str] | None = None,
) -> tuple[str, str]:
    """Return (canonical headers, signed header names).

    A signer picks the headers V3 covers (``host``, ``content-type``, every ``x-acs-*``); a
    verifier passes ``signed_names`` from the ``Authorization`` header instead, because the
    official SDK signs every header it sends (``user-agent`` and ``accept`` included).
    Header names repeated with another case are merged as ``name:v1,v2`` with the values
    sorted, like the SDK does.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    wanted = None if signed_names is None else {n.lower().strip() for n in signed_names}
    merged: dict[str, list[str]] = {}
    for name, value in pairs:
        lname = name.lower().strip()
        if wanted is None:
            if not (lname in ("host", "content-type") or lname.startswith("x-acs-")):
                continue
        elif lname not in wanted:
            continue
        merged.setdefault(lname, []).append(value.strip())
    names = sorted(merged)
    text = "".join(f"{n}:{','.join(sorted(merged[n]))}\n" for n in names)
    return text, ";".join(names)


def v3_string_to_sign(
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    payload_hash: str,
    *,
    signed_names: Collection[str] | None = None,
) -> tuple[str, str]:
    """Return (string to sign, signed header names) for an ACS3-HMAC-SHA256 request."""
    header_text, signed = canonical_headers(headers, signed_names)
    canonical_request = "\n".join(
        [method.upper(), path, canonical_query(query.items()), header_text, signed, payload_hash]
    )
    digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    return f"{V3_ALGORITHM}\n{digest}", signed


def v3_signature(secret: str, string_to_sign: str) -> str:
    mac = hmac.new(secret.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256)
    return mac.hexdigest()


def sign_v3(
    *,
    method: str,
    host: str,
    action: str,
    version: str,
    query: Mapping[str, str],
    credentials: Credentials,
    body: bytes = b"",
    content_type: str | None = None,
    date: str | None = None,
    nonce: str | None = None,
    path: str = "/",
) -> dict[str, str]:
    """Return every header to send with a V3-signed request, ``Authorization`` included."""
    headers: dict[str, str] = {
        "host": host,
        "x-acs-action": action,
        "x-acs-version": version,
        "x-acs-date": date or utc_timestamp(),
        "x-acs-signature-nonce": nonce or new_nonce(),
        "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
    }
    if content_type:
        headers["content-type"] = content_type
    if credentials.security_token:
        headers["x-acs-security-token"] = credentials.security_token
    string_to_sign, signed = v3_string_to_sign(
        method, path, query, headers, headers["x-acs-content-sha256"]
    )
    signature = v3_signature(credentials.access_key_secret, string_to_sign)
    headers["Authorization"] = (
        f"{V3_ALGORITHM} Credential={credentials.access_key_id},"
        f"SignedHeaders={signed},Signature={signature}"
    )
    return headers


def v1_string_to_sign(method: str, params: Mapping[str, str]) -> str:
    """``METHOD&%2F&`` + the encoded canonical query of every parameter but ``Signature``."""
    query = canonical_query((k, v) for k, v in params.items() if k != "Signature")
    return f"{method.upper()}&%2F&{percent_encode(query)}"


def v1_signature(secret: str, string_to_sign: str) -> str:
    mac = hmac.new(f"{secret}&".encode(), string_to_sign.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def sign_v1(
    *,
    method: str,
    action: str,
    version: str,
    params: Mapping[str, str],
    credentials: Credentials,
    timestamp: str | None = None,
    nonce: str | None = None,
    response_format: str = "JSON",
) -> dict[str, str]:
    """Return the full parameter set, common parameters and ``Signature`` included."""
    signed: dict[str, str] = {
        **params,
        "Action": action,
        "Version": version,
        "Format": response_format,
        "AccessKeyId": credentials.access_key_id,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": nonce or new_nonce(),
        "Timestamp": timestamp or utc_timestamp(),
    }
    if credentials.security_token:
        signed["SecurityToken"] = credentials.security_token
    signed["Signature"] = v1_signature(
        credentials.access_key_secret, v1_string_to_sign(method, signed)
    )
    return signed
