"""The official Alibaba Cloud SDKs, unchanged, against the emulator.

If the SDKs that talk to the real ECS also work here, the emulator checks signatures and
answers the way ECS does, so tests that pass against it say something about production.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from alibabacloud_ecs20140526 import models as ecs_models
from alibabacloud_ecs20140526.client import Client as EcsClient
from alibabacloud_tea_openapi import models as openapi_models
from alibabacloud_tea_openapi.exceptions import ClientException, ServerException
from aliyunsdkcore.acs_exception.exceptions import ServerException as CoreServerException
from aliyunsdkcore.auth.credentials import StsTokenCredential
from aliyunsdkcore.client import AcsClient
from aliyunsdkecs.request.v20140526.DescribeImageSharePermissionRequest import (
    DescribeImageSharePermissionRequest,
)

from imageshare_emulator import Emulator

KEY_ID = "LTAI5tSdkTestKey"
SECRET = "sdk-test-secret"
REGION = "cn-hangzhou"
DEMO_IDS_COUNT = 137


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    emu = Emulator(credentials={KEY_ID: SECRET})
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture(autouse=True)
def clean(emulator: Emulator) -> Iterator[None]:
    emulator.knobs.reset()
    yield
    emulator.knobs.reset()


def new_client(
    emu: Emulator,
    signature_algorithm: str | None,
    key_id: str = KEY_ID,
    secret: str = SECRET,
    token: str | None = None,
) -> EcsClient:
    config = openapi_models.Config(
        access_key_id=key_id,
        access_key_secret=secret,
        security_token=token,
        endpoint=f"127.0.0.1:{emu.port}",
        protocol="http",
        region_id=REGION,
    )
    if signature_algorithm is not None:
        config.signature_algorithm = signature_algorithm
    return EcsClient(config)


def legacy_request(
    emu: Emulator, image_id: str, page_number: int | None = None, page_size: int | None = None
) -> DescribeImageSharePermissionRequest:
    request = DescribeImageSharePermissionRequest()
    request.set_ImageId(image_id)
    if page_number is not None:
        request.set_PageNumber(page_number)
    if page_size is not None:
        request.set_PageSize(page_size)
    request.set_endpoint(f"127.0.0.1:{emu.port}")
    request.set_protocol_type("http")
    return request


ALGORITHMS = pytest.mark.parametrize(
    ("algorithm", "wire_version"), [(None, "v3"), ("v2", "v1")], ids=["default-v3", "v2-is-v1"]
)


@ALGORITHMS
def test_new_sdk_pages_through_all_accounts(
    emulator: Emulator, algorithm: str | None, wire_version: str
) -> None:
    client = new_client(emulator, algorithm)
    ids: list[str] = []
    page = 1
    while True:
        response = client.describe_image_share_permission(
            ecs_models.DescribeImageSharePermissionRequest(
                region_id=REGION, image_id="m-demo0000001", page_number=page
            )
        )
        body = response.body
        assert body.total_count == DEMO_IDS_COUNT
        assert body.page_size == 10
        ids += [str(a.aliyun_id) for a in body.accounts.account]
        if page * body.page_size >= body.total_count:
            break
        page += 1
    assert page == 14
    assert len(ids) == len(set(ids)) == DEMO_IDS_COUNT
    counters = emulator.knobs.counters()
    assert counters["signature_versions"] == {wire_version: 14}
    assert counters["outcomes"] == {"Success": 14}
    assert len(set(counters["nonces"])) == 14


@ALGORITHMS
def test_new_sdk_reads_share_groups_and_shared_time(
    emulator: Emulator, algorithm: str | None, wire_version: str
) -> None:
    response = new_client(emulator, algorithm).describe_image_share_permission(
        ecs_models.DescribeImageSharePermissionRequest(region_id=REGION, image_id="m-demo0000002")
    )
    assert [g.group for g in response.body.share_groups.share_group] == ["all"]
    assert response.body.accounts.account[0].shared_time == "2025-01-01T00:00:00Z"
    assert emulator.knobs.counters()["signature_versions"] == {wire_version: 1}


@ALGORITHMS
def test_new_sdk_unknown_image(
    emulator: Emulator, algorithm: str | None, wire_version: str
) -> None:
    with pytest.raises(ClientException) as caught:
        new_client(emulator, algorithm).describe_image_share_permission(
            ecs_models.DescribeImageSharePermissionRequest(region_id=REGION, image_id="m-nope")
        )
    assert caught.value.code == "InvalidImageId.NotFound"
    assert caught.value.status_code == 404
    assert emulator.knobs.counters()["signature_versions"] == {wire_version: 1}


@ALGORITHMS
def test_new_sdk_wrong_secret(emulator: Emulator, algorithm: str | None, wire_version: str) -> None:
    with pytest.raises(ClientException) as caught:
        new_client(emulator, algorithm, secret="wrong").describe_image_share_permission(
            ecs_models.DescribeImageSharePermissionRequest(
                region_id=REGION, image_id="m-demo0000001"
            )
        )
    assert caught.value.code == "SignatureDoesNotMatch"


@ALGORITHMS
def test_new_sdk_with_sts_credentials(
    emulator: Emulator, algorithm: str | None, wire_version: str
) -> None:
    emulator.credential_store.add("STS.sdk", "sts-secret", "sts-token", time.time() + 300)
    try:
        client = new_client(emulator, algorithm, "STS.sdk", "sts-secret", "sts-token")
        response = client.describe_image_share_permission(
            ecs_models.DescribeImageSharePermissionRequest(
                region_id=REGION, image_id="m-demo0000002"
            )
        )
        assert response.body.total_count == 2
    finally:
        emulator.credential_store.remove("STS.sdk")


@ALGORITHMS
def test_new_sdk_sees_injected_errors(
    emulator: Emulator, algorithm: str | None, wire_version: str
) -> None:
    client = new_client(emulator, algorithm)
    request = ecs_models.DescribeImageSharePermissionRequest(
        region_id=REGION, image_id="m-demo0000002"
    )
    emulator.knobs.throttle_next(1)
    with pytest.raises(ClientException) as throttled:
        client.describe_image_share_permission(request)
    assert throttled.value.code == "Throttling.User"
    emulator.knobs.fault("error_code", count=1, code="ServiceUnavailable", status=503)
    with pytest.raises(ServerException) as unavailable:
        client.describe_image_share_permission(request)
    assert unavailable.value.code == "ServiceUnavailable"


def test_legacy_sdk_pages_through_all_accounts(emulator: Emulator) -> None:
    client = AcsClient(KEY_ID, SECRET, REGION)
    ids: list[str] = []
    for page in (1, 2, 3):
        raw = client.do_action_with_exception(legacy_request(emulator, "m-demo0000001", page, 50))
        body = json.loads(raw)
        assert body["TotalCount"] == DEMO_IDS_COUNT
        ids += [a["AliyunId"] for a in body["Accounts"]["Account"]]
    assert len(ids) == len(set(ids)) == DEMO_IDS_COUNT
    assert emulator.knobs.counters()["signature_versions"] == {"v1": 3}


def test_legacy_sdk_unknown_image(emulator: Emulator) -> None:
    client = AcsClient(KEY_ID, SECRET, REGION)
    with pytest.raises(CoreServerException) as caught:
        client.do_action_with_exception(legacy_request(emulator, "m-nope"))
    assert caught.value.get_error_code() == "InvalidImageId.NotFound"
    assert caught.value.get_http_status() == 404


def test_legacy_sdk_with_sts_credentials(emulator: Emulator) -> None:
    emulator.credential_store.add("STS.legacy", "sts-secret", "sts-token", time.time() + 300)
    try:
        client = AcsClient(
            region_id=REGION,
            credential=StsTokenCredential("STS.legacy", "sts-secret", "sts-token"),
        )
        body = json.loads(
            client.do_action_with_exception(legacy_request(emulator, "m-demo0000002"))
        )
        assert body["TotalCount"] == 2
    finally:
        emulator.credential_store.remove("STS.legacy")
