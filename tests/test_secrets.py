"""The service's AccessKey secret and STS token never leave the process.

Each case gives a real server canary credentials, drives one kind of failure
(rejected signature with the echoed string-to-sign, unknown key, rejected STS
token, broken transport, an upstream that echoes the credentials in its error
text) and then searches everything an outsider can see: the caller's status
message and every detail, the /metrics page, and the whole log including
tracebacks, for the canaries in every spelling they could take in a URL.

The server stays a process of its own: what is searched is what the process
writes (stderr, tracebacks included, through the logging it configures at
start) and serves on its /metrics port. The emulator runs in this process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Required, TypedDict
from urllib.parse import quote, quote_plus

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2  # noqa: F401 - registers the detail types for JSON
from grpc_status import rpc_status

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import Emulator
from tests.support.processes import DEMO_ENV, ServerProcess

StartServer = Callable[..., ServerProcess]
REGION = "cn-hangzhou"
SECRET = "Canary+Secret/0123456789=abcdefXYZ"
TOKEN = "CAISCanaryStsToken+/=" + "Q" * 200 + "EndOfCanaryToken"
UNKNOWN_KEY_ID = "LTAI5tCanaryUnknownKeyId"


def spellings(value: str) -> set[str]:
    """The canary as text, URL-encoded once and twice, form-encoded, and JSON-escaped."""
    once = quote(value, safe="")
    return {value, once, quote(once, safe=""), quote_plus(value), json.dumps(value)[1:-1]}


CANARIES = spellings(SECRET) | spellings(TOKEN) | {TOKEN[:40], TOKEN[-40:]}


class FaultSpec(TypedDict, total=False):
    """Arguments of ``Knobs.fault``."""

    mode: Required[str]
    count: int
    status: int
    code: str
    message: str


@dataclass(frozen=True)
class Case:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    fault: FaultSpec | None = None
    down: bool = False
    expected: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = ""
    upstream_code: str = ""


CASES = [
    Case(
        "signature_v3",
        {"ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET},
        reason="SIGNATURE_DOES_NOT_MATCH",
        upstream_code="SignatureDoesNotMatch",
    ),
    Case(
        "signature_v1",
        {"ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET},
        ("--signature-version", "v1"),
        reason="SIGNATURE_DOES_NOT_MATCH",
        upstream_code="SignatureDoesNotMatch",
    ),
    Case(
        "unknown_key",
        {"ALIBABA_CLOUD_ACCESS_KEY_ID": UNKNOWN_KEY_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET},
        reason="INVALID_ACCESS_KEY_ID_NOT_FOUND",
        upstream_code="InvalidAccessKeyId.NotFound",
    ),
    Case(
        "sts_token_v3",
        {"ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET, "ALIBABA_CLOUD_SECURITY_TOKEN": TOKEN},
    ),
    Case(
        # V1 carries the token in the query string, where URL logging would see it.
        "sts_token_v1_debug_logs",
        {"ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET, "ALIBABA_CLOUD_SECURITY_TOKEN": TOKEN},
        ("--signature-version", "v1", "--log-level", "debug"),
    ),
    Case(
        "transport_reset",
        {"ALIBABA_CLOUD_ACCESS_KEY_SECRET": DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]},
        fault={"mode": "reset", "count": 100},
        expected=grpc.StatusCode.UNAVAILABLE,
    ),
    Case(
        "upstream_down_v1_debug_logs",
        {"ALIBABA_CLOUD_ACCESS_KEY_SECRET": DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]},
        ("--signature-version", "v1", "--log-level", "debug"),
        down=True,
        expected=grpc.StatusCode.UNAVAILABLE,
    ),
    Case(
        # An upstream that quotes the credentials back in an ordinary error.
        "echoing_upstream",
        {"ALIBABA_CLOUD_ACCESS_KEY_SECRET": DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]},
        fault={
            "mode": "error_code",
            "count": 100,
            "status": 400,
            "code": "InvalidParameter",
            "message": f"bad value {DEMO_ENV['ALIBABA_CLOUD_ACCESS_KEY_SECRET']}",
        },
        expected=grpc.StatusCode.INVALID_ARGUMENT,
    ),
]


def leaks(text: str, case: Case) -> list[str]:
    secret = case.env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]
    canaries = CANARIES | spellings(secret)
    return sorted(c for c in canaries if c in text)


def caller_view(error: grpc.RpcError) -> str:
    """Everything the caller receives: code, message, trailers, every rich detail as JSON."""
    assert isinstance(error, grpc.Call)
    parts = [str(error.code()), error.details() or "", str(error.trailing_metadata())]
    status = rpc_status.from_call(error)
    if status is not None:
        parts.append(json_format.MessageToJson(status))
        parts.extend(repr(detail.value) for detail in status.details)
    return "\n".join(parts)


@pytest.fixture
def start_server(ecs: Emulator) -> Iterator[StartServer]:
    """Server processes against the in-process emulator, stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str]) -> ServerProcess:
        process = ServerProcess(*args, upstream=ecs.url, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.mark.subprocess
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_credentials_never_leak(start_server: StartServer, ecs: Emulator, case: Case) -> None:
    server = start_server(*case.args, env=case.env)
    if case.fault is not None:
        ecs.knobs.fault(**case.fault)
    if case.down:
        ecs.knobs.set(down=True)
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        request = image_share_pb2.ListImageSharesRequest(region_id=REGION, image_id="m-demo0000001")
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ListImageShares(request, timeout=15))
    assert isinstance(caught.value, grpc.Call)
    assert caught.value.code() is case.expected, caught.value.details()
    seen = caller_view(caught.value)
    if case.reason:
        assert case.reason in seen
    assert leaks(seen, case) == []

    metrics = httpx.get(server.metrics_url, timeout=5).text
    assert "imageshare_upstream_requests_total" in metrics
    assert leaks(metrics, case) == []

    ecs.knobs.set(down=False)
    assert server.stop() == 0
    logs = server.log_text
    assert '"event":"rpc"' in logs.replace(" ", "")
    # Rejected credentials are logged loudly, by upstream code, just without the secrets.
    assert case.upstream_code in logs
    assert leaks(logs, case) == []
