"""ListImageShares end to end: grpc.aio client -> the whole app -> httpx -> the ECS emulator.

The app runs in the test's process (``tests.support.inprocess.running``) against the
in-process emulator, one app per test, so nothing (cache, retry budget, metrics) carries
over from another test. What the upstream does when it misbehaves is in ``test_faults``;
how the cache and single-flight behave is in ``test_cache_and_coalescing``.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import CollectorRegistry

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import Emulator
from imageshare_server import app as server_app
from imageshare_server.config import parse_settings
from imageshare_server.core.credentials import Credentials
from imageshare_server.observability.logging import JsonFormatter
from imageshare_server.redaction import register_secret
from tests.support import inprocess
from tests.support.clock import FastClock
from tests.support.faults_common import BIG, DEMO_IDS, settled
from tests.support.images import REGION, new_image
from tests.support.inprocess import Request, running
from tests.support.rpc import account_ids

MISS = image_share_pb2.CACHE_STATUS_MISS
# Every test starts its own app; without a cache every call is an upstream read.
NO_CACHE = ("--cache-ttl", "0")


async def test_every_account_exactly_once_in_upstream_order(ecs: Emulator) -> None:
    async with running(ecs, *NO_CACHE) as app:
        messages = await app.list(region_id=REGION, image_id=BIG)
        assert account_ids(messages) == DEMO_IDS
        # 0 -> 50 accounts per message: 50 + 50 + 37.
        assert [len(m.accounts) for m in messages] == [50, 50, 37]
        assert all(m.total_count == 137 for m in messages)
        assert all(m.region_id == REGION and m.image_id == BIG for m in messages)
        assert messages[0].accounts[0].shared_time.ToJsonString() == "2025-01-01T00:00:00Z"
        # 137 accounts at upstream PageSize 100 are two pages, each read once.
        assert app.upstream_calls() == 2
        assert sorted(
            (p["page_number"], p["count"]) for p in ecs.knobs.counters()["calls_by_page"]
        ) == [(1, 1), (2, 1)]
        request_ids = [r for m in messages for r in m.upstream_request_ids]
        assert len(request_ids) == 2
        assert len(set(request_ids)) == 2
        assert {m.cache_status for m in messages} == {MISS}


@pytest.mark.parametrize(
    ("page_size", "sizes"),
    [(1, [1] * 137), (30, [30, 30, 30, 30, 17]), (100, [100, 37]), (137 - 37, [100, 37])],
)
async def test_page_size_caps_accounts_per_message(
    ecs: Emulator, page_size: int, sizes: list[int]
) -> None:
    async with running(ecs, *NO_CACHE) as app:
        messages = await app.list(region_id=REGION, image_id=BIG, page_size=page_size)
        assert [len(m.accounts) for m in messages] == sizes
        assert account_ids(messages) == DEMO_IDS


async def test_share_groups_complete_in_first_message_only(ecs: Emulator) -> None:
    async with running(ecs, *NO_CACHE) as app:
        messages = await app.list(region_id=REGION, image_id="m-demo0000002", page_size=1)
        assert [g.group for g in messages[0].share_groups] == ["all"]
        assert all(not m.share_groups for m in messages[1:])
        assert account_ids(messages) == ["1234567890123456", "1234567890654321"]


async def test_unshared_image_yields_exactly_one_empty_message(ecs: Emulator) -> None:
    async with running(ecs, *NO_CACHE) as app:
        messages = await app.list(region_id=REGION, image_id="m-demo0000003")
        assert len(messages) == 1
        assert not messages[0].accounts
        assert not messages[0].share_groups
        assert messages[0].total_count == 0


async def test_numeric_aliyun_ids_are_kept_verbatim(ecs: Emulator) -> None:
    ids = ["1557809237701234567", "100", "0012"]
    image_id, _ = new_image(ecs.knobs, 0)
    ecs.knobs.upsert_image(
        {
            "region_id": REGION,
            "image_id": image_id,
            "accounts": [{"aliyun_id": i} for i in ids],
            "aliyun_id_as_number": True,
        }
    )
    async with running(ecs, *NO_CACHE) as app:
        messages = await app.list(region_id=REGION, image_id=image_id)
        got = account_ids(messages)
        # A JSON number cannot carry leading zeros; everything else survives digit for digit.
        assert got[:2] == ids[:2]
        assert all(m.accounts[0].HasField("shared_time") is False for m in messages)


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"image_id": BIG}, "region_id"),
        ({"region_id": REGION}, "image_id"),
        ({"region_id": "CN-HANGZHOU", "image_id": BIG}, "region_id"),
        ({"region_id": "cn-hangzhou.evil.example", "image_id": BIG}, "region_id"),
        ({"region_id": "127.0.0.1:80/x", "image_id": BIG}, "region_id"),
        ({"region_id": "cn-" + "a" * 80, "image_id": BIG}, "region_id"),
        ({"region_id": REGION, "image_id": "m-demo/../x"}, "image_id"),
        ({"region_id": REGION, "image_id": "ubuntu_22_04"}, "image_id"),
        ({"region_id": REGION, "image_id": BIG, "page_size": 101}, "page_size"),
        ({"region_id": REGION, "image_id": BIG, "page_size": -1}, "page_size"),
        ({"region_id": REGION, "image_id": BIG, "owner_account": "a b"}, "owner_account"),
        ({"region_id": REGION, "image_id": BIG, "owner_account": "x" * 129}, "owner_account"),
    ],
)
async def test_invalid_input_is_rejected_before_any_upstream_call(
    ecs: Emulator, fields: dict[str, Any], bad_field: str
) -> None:
    async with running(ecs, *NO_CACHE) as app:
        error = await app.error(**fields)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field in error.message
        assert error.bad_request is not None
        assert [v.field for v in error.bad_request.field_violations] == [bad_field]
        assert error.error_info is not None
        assert error.error_info.reason == "INVALID_REQUEST"
        assert ecs.knobs.counters()["total"] == 0


async def test_not_found_carries_upstream_request_id(ecs: Emulator) -> None:
    async with running(ecs, *NO_CACHE) as app:
        error = await app.error(region_id=REGION, image_id="m-doesnotexist")
        assert error.code is grpc.StatusCode.NOT_FOUND
        info = error.error_info
        assert info is not None
        assert info.reason == "INVALID_IMAGE_ID_NOT_FOUND"
        assert info.domain == "ecs.aliyuncs.com"
        assert info.metadata["upstreamCode"] == "InvalidImageId.NotFound"
        assert info.metadata["httpStatus"] == "404"
        assert info.metadata["requestId"]
        assert info.metadata["requestId"] in error.message


async def test_unknown_region_is_invalid_argument(ecs: Emulator) -> None:
    async with running(ecs, *NO_CACHE) as app:
        error = await app.error(region_id="xx-nowhere-9", image_id=BIG)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.error_info is not None
        assert error.error_info.reason == "INVALID_REGION_ID_NOT_FOUND"


@pytest.mark.parametrize(
    ("code", "status", "expected", "reason", "tries"),
    [
        ("Forbidden.RAM", 403, grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN_RAM", 1),
        ("InvalidParameter", 400, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMETER", 1),
        ("MissingParameter", 400, grpc.StatusCode.INVALID_ARGUMENT, "MISSING_PARAMETER", 1),
        (
            "InvalidAccessKeyId.NotFound",
            404,
            grpc.StatusCode.INTERNAL,
            "INVALID_ACCESS_KEY_ID_NOT_FOUND",
            1,
        ),
        (
            "InvalidSecurityToken.Expired",
            400,
            grpc.StatusCode.INTERNAL,
            "INVALID_SECURITY_TOKEN_EXPIRED",
            1,
        ),
        ("IncompleteSignature", 400, grpc.StatusCode.INTERNAL, "INCOMPLETE_SIGNATURE", 1),
        # Server errors are retried (4 attempts in all by default), then UNAVAILABLE.
        ("InternalError", 500, grpc.StatusCode.UNAVAILABLE, "INTERNAL_ERROR", 4),
        ("ServiceUnavailable", 503, grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE", 4),
    ],
)
async def test_upstream_error_codes_map_to_grpc_statuses(
    ecs: Emulator, code: str, status: int, expected: grpc.StatusCode, reason: str, tries: int
) -> None:
    ecs.knobs.fault("error_code", count=10, code=code, status=status)
    # FastClock: the retries' back-offs pass without real waiting.
    async with running(ecs, *NO_CACHE, clock=FastClock()) as app:
        error = await app.error(region_id=REGION, image_id=BIG)
        assert error.code is expected
        assert error.error_info is not None
        assert error.error_info.reason == reason
        assert error.error_info.domain == "ecs.aliyuncs.com"
        assert error.error_info.metadata["upstreamCode"] == code
        assert error.error_info.metadata["httpStatus"] == str(status)
        assert app.upstream_calls() == tries


async def test_an_upstream_code_the_service_does_not_map_is_failed_precondition(
    ecs: Emulator,
) -> None:
    body = json.dumps({"RequestId": "R", "Code": "Some.Unmapped", "Message": "x"})
    ecs.knobs.fault("raw", count=1, status=400, body=body)
    async with running(ecs, *NO_CACHE) as app:
        error = await app.error(region_id=REGION, image_id=BIG)
        # The server's own status, with the upstream's answer in its details.
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert error.error_info is not None
        assert error.error_info.reason == "SOME_UNMAPPED"
        assert error.error_info.domain == "ecs.aliyuncs.com"
        assert dict(error.error_info.metadata) == {
            "upstreamCode": "Some.Unmapped",
            "requestId": "R",
            "httpStatus": "400",
        }
        assert error.message == "upstream Some.Unmapped: x (RequestId R)"
        assert app.upstream_calls() == 1  # a client error: never retried


async def test_list_changing_between_pages_is_reread_into_a_consistent_snapshot(
    ecs: Emulator,
) -> None:
    image_id, ids = new_image(ecs.knobs, 150, first_id=10_000)
    # After page 1 is answered, one account is inserted at the front: page 2 overlaps page 1.
    changed = ["9", *ids]
    ecs.knobs.change_after(REGION, image_id, 1, [{"aliyun_id": i} for i in changed])
    async with running(ecs, *NO_CACHE) as app:
        messages = await app.list(region_id=REGION, image_id=image_id)
        assert account_ids(messages) == changed
        assert {m.total_count for m in messages} == {151}
        # The first read (2 pages) was refused as inconsistent; the re-read (2 pages) settled.
        assert app.upstream_calls(image_id) == 4


async def test_a_list_that_never_holds_still_is_aborted_share_list_changing(
    ecs: Emulator,
) -> None:
    image_id, _ = new_image(ecs.knobs, 150)
    ecs.knobs.churn(REGION, image_id)  # one more account after every answer
    async with running(ecs, *NO_CACHE) as app:
        error = await app.error(region_id=REGION, image_id=image_id)
        assert error.code is grpc.StatusCode.ABORTED
        assert error.error_info is not None
        assert error.error_info.reason == "SHARE_LIST_CHANGING"
        assert error.error_info.domain == "imageshare.v1"
        # Three whole reads of two pages each, every one refused as inconsistent.
        assert app.upstream_calls(image_id) == 3 * 2
        lines = [line for line in app.logs.rpc_lines() if line.get("image") == image_id]
        assert [line["code"] for line in lines] == ["Aborted"]


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert isinstance(response, health_pb2.HealthCheckResponse)
    return response.status


async def test_health_serving_and_reflection_lists_the_service(ecs: Emulator) -> None:
    async with running(ecs) as app:
        channel = app.channel()
        for service in ("", "imageshare.v1.ImageShareService"):
            assert await health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING
        reflection = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = reflection(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        response = await call.read()
        assert isinstance(response, reflection_pb2.ServerReflectionResponse)
        names = {s.name for s in response.list_services_response.service}
        assert {"imageshare.v1.ImageShareService", "grpc.health.v1.Health"} <= names
        call.cancel()


async def test_v1_signatures_work_end_to_end(ecs: Emulator) -> None:
    async with running(ecs, *NO_CACHE, "--signature-version", "v1") as app:
        assert account_ids(await app.list(region_id=REGION, image_id=BIG)) == DEMO_IDS
        assert (await settled(ecs))["signature_versions"] == {"v1": 2}


async def test_rejected_credentials_are_internal_and_never_logged(
    ecs: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log is checked as the server writes it: every record the app logged, through the
    JSON formatter its stderr handler uses (``test_secrets`` checks a real process's stderr)."""
    secret = "WrongSecretValue0123456789"
    wrong = Credentials(inprocess.DEMO_CREDENTIALS.access_key_id, secret)
    monkeypatch.setattr(inprocess, "DEMO_CREDENTIALS", wrong)
    register_secret(secret)  # what the credentials chain does with every secret it loads
    async with running(ecs, *NO_CACHE) as app:
        error = await app.error(region_id=REGION, image_id=BIG)
        assert error.code is grpc.StatusCode.INTERNAL
        assert error.error_info is not None
        assert error.error_info.reason == "SIGNATURE_DOES_NOT_MATCH"
        assert "string to sign" not in error.message.lower()
        assert secret not in error.message
        assert app.upstream_calls() == 1  # rejected credentials are not retried
    formatter = JsonFormatter()
    logs = "\n".join(
        formatter.format(record)
        for record in app.logs.records
        if not record.name.startswith("imageshare.emulator")  # the upstream's own log
    )
    assert "SignatureDoesNotMatch" in logs  # logged loudly...
    assert secret not in logs  # ...without the secret
    # ...or the string-to-sign ECS echoes (JSON escapes its newlines).
    assert "ACS3-HMAC-SHA256\n" not in logs
    assert "ACS3-HMAC-SHA256\\n" not in logs
    assert "[redacted]" in logs
    assert (
        app.metric("imageshare_upstream_credentials_rejected_total", code="SignatureDoesNotMatch")
        == 1
    )


async def test_emulator_mode_serves_demo_data_in_process() -> None:
    """``--emulator``: the app starts its own emulator (so not ``running``, which points the
    app at the test's)."""
    settings = parse_settings(
        ["--emulator", "--listen", "127.0.0.1:0", "--metrics-listen", "", "--grace-period", "1"],
        env={},
    )
    runtime = await server_app.start(settings, registry=CollectorRegistry())
    try:
        assert runtime.emulator_url is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
            stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
            call = stub.ListImageShares(Request(region_id=REGION, image_id=BIG), timeout=10)
            assert account_ids([m async for m in call]) == DEMO_IDS
    finally:
        await server_app.shutdown(runtime)


async def test_plaintext_health_port_reports_the_same_health(ecs: Emulator) -> None:
    async with running(ecs, "--health-listen", "127.0.0.1:0") as app:
        port = app.runtime.health_port
        assert port is not None
        assert port != app.runtime.grpc_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING
            # Only health lives there: the service itself is not reachable on that port.
            stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
            call = stub.ListImageShares(Request(region_id=REGION, image_id=BIG), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                _ = [m async for m in call]
            assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert app.upstream_calls() == 0
