"""ListImageShares end to end: gRPC client -> server process -> httpx -> emulator process."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from imageshare_emulator.data import demo_accounts
from tests.support.processes import ServerProcess
from tests.support.rpc import account_ids, list_all, list_error

REGION = "cn-hangzhou"
BIG = "m-demo0000001"
DEMO_IDS = [a.aliyun_id for a in demo_accounts()]


def upstream_calls(emulator: EmulatorAdmin) -> int:
    return int(emulator.counters()["calls_by_action"].get("DescribeImageSharePermission", 0))


def test_every_account_exactly_once_in_upstream_order(stub, emulator):
    messages = list_all(stub, region_id=REGION, image_id=BIG)
    assert account_ids(messages) == DEMO_IDS
    # 0 -> 50 accounts per message: 50 + 50 + 37.
    assert [len(m.accounts) for m in messages] == [50, 50, 37]
    assert all(m.total_count == 137 for m in messages)
    assert all(m.region_id == REGION and m.image_id == BIG for m in messages)
    assert messages[0].accounts[0].shared_time.ToJsonString() == "2025-01-01T00:00:00Z"
    # 137 accounts at upstream PageSize 100 are two pages, each read once.
    assert upstream_calls(emulator) == 2
    request_ids = [r for m in messages for r in m.upstream_request_ids]
    assert len(request_ids) == 2
    assert len(set(request_ids)) == 2
    assert {m.cache_status for m in messages} == {image_share_pb2.CACHE_STATUS_MISS}


@pytest.mark.parametrize(
    ("page_size", "sizes"),
    [(1, [1] * 137), (30, [30, 30, 30, 30, 17]), (100, [100, 37]), (137 - 37, [100, 37])],
)
def test_page_size_caps_accounts_per_message(stub, emulator, page_size, sizes):
    messages = list_all(stub, region_id=REGION, image_id=BIG, page_size=page_size)
    assert [len(m.accounts) for m in messages] == sizes
    assert account_ids(messages) == DEMO_IDS


def test_share_groups_complete_in_first_message_only(stub, emulator):
    messages = list_all(stub, region_id=REGION, image_id="m-demo0000002", page_size=1)
    assert [g.group for g in messages[0].share_groups] == ["all"]
    assert all(not m.share_groups for m in messages[1:])
    assert account_ids(messages) == ["1234567890123456", "1234567890654321"]


def test_unshared_image_yields_exactly_one_empty_message(stub, emulator):
    messages = list_all(stub, region_id=REGION, image_id="m-demo0000003")
    assert len(messages) == 1
    assert not messages[0].accounts
    assert not messages[0].share_groups
    assert messages[0].total_count == 0


def test_numeric_aliyun_ids_are_kept_verbatim(stub, emulator):
    ids = ["1557809237701234567", "100", "0012"]
    emulator.upsert_image(
        {
            "region_id": REGION,
            "image_id": "m-numeric01",
            "accounts": [{"aliyun_id": i} for i in ids],
            "aliyun_id_as_number": True,
        }
    )
    messages = list_all(stub, region_id=REGION, image_id="m-numeric01")
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
def test_invalid_input_is_rejected_before_any_upstream_call(stub, emulator, fields, bad_field):
    error = list_error(stub, **fields)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field in error.message
    assert error.bad_request is not None
    assert [v.field for v in error.bad_request.field_violations] == [bad_field]
    assert error.error_info is not None
    assert error.error_info.reason == "INVALID_REQUEST"
    assert emulator.counters()["total"] == 0


def test_not_found_carries_upstream_request_id(stub, emulator):
    error = list_error(stub, region_id=REGION, image_id="m-doesnotexist")
    assert error.code is grpc.StatusCode.NOT_FOUND
    info = error.error_info
    assert info is not None
    assert info.reason == "INVALID_IMAGE_ID_NOT_FOUND"
    assert info.domain == "ecs.aliyuncs.com"
    assert info.metadata["upstreamCode"] == "InvalidImageId.NotFound"
    assert info.metadata["httpStatus"] == "404"
    assert info.metadata["requestId"]
    assert info.metadata["requestId"] in error.message


def test_unknown_region_is_invalid_argument(stub, emulator):
    error = list_error(stub, region_id="xx-nowhere-9", image_id=BIG)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.error_info is not None
    assert error.error_info.reason == "INVALID_REGION_ID_NOT_FOUND"


@pytest.mark.parametrize(
    ("code", "status", "expected", "reason"),
    [
        ("Forbidden.RAM", 403, grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN_RAM"),
        ("InvalidParameter", 400, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMETER"),
        ("MissingParameter", 400, grpc.StatusCode.INVALID_ARGUMENT, "MISSING_PARAMETER"),
        (
            "InvalidAccessKeyId.NotFound",
            404,
            grpc.StatusCode.INTERNAL,
            "INVALID_ACCESS_KEY_ID_NOT_FOUND",
        ),
        (
            "InvalidSecurityToken.Expired",
            400,
            grpc.StatusCode.INTERNAL,
            "INVALID_SECURITY_TOKEN_EXPIRED",
        ),
        ("IncompleteSignature", 400, grpc.StatusCode.INTERNAL, "INCOMPLETE_SIGNATURE"),
        ("InternalError", 500, grpc.StatusCode.UNAVAILABLE, "INTERNAL_ERROR"),
        ("ServiceUnavailable", 503, grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE"),
    ],
)
def test_upstream_error_codes_map_to_grpc_statuses(stub, emulator, code, status, expected, reason):
    emulator.fault("error_code", count=10, code=code, status=status)
    error = list_error(stub, region_id=REGION, image_id=BIG)
    assert error.code is expected
    assert error.error_info is not None
    assert error.error_info.reason == reason
    assert error.error_info.metadata["httpStatus"] == str(status)


def fresh_stub(server: ServerProcess) -> image_share_pb2_grpc.ImageShareServiceStub:
    """A stub on a new server: its retry budget is full whatever earlier tests did."""
    return image_share_pb2_grpc.ImageShareServiceStub(grpc.insecure_channel(server.target))


def test_throttling_after_retries_is_resource_exhausted_with_retry_info(start_server, emulator):
    stub = fresh_stub(start_server())
    emulator.throttle_next(10)
    error = list_error(stub, region_id=REGION, image_id=BIG)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.error_info is not None
    assert error.error_info.reason == "THROTTLING_USER"
    assert error.retry_info is not None
    assert error.retry_info.retry_delay.ToNanoseconds() > 0
    # Four attempts in all, as configured by default.
    assert emulator.counters()["outcomes"].get("Throttling.User") == 4


def test_transient_throttling_is_retried_with_fresh_nonces(start_server, emulator):
    stub = fresh_stub(start_server())
    emulator.throttle_next(2)
    messages = list_all(stub, region_id=REGION, image_id=BIG)
    assert account_ids(messages) == DEMO_IDS
    nonces = emulator.counters()["nonces"]
    assert len(nonces) == 4  # page 1 three times, page 2 once
    assert len(set(nonces)) == len(nonces)


@pytest.mark.parametrize("mode", ["reset", "malformed", "truncated"])
def test_broken_upstream_answers_are_unavailable(stub, emulator, mode):
    emulator.fault(mode, count=10)
    error = list_error(stub, region_id=REGION, image_id=BIG)
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.error_info is not None
    assert error.error_info.reason.startswith("UPSTREAM_")


def test_upstream_down_is_unavailable_and_server_keeps_serving(stub, emulator):
    emulator.set(down=True)
    assert list_error(stub, region_id=REGION, image_id=BIG).code is grpc.StatusCode.UNAVAILABLE
    emulator.set(down=False)
    assert len(account_ids(list_all(stub, region_id=REGION, image_id=BIG))) == 137


def test_slow_upstream_is_bounded_by_the_callers_deadline(stub, emulator):
    emulator.set(latency_ms=3000)
    error = list_error(stub, timeout=0.5, region_id=REGION, image_id=BIG)
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_list_changing_between_pages_is_reread_into_a_consistent_snapshot(stub, emulator):
    ids = [str(10_000 + i) for i in range(150)]
    emulator.upsert_image(
        {
            "region_id": REGION,
            "image_id": "m-changing01",
            "accounts": [{"aliyun_id": i} for i in ids],
        }
    )
    # After page 1 is answered, one account is inserted at the front: page 2 overlaps page 1.
    changed = ["9", *ids]
    emulator.change_after(REGION, "m-changing01", 1, [{"aliyun_id": i} for i in changed])
    messages = list_all(stub, region_id=REGION, image_id="m-changing01")
    assert account_ids(messages) == changed
    assert {m.total_count for m in messages} == {151}
    # The first read (2 pages) was refused as inconsistent; the re-read (2 pages) settled.
    assert upstream_calls(emulator) == 4


def test_health_serving_and_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "imageshare.v1.ImageShareService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in response.list_services_response.service}
        assert {"imageshare.v1.ImageShareService", "grpc.health.v1.Health"} <= names


def test_v1_signatures_work_end_to_end(start_server, emulator):
    server: ServerProcess = start_server("--signature-version", "v1")
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        assert account_ids(list_all(stub, region_id=REGION, image_id=BIG)) == DEMO_IDS
    assert set(emulator.counters()["signature_versions"]) == {"v1"}


def test_rejected_credentials_are_internal_and_never_logged(start_server, emulator):
    secret = "WrongSecretValue0123456789"
    server = start_server(env={"ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret})
    with grpc.insecure_channel(server.target) as channel:
        error = list_error(
            image_share_pb2_grpc.ImageShareServiceStub(channel), region_id=REGION, image_id=BIG
        )
    assert error.code is grpc.StatusCode.INTERNAL
    assert error.error_info is not None
    assert error.error_info.reason == "SIGNATURE_DOES_NOT_MATCH"
    assert "string to sign" not in error.message.lower()
    server.stop()
    logs = server.log_text
    assert "SignatureDoesNotMatch" in logs  # logged loudly...
    assert secret not in logs  # ...without the secret
    assert "ACS3-HMAC-SHA256\n" not in logs
    assert "[redacted]" in logs


def test_emulator_mode_serves_demo_data_in_process(start_server):
    server = start_server("--emulator", upstream=None)
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        assert account_ids(list_all(stub, region_id=REGION, image_id=BIG)) == DEMO_IDS


def test_plaintext_health_port_reports_the_same_health(start_server):
    server = start_server("--health-listen", "127.0.0.1:0")
    port = server.ready["health_port"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        # Only health lives there: the service itself is not reachable on that port.
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            list_all(stub, region_id=REGION, image_id=BIG)
        assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED
