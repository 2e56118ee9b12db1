"""A stand-in for the ECS instance metadata service, hardened mode (IMDSv2 only).

``PUT /latest/api/token`` (header ``X-aliyun-ecs-metadata-token-ttl-seconds``, 1 to
21600) returns a session token; reads must present it in
``X-aliyun-ecs-metadata-token``. As on ECS in hardened mode, a read without a token is
refused with 403 and one with an unknown or expired token with 401. The role's
credentials rotate on demand and are registered in the ECS emulator's credential store.

The same credentials are also served at ``/credentials/<role>`` without a token, in
the shape of an ``ALIBABA_CLOUD_CREDENTIALS_URI`` endpoint.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from collections import Counter

from imageshare_emulator.sts import (
    IssuedCredentials,
    KeyRegistry,
    LoopbackServer,
    QuietHandler,
    issue,
)

ROLE_PREFIX = "/latest/meta-data/ram/security-credentials/"
URI_PREFIX = "/credentials/"
MAX_TOKEN_TTL = 21600


class MetadataStandIn(LoopbackServer):
    def __init__(
        self,
        *,
        role_name: str = "imageshare-role",
        credential_store: KeyRegistry | None = None,
        duration: float = 6 * 3600,
        port: int = 0,
    ) -> None:
        super().__init__(_MetadataHandler, port)
        self.lock = threading.Lock()
        self.role_name = role_name
        self.credential_store = credential_store
        self.duration = duration
        self.tokens: dict[str, float] = {}
        self.calls: Counter[str] = Counter()
        self.current: IssuedCredentials = issue("ecs", duration, credential_store)

    def rotate(self) -> IssuedCredentials:
        """Issue the role's next credentials, as ECS does well before expiry."""
        issued = issue("ecs", self.duration, self.credential_store)
        with self.lock:
            self.current = issued
        return issued

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def document(self) -> dict[str, str]:
        with self.lock:
            c = self.current
        return {
            "AccessKeyId": c.access_key_id,
            "AccessKeySecret": c.access_key_secret,
            "SecurityToken": c.security_token,
            "Expiration": c.expiration,
            "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "Code": "Success",
        }


class _MetadataHandler(QuietHandler):
    @property
    def stand_in(self) -> MetadataStandIn:
        return self.server.stand_in  # type: ignore[attr-defined, no-any-return]

    def _text(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        s = self.stand_in
        with s.lock:
            s.calls["PUT " + self.path] += 1
        if self.path != "/latest/api/token":
            self._text(404, "Not Found")
            return
        # ECS refuses token requests that went through a proxy.
        if self.headers.get("X-Forwarded-For"):
            self._text(403, "Forbidden")
            return
        try:
            ttl = int(self.headers.get("X-aliyun-ecs-metadata-token-ttl-seconds", ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TOKEN_TTL:
            self._text(400, "Bad Request")
            return
        token = secrets.token_urlsafe(32)
        with s.lock:
            s.tokens[token] = time.time() + ttl
        self._text(200, token)

    def do_GET(self) -> None:
        s = self.stand_in
        with s.lock:
            s.calls["GET " + self.path] += 1
        if self.path.startswith(URI_PREFIX):
            if self.path[len(URI_PREFIX) :] != s.role_name:
                self._text(404, "Not Found")
                return
            self.send_json(200, s.document())
            return
        token = self.headers.get("X-aliyun-ecs-metadata-token")
        if not token:
            self._text(403, "Forbidden")
            return
        with s.lock:
            valid = s.tokens.get(token, 0.0) > time.time()
        if not valid:
            self._text(401, "Unauthorized")
            return
        if self.path == ROLE_PREFIX:
            self._text(200, s.role_name)
        elif self.path == ROLE_PREFIX + s.role_name:
            self.send_json(200, json.dumps(s.document(), indent=2))
        else:
            self._text(404, "Not Found")


def main() -> None:
    """Run the stand-in alone: ``python -m imageshare_emulator.metadata [ROLE]``."""
    server = MetadataStandIn(role_name=(sys.argv[1:] or ["imageshare-role"])[0])
    server.start()
    print(json.dumps({"event": "serving", "url": server.url}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
