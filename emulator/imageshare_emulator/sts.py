"""A stand-in for STS: ``AssumeRoleWithOIDC`` (and V1-signed ``AssumeRole``).

It issues temporary credentials and registers them in the ECS emulator's credential
store, so a test can follow credentials from the OIDC token to a signed ECS call.
Knobs let tests change the accepted token (rotation), fail calls, hold a response
until released (to make a refresh race live calls) and count what arrived.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from imageshare_server.upstream.signing import v1_signature, v1_string_to_sign

ROLE_ARN = re.compile(r"^acs:ram::\d{16}:role/[A-Za-z0-9.@_+=,-]{1,64}$")
OIDC_PROVIDER_ARN = re.compile(r"^acs:ram::\d{16}:oidc-provider/[A-Za-z0-9._-]{1,128}$")
MIN_DURATION, MAX_DURATION = 900, 43200


class KeyRegistry(Protocol):
    """What the stand-ins need from the ECS emulator's ``CredentialStore``."""

    def add(
        self,
        access_key_id: str,
        secret: str,
        security_token: str | None = None,
        expires_at: float | None = None,
    ) -> None: ...


class SecretLookup(Protocol):
    def lookup(self, access_key_id: str) -> Any: ...


@dataclass(frozen=True)
class IssuedCredentials:
    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str = field(repr=False)
    expires_at: float

    @property
    def expiration(self) -> str:
        return datetime.fromtimestamp(self.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def issue(prefix: str, duration: float, registry: KeyRegistry | None) -> IssuedCredentials:
    """Mint random temporary credentials and make the ECS emulator accept them."""
    issued = IssuedCredentials(
        access_key_id=f"STS.{prefix}{secrets.token_hex(8)}",
        access_key_secret=secrets.token_urlsafe(24),
        security_token=f"CAIS{secrets.token_urlsafe(48)}",
        expires_at=float(int(time.time() + duration)),
    )
    if registry is not None:
        registry.add(
            issued.access_key_id,
            issued.access_key_secret,
            security_token=issued.security_token,
            expires_at=issued.expires_at,
        )
    return issued


Respond = Callable[[int, dict[str, Any]], None]


class LoopbackServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 in a daemon thread; port 0 picks a free one."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self._server.stand_in = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # A short poll interval keeps shutdown() from stalling a test teardown.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class QuietHandler(BaseHTTPRequestHandler):
    """No access log on stderr: the request lines of a test are noise."""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def send_json(self, status: int, body: dict[str, Any] | str) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class StsStandIn(LoopbackServer):
    """STS on loopback. Set ``accepted_tokens`` before the client calls it."""

    def __init__(
        self,
        *,
        accepted_tokens: set[str] | None = None,
        credential_store: KeyRegistry | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(_StsHandler, port)
        self.lock = threading.Lock()
        self.accepted_tokens: set[str] = set(accepted_tokens or ())
        self.credential_store = credential_store
        self.duration_override: float | None = None
        self.failures_to_inject = 0
        self.failure = (
            503,
            "ServiceUnavailable",
            "The request has failed due to a temporary failure.",
        )
        self.gate: threading.Event | None = None
        self.calls: list[dict[str, str]] = []
        self.issued: list[IssuedCredentials] = []
        self.request_arrived = threading.Event()

    @property
    def call_count(self) -> int:
        with self.lock:
            return len(self.calls)

    def fail_next(self, count: int, status: int = 503, code: str = "ServiceUnavailable") -> None:
        with self.lock:
            self.failures_to_inject = count
            self.failure = (status, code, "Injected failure.")

    def handle_action(self, params: dict[str, str], respond: Respond) -> None:
        with self.lock:
            self.calls.append(params)
        self.request_arrived.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        request_id = secrets.token_hex(8).upper()
        with self.lock:
            if self.failures_to_inject > 0:
                self.failures_to_inject -= 1
                status, code, message = self.failure
                respond(status, {"RequestId": request_id, "Code": code, "Message": message})
                return
        error = self._validate(params)
        if error is not None:
            status, code, message = error
            respond(status, {"RequestId": request_id, "Code": code, "Message": message})
            return
        duration = self.duration_override or float(params.get("DurationSeconds", 3600))
        issued = issue("", duration, self.credential_store)
        with self.lock:
            self.issued.append(issued)
        role = params["RoleArn"].rsplit("/", 1)[-1]
        respond(
            200,
            {
                "RequestId": request_id,
                "AssumedRoleUser": {
                    "Arn": f"{params['RoleArn']}/{params['RoleSessionName']}",
                    "AssumedRoleId": f"3{secrets.randbelow(10**17)}:{role}",
                },
                "Credentials": {
                    "AccessKeyId": issued.access_key_id,
                    "AccessKeySecret": issued.access_key_secret,
                    "SecurityToken": issued.security_token,
                    "Expiration": issued.expiration,
                },
            },
        )

    def _validate(self, params: dict[str, str]) -> tuple[int, str, str] | None:
        action = params.get("Action")
        if params.get("Version") != "2015-04-01":
            return 400, "InvalidVersion", "Specified parameter Version is not valid."
        if action not in ("AssumeRoleWithOIDC", "AssumeRole"):
            return 400, "InvalidAction.NotFound", "Specified api is not found."
        if not ROLE_ARN.match(params.get("RoleArn", "")):
            return 400, "InvalidParameter.RoleArn", "The parameter RoleArn is wrongly formed."
        if not params.get("RoleSessionName"):
            return 400, "MissingRoleSessionName", "RoleSessionName is mandatory."
        try:
            duration = int(params.get("DurationSeconds", "3600"))
        except ValueError:
            duration = 0
        if not MIN_DURATION <= duration <= MAX_DURATION:
            return 400, "InvalidParameter.DurationSeconds", "DurationSeconds is out of range."
        if action == "AssumeRole":
            return self._verify_signature(params)
        if not OIDC_PROVIDER_ARN.match(params.get("OIDCProviderArn", "")):
            return 400, "InvalidParameter.OIDCProviderArn", "OIDCProviderArn is wrongly formed."
        with self.lock:
            accepted = params.get("OIDCToken", "") in self.accepted_tokens
        if not accepted:
            return 400, "AuthenticationFail.OIDCToken.Invalid", "The OIDCToken is invalid."
        return None

    def _verify_signature(self, params: dict[str, str]) -> tuple[int, str, str] | None:
        store = self.credential_store
        key = (
            store.lookup(params.get("AccessKeyId", ""))
            if store is not None and hasattr(store, "lookup")
            else None
        )
        if key is None:
            return 404, "InvalidAccessKeyId.NotFound", "Specified access key is not found."
        expected = v1_signature(key.secret, v1_string_to_sign("POST", params))
        if not secrets.compare_digest(expected, params.get("Signature", "")):
            return 400, "SignatureDoesNotMatch", "Specified signature is not matched."
        return None


class _StsHandler(QuietHandler):
    def _params(self) -> dict[str, str]:
        params = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length).decode()
            params.update(parse_qsl(body, keep_blank_values=True))
        return params

    def _serve(self) -> None:
        stand_in: StsStandIn = self.server.stand_in  # type: ignore[attr-defined]
        stand_in.handle_action(self._params(), self.send_json)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()


def main() -> None:
    """Run the stand-in alone: ``python -m imageshare_emulator.sts TOKEN...``."""
    server = StsStandIn(accepted_tokens=set(sys.argv[1:]))
    server.start()
    print(json.dumps({"event": "serving", "url": server.url}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
