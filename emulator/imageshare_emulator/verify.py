"""Signature verification, V3 (ACS3-HMAC-SHA256) and V1 (HMAC-SHA1), as ECS checks it.

Expected signatures come from :mod:`imageshare_server.upstream.signing`, the very functions the
client signs with; the test suite pins those to the official vectors and SDK, so a verifier
bug cannot hide behind a matching signer bug.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from imageshare_emulator import errors
from imageshare_emulator.credentials import CredentialStore, StoredKey
from imageshare_server.upstream import signing

MAX_SKEW_SECONDS = 15 * 60
NONCE_TTL_SECONDS = 15 * 60
V3_REQUIRED_HEADERS = (
    "host",
    "x-acs-action",
    "x-acs-version",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-content-sha256",
)
V1_REQUIRED_PARAMS = (
    "AccessKeyId",
    "Signature",
    "SignatureMethod",
    "SignatureVersion",
    "SignatureNonce",
    "Timestamp",
)

SignatureVersion = Literal["v3", "v1"]


@dataclass(frozen=True)
class IncomingRequest:
    """An API request as the verifier needs it; ``params`` merges query and form body."""

    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    @property
    def signature_version(self) -> SignatureVersion | None:
        auth = self.header("authorization")
        if auth is not None and auth.startswith(signing.V3_ALGORITHM):
            return "v3"
        if "Signature" in self.params or "SignatureMethod" in self.params:
            return "v1"
        return None

    @property
    def action(self) -> str | None:
        return self.header("x-acs-action") or self.params.get("Action")

    @property
    def version(self) -> str | None:
        return self.header("x-acs-version") or self.params.get("Version")

    @property
    def nonce(self) -> str | None:
        return self.header("x-acs-signature-nonce") or self.params.get("SignatureNonce")


@dataclass(frozen=True)
class Authenticated:
    access_key_id: str
    nonce: str
    signature_version: SignatureVersion


class NonceCache:
    """Nonces seen per AccessKey in the last 15 minutes."""

    def __init__(self, ttl: float = NONCE_TTL_SECONDS) -> None:
        self._ttl = ttl
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def use(self, access_key_id: str, nonce: str, now: float) -> bool:
        """Record the nonce; False when it was already used within the window."""
        with self._lock:
            while self._seen:
                key, seen_at = next(iter(self._seen.items()))
                if now - seen_at < self._ttl:
                    break
                del self._seen[key]
            if (access_key_id, nonce) in self._seen:
                return False
            self._seen[(access_key_id, nonce)] = now
            return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


def parse_timestamp(value: str) -> float:
    try:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise errors.ILLEGAL_TIMESTAMP from None
    return parsed.timestamp()


class Verifier:
    def __init__(
        self,
        store: CredentialStore,
        nonces: NonceCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.nonces = nonces or NonceCache()
        self._clock = clock

    def verify(self, request: IncomingRequest) -> Authenticated:
        version = request.signature_version
        if version == "v3":
            return self._verify_v3(request)
        if version == "v1":
            return self._verify_v1(request)
        raise errors.incomplete_signature("The request carries no signature.")

    def _key(self, access_key_id: str, token: str | None) -> StoredKey:
        stored = self.store.lookup(access_key_id)
        if stored is None:
            raise errors.ACCESS_KEY_NOT_FOUND
        if stored.expired(self._clock()):
            raise errors.TOKEN_EXPIRED if stored.security_token else errors.ACCESS_KEY_NOT_FOUND
        if (token or None) != stored.security_token:
            raise errors.TOKEN_MISMATCH
        return stored

    def _fresh(self, access_key_id: str, nonce: str, timestamp: str) -> None:
        now = self._clock()
        if abs(now - parse_timestamp(timestamp)) > MAX_SKEW_SECONDS:
            raise errors.TIMESTAMP_EXPIRED
        if not self.nonces.use(access_key_id, nonce, now):
            raise errors.NONCE_USED

    def _verify_v3(self, request: IncomingRequest) -> Authenticated:
        auth = request.header("authorization") or ""
        fields: dict[str, str] = {}
        for part in auth[len(signing.V3_ALGORITHM) :].split(","):
            name, sep, value = part.strip().partition("=")
            if sep:
                fields[name] = value
        credential = fields.get("Credential", "")
        signed_headers = fields.get("SignedHeaders", "")
        signature = fields.get("Signature", "")
        if not (credential and signed_headers and signature):
            raise errors.incomplete_signature(
                "Authorization needs Credential, SignedHeaders and Signature."
            )
        for name in V3_REQUIRED_HEADERS:
            if not request.header(name):
                raise errors.incomplete_signature(f"Header {name} is missing.")
        signed = {n.strip().lower() for n in signed_headers.split(";")}
        unsigned = [
            n
            for n in {k.lower() for k, _ in request.headers}
            if (n == "host" or n.startswith("x-acs-")) and n not in signed
        ]
        if unsigned:
            raise errors.incomplete_signature(f"Header {sorted(unsigned)[0]} must be signed.")
        content_sha256 = request.header("x-acs-content-sha256") or ""
        if content_sha256 != hashlib.sha256(request.body).hexdigest():
            raise errors.incomplete_signature("x-acs-content-sha256 does not match the body.")

        stored = self._key(credential, request.header("x-acs-security-token"))
        string_to_sign, _ = signing.v3_string_to_sign(
            request.method,
            request.path,
            request.query,
            request.headers,
            content_sha256,
            signed_names=signed,
        )
        expected = signing.v3_signature(stored.secret, string_to_sign)
        if not hmac.compare_digest(expected, signature):
            raise errors.signature_does_not_match(string_to_sign)
        nonce = request.header("x-acs-signature-nonce") or ""
        self._fresh(credential, nonce, request.header("x-acs-date") or "")
        return Authenticated(credential, nonce, "v3")

    def _verify_v1(self, request: IncomingRequest) -> Authenticated:
        params = request.params
        for name in V1_REQUIRED_PARAMS:
            if not params.get(name):
                raise errors.incomplete_signature(f"Parameter {name} is missing.")
        if params["SignatureMethod"] != "HMAC-SHA1":
            raise errors.incomplete_signature("SignatureMethod must be HMAC-SHA1.")
        if params["SignatureVersion"] != "1.0":
            raise errors.incomplete_signature("SignatureVersion must be 1.0.")
        stored = self._key(params["AccessKeyId"], params.get("SecurityToken"))
        string_to_sign = signing.v1_string_to_sign(request.method, params)
        expected = signing.v1_signature(stored.secret, string_to_sign)
        if not hmac.compare_digest(expected, params["Signature"]):
            raise errors.signature_does_not_match(string_to_sign)
        self._fresh(params["AccessKeyId"], params["SignatureNonce"], params["Timestamp"])
        return Authenticated(params["AccessKeyId"], params["SignatureNonce"], "v1")
