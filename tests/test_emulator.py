"""The ECS emulator, called over real sockets with requests signed by our own signer.

The emulator runs in this process (a thread serves each request); only the tests of the
``imageshare-emulator`` command (stderr, ``--data``, exit codes) start it as a process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import select
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from imageshare_emulator import (
    Emulator,
    EmulatorAdmin,
    EmulatorAdminError,
    EmulatorData,
    demo_data,
    load_data,
)
from imageshare_server.core.credentials import Credentials
from imageshare_server.upstream import signing

ACTION = "DescribeImageSharePermission"
VERSION = "2014-05-26"
KEY_ID = "LTAI5tEmulatorTestKey"
SECRET = "emulator-test-secret-value"
CREDS = Credentials(KEY_ID, SECRET)
REQUEST_ID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")
FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    emu = Emulator(credentials={KEY_ID: SECRET, "LTAI5tOtherKey": "other-secret"})
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture(autouse=True)
def clean(emulator: Emulator) -> Iterator[None]:
    emulator.knobs.reset()
    yield
    emulator.knobs.reset()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def host(emu: Emulator) -> str:
    return f"127.0.0.1:{emu.port}"


def v3(
    emu: Emulator,
    client: httpx.Client,
    params: dict[str, str],
    *,
    method: str = "GET",
    form: bool = False,
    creds: Credentials = CREDS,
    action: str = ACTION,
    version: str = VERSION,
    date: str | None = None,
    nonce: str | None = None,
) -> httpx.Response:
    body = urlencode(params).encode() if form else b""
    query = {} if form else params
    headers = signing.sign_v3(
        method=method,
        host=host(emu),
        action=action,
        version=version,
        query=query,
        credentials=creds,
        body=body,
        content_type=FORM if form else None,
        date=date,
        nonce=nonce,
    )
    return client.request(method, emu.url + "/", params=query, headers=headers, content=body)


def v1(
    emu: Emulator,
    client: httpx.Client,
    params: dict[str, str],
    *,
    method: str = "GET",
    form: bool = False,
    fmt: str | None = "JSON",
    creds: Credentials = CREDS,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> httpx.Response:
    signed = signing.sign_v1(
        method=method,
        action=ACTION,
        version=VERSION,
        params=params,
        credentials=creds,
        timestamp=timestamp,
        nonce=nonce,
        response_format=fmt or "XML",
    )
    if fmt is None:
        # No Format parameter at all: ECS answers XML. Re-sign without it.
        del signed["Format"]
        signed["Signature"] = signing.v1_signature(
            creds.access_key_secret, signing.v1_string_to_sign(method, signed)
        )
    if form:
        return client.request(
            method,
            emu.url + "/",
            content=urlencode(signed).encode(),
            headers={"content-type": FORM},
        )
    return client.request(method, emu.url + "/", params=signed)


def parse_xml(content: bytes) -> ET.Element:
    return ET.fromstring(content)  # noqa: S314 - our own emulator's answer


def image(image_id: str, **extra: str) -> dict[str, str]:
    return {"RegionId": "cn-hangzhou", "ImageId": image_id, **extra}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["Code"] == code
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
    assert REQUEST_ID.match(body["RequestId"])
    return body


# --- Success responses -------------------------------------------------------------------------


def test_v3_get_answers_the_ecs_document(emulator: Emulator, client: httpx.Client) -> None:
    response = v3(emulator, client, image("m-demo0000002"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == [
        "RequestId",
        "RegionId",
        "ImageId",
        "PageNumber",
        "PageSize",
        "TotalCount",
        "ShareGroups",
        "Accounts",
    ]
    assert REQUEST_ID.match(body["RequestId"])
    assert body["RegionId"] == "cn-hangzhou"
    assert body["ImageId"] == "m-demo0000002"
    assert (body["PageNumber"], body["PageSize"], body["TotalCount"]) == (1, 10, 2)
    assert body["ShareGroups"] == {"ShareGroup": [{"Group": "all"}]}
    assert body["Accounts"]["Account"][0] == {
        "AliyunId": "1234567890123456",
        "SharedTime": "2025-01-01T00:00:00Z",
    }


def test_v3_post_with_form_parameters(emulator: Emulator, client: httpx.Client) -> None:
    response = v3(emulator, client, image("m-demo0000001", PageSize="5"), method="POST", form=True)
    assert response.status_code == 200, response.text
    assert len(response.json()["Accounts"]["Account"]) == 5


def test_v3_post_with_query_parameters(emulator: Emulator, client: httpx.Client) -> None:
    response = v3(emulator, client, image("m-demo0000002"), method="POST")
    assert response.status_code == 200, response.text
    assert response.json()["TotalCount"] == 2


@pytest.mark.parametrize(("method", "form"), [("GET", False), ("POST", False), ("POST", True)])
def test_v1_json(emulator: Emulator, client: httpx.Client, method: str, form: bool) -> None:
    response = v1(emulator, client, image("m-demo0000002"), method=method, form=form)
    assert response.status_code == 200, response.text
    assert response.json()["ShareGroups"]["ShareGroup"] == [{"Group": "all"}]


@pytest.mark.parametrize("fmt", [None, "XML"])
def test_v1_without_json_format_answers_xml(
    emulator: Emulator, client: httpx.Client, fmt: str | None
) -> None:
    response = v1(emulator, client, image("m-demo0000002"), fmt=fmt)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/xml;charset=utf-8"
    root = parse_xml(response.content)
    assert root.tag == "DescribeImageSharePermissionResponse"
    assert root.findtext("TotalCount") == "2"
    assert [g.text for g in root.iter("Group")] == ["all"]
    assert [a.findtext("AliyunId") for a in root.iter("Account")] == [
        "1234567890123456",
        "1234567890654321",
    ]


def test_v1_xml_error(emulator: Emulator, client: httpx.Client) -> None:
    response = v1(emulator, client, image("m-missing"), fmt=None)
    assert response.status_code == 404
    root = parse_xml(response.content)
    assert root.tag == "Error"
    assert root.findtext("Code") == "InvalidImageId.NotFound"
    assert root.findtext("Message") == "The specified ImageId does not exist."
    assert REQUEST_ID.match(root.findtext("RequestId") or "")


def test_every_response_has_its_own_request_id(emulator: Emulator, client: httpx.Client) -> None:
    ids = {v3(emulator, client, image("m-demo0000003")).json()["RequestId"] for _ in range(20)}
    assert len(ids) == 20


def test_unshared_image(emulator: Emulator, client: httpx.Client) -> None:
    body = v3(emulator, client, image("m-demo0000003")).json()
    assert body["TotalCount"] == 0
    assert body["ShareGroups"] == {"ShareGroup": []}
    assert body["Accounts"] == {"Account": []}


def test_owner_account_is_accepted(emulator: Emulator, client: httpx.Client) -> None:
    response = v3(emulator, client, image("m-demo0000002", OwnerAccount="ECSforCloud@Alibaba.com"))
    assert response.status_code == 200


def test_numeric_aliyun_id_quirk_and_missing_shared_time(
    emulator: Emulator, client: httpx.Client
) -> None:
    emulator.knobs.upsert_image(
        {
            "region_id": "cn-beijing",
            "image_id": "m-numeric",
            "accounts": [{"aliyun_id": "155780923770"}],
            "aliyun_id_as_number": True,
        }
    )
    try:
        response = v3(emulator, client, {"RegionId": "cn-beijing", "ImageId": "m-numeric"})
        assert '"AliyunId": 155780923770' in response.text
        assert response.json()["Accounts"]["Account"] == [{"AliyunId": 155780923770}]
    finally:
        assert emulator.knobs.delete_image("cn-beijing", "m-numeric")
    gone = v3(emulator, client, {"RegionId": "cn-beijing", "ImageId": "m-numeric"})
    assert_error(gone, 404, "InvalidImageId.NotFound")


# --- Paging ------------------------------------------------------------------------------------


def test_paging_reads_all_137_accounts(emulator: Emulator, client: httpx.Client) -> None:
    ids: list[str] = []
    for page in (1, 2):
        body = v3(emulator, client, image("m-demo0000001", PageNumber=str(page), PageSize="100"))
        body_json = body.json()
        assert body_json["TotalCount"] == 137
        ids += [a["AliyunId"] for a in body_json["Accounts"]["Account"]]
    assert len(ids) == len(set(ids)) == 137
    assert all(len(i) == 16 and i.isdigit() for i in ids)
    beyond = v3(emulator, client, image("m-demo0000001", PageNumber="3", PageSize="100")).json()
    assert beyond["Accounts"]["Account"] == []
    assert beyond["TotalCount"] == 137


def test_page_defaults(emulator: Emulator, client: httpx.Client) -> None:
    body = v3(emulator, client, image("m-demo0000001")).json()
    assert (body["PageNumber"], body["PageSize"]) == (1, 10)
    assert len(body["Accounts"]["Account"]) == 10


@pytest.mark.parametrize(
    ("name", "value"),
    [("PageSize", "0"), ("PageSize", "101"), ("PageSize", "ten"), ("PageNumber", "0")],
)
def test_page_bounds(emulator: Emulator, client: httpx.Client, name: str, value: str) -> None:
    body = assert_error(
        v3(emulator, client, image("m-demo0000001", **{name: value})), 400, "InvalidParameter"
    )
    assert name in body["Message"]


def test_page_size_100_is_allowed(emulator: Emulator, client: httpx.Client) -> None:
    body = v3(emulator, client, image("m-demo0000001", PageSize="100")).json()
    assert len(body["Accounts"]["Account"]) == 100


# --- Parameter errors --------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["RegionId", "ImageId"])
def test_missing_parameter(emulator: Emulator, client: httpx.Client, missing: str) -> None:
    params = image("m-demo0000001")
    del params[missing]
    body = assert_error(v3(emulator, client, params), 400, "MissingParameter")
    assert body["Message"] == (
        f'The input parameter "{missing} "that is mandatory for processing this request '
        "is not supplied."
    )


def test_unknown_region(emulator: Emulator, client: httpx.Client) -> None:
    body = assert_error(
        v3(emulator, client, {"RegionId": "xx-nowhere-1", "ImageId": "m-demo0000001"}),
        404,
        "InvalidRegionId.NotFound",
    )
    assert body["Message"] == "The specified RegionId does not exist."


def test_known_region_without_the_image(emulator: Emulator, client: httpx.Client) -> None:
    body = assert_error(
        v3(emulator, client, {"RegionId": "eu-central-1", "ImageId": "m-demo0000001"}),
        404,
        "InvalidImageId.NotFound",
    )
    assert body["Message"] == "The specified ImageId does not exist."


def test_other_actions_are_not_found(emulator: Emulator, client: httpx.Client) -> None:
    assert_error(
        v3(emulator, client, image("m-demo0000001"), action="DescribeImages"),
        404,
        "InvalidAction.NotFound",
    )


def test_other_versions_are_refused(emulator: Emulator, client: httpx.Client) -> None:
    assert_error(
        v3(emulator, client, image("m-demo0000001"), version="2016-03-14"), 400, "InvalidVersion"
    )


# --- Signature errors --------------------------------------------------------------------------


def test_v3_wrong_secret_echoes_the_string_to_sign(
    emulator: Emulator, client: httpx.Client
) -> None:
    params = image("m-demo0000001")
    response = v3(emulator, client, params, creds=Credentials(KEY_ID, "wrong"))
    body = assert_error(response, 400, "SignatureDoesNotMatch")
    prefix = "Specified signature is not matched with our calculation. server string to sign is:"
    assert body["Message"].startswith(prefix)
    sent = {k.lower(): v for k, v in response.request.headers.items()}
    expected, _ = signing.v3_string_to_sign(
        "GET",
        "/",
        params,
        {k: v for k, v in sent.items() if k != "authorization"},
        sent["x-acs-content-sha256"],
    )
    assert body["Message"] == prefix + expected


def test_v1_wrong_secret_echoes_the_string_to_sign(
    emulator: Emulator, client: httpx.Client
) -> None:
    response = v1(emulator, client, image("m-demo0000001"), creds=Credentials(KEY_ID, "wrong"))
    body = assert_error(response, 400, "SignatureDoesNotMatch")
    sent = dict(response.request.url.params)
    expected = signing.v1_string_to_sign("GET", sent)
    assert body["Message"].endswith("server string to sign is:" + expected)
    assert KEY_ID in body["Message"]


def test_v1_signature_covers_the_method(emulator: Emulator, client: httpx.Client) -> None:
    signed = signing.sign_v1(
        method="GET",
        action=ACTION,
        version=VERSION,
        params=image("m-demo0000001"),
        credentials=CREDS,
    )
    response = client.post(emulator.url + "/", params=signed)
    assert_error(response, 400, "SignatureDoesNotMatch")


def test_unknown_access_key(emulator: Emulator, client: httpx.Client) -> None:
    unknown = Credentials("LTAI5tUnknown", SECRET)
    assert_error(
        v3(emulator, client, image("m-demo0000001"), creds=unknown),
        404,
        "InvalidAccessKeyId.NotFound",
    )
    assert_error(
        v1(emulator, client, image("m-demo0000001"), creds=unknown),
        404,
        "InvalidAccessKeyId.NotFound",
    )


def _signed_v3_headers(emu: Emulator, params: dict[str, str]) -> dict[str, str]:
    return signing.sign_v3(
        method="GET",
        host=host(emu),
        action=ACTION,
        version=VERSION,
        query=params,
        credentials=CREDS,
    )


@pytest.mark.parametrize(
    "garble",
    [
        lambda h: h.update(Authorization="ACS3-HMAC-SHA256 Credential=x"),
        lambda h: h.update(Authorization=h["Authorization"].replace(",Signature=", ",Sig=")),
        lambda h: h.pop("x-acs-date"),
        lambda h: h.update({"x-acs-content-sha256": signing.EMPTY_SHA256[::-1]}),
        lambda h: h.update({"x-acs-extra": "not signed"}),
    ],
    ids=["credential-only", "no-signature", "no-date", "wrong-body-hash", "unsigned-x-acs"],
)
def test_v3_incomplete_signature(emulator: Emulator, client: httpx.Client, garble: Any) -> None:
    params = image("m-demo0000001")
    headers = _signed_v3_headers(emulator, params)
    garble(headers)
    response = client.get(emulator.url + "/", params=params, headers=headers)
    assert_error(response, 400, "IncompleteSignature")


def test_v3_host_must_be_signed(emulator: Emulator, client: httpx.Client) -> None:
    params = image("m-demo0000001")
    headers = _signed_v3_headers(emulator, params)
    headers["Authorization"] = headers["Authorization"].replace(
        "SignedHeaders=host;", "SignedHeaders="
    )
    response = client.get(emulator.url + "/", params=params, headers=headers)
    assert_error(response, 400, "IncompleteSignature")


@pytest.mark.parametrize(
    ("name", "value"), [("SignatureMethod", "HMAC-SHA256"), ("SignatureVersion", "2.0")]
)
def test_v1_incomplete_signature(
    emulator: Emulator, client: httpx.Client, name: str, value: str
) -> None:
    signed = signing.sign_v1(
        method="GET",
        action=ACTION,
        version=VERSION,
        params=image("m-demo0000001"),
        credentials=CREDS,
    )
    signed[name] = value
    assert_error(client.get(emulator.url + "/", params=signed), 400, "IncompleteSignature")


def test_unsigned_request(emulator: Emulator, client: httpx.Client) -> None:
    params = {"Action": ACTION, "Version": VERSION, **image("m-demo0000001")}
    assert_error(client.get(emulator.url + "/", params=params), 400, "IncompleteSignature")


def test_nonce_reuse_is_refused_per_access_key(emulator: Emulator, client: httpx.Client) -> None:
    params = image("m-demo0000002")
    assert v3(emulator, client, params, nonce="nonce-a").status_code == 200
    assert_error(v3(emulator, client, params, nonce="nonce-a"), 400, "SignatureNonceUsed")
    assert v1(emulator, client, params, nonce="nonce-b").status_code == 200
    assert_error(v1(emulator, client, params, nonce="nonce-b"), 400, "SignatureNonceUsed")
    other = Credentials("LTAI5tOtherKey", "other-secret")
    assert v3(emulator, client, params, nonce="nonce-a", creds=other).status_code == 200


def test_expired_timestamp(emulator: Emulator, client: httpx.Client) -> None:
    old = signing.utc_timestamp(datetime.now(UTC) - timedelta(minutes=16))
    future = signing.utc_timestamp(datetime.now(UTC) + timedelta(minutes=16))
    params = image("m-demo0000002")
    assert_error(v3(emulator, client, params, date=old), 400, "InvalidTimeStamp.Expired")
    assert_error(v1(emulator, client, params, timestamp=future), 400, "InvalidTimeStamp.Expired")
    within = signing.utc_timestamp(datetime.now(UTC) - timedelta(minutes=14))
    assert v3(emulator, client, params, date=within).status_code == 200


def test_garbled_timestamp(emulator: Emulator, client: httpx.Client) -> None:
    response = v1(emulator, client, image("m-demo0000002"), timestamp="yesterday")
    assert_error(response, 400, "IllegalTimestamp")


# --- STS credentials ---------------------------------------------------------------------------


def test_sts_credentials_need_their_token(emulator: Emulator, client: httpx.Client) -> None:
    store = emulator.credential_store
    store.add("STS.tmp", "sts-secret", security_token="sts-token", expires_at=time.time() + 60)
    try:
        params = image("m-demo0000002")
        good = Credentials("STS.tmp", "sts-secret", "sts-token")
        assert v3(emulator, client, params, creds=good).status_code == 200
        assert v1(emulator, client, params, creds=good).status_code == 200
        for bad in (
            Credentials("STS.tmp", "sts-secret"),
            Credentials("STS.tmp", "sts-secret", "x"),
        ):
            body = assert_error(
                v3(emulator, client, params, creds=bad),
                400,
                "InvalidSecurityToken.MismatchWithAccessKey",
            )
            assert "sts-token" not in body["Message"]
        store.add("STS.tmp", "sts-secret", security_token="sts-token", expires_at=time.time() - 1)
        assert_error(v3(emulator, client, params, creds=good), 400, "InvalidSecurityToken.Expired")
        store.remove("STS.tmp")
        assert_error(v3(emulator, client, params, creds=good), 404, "InvalidAccessKeyId.NotFound")
    finally:
        store.remove("STS.tmp")


def test_logs_carry_no_secrets(
    emulator: Emulator, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.credential_store.add("STS.log", "log-secret", security_token="log-token")
    try:
        with caplog.at_level(logging.DEBUG, logger="imageshare.emulator"):
            good = Credentials("STS.log", "log-secret", "log-token")
            v1(emulator, client, image("m-demo0000002"), creds=good)
            v1(emulator, client, image("m-demo0000002"), creds=Credentials("STS.log", "x", "y"))
            v3(emulator, client, image("m-demo0000002"), creds=good)
        assert caplog.records
        assert "log-secret" not in caplog.text
        assert "log-token" not in caplog.text
        assert "Signature=" not in caplog.text
    finally:
        emulator.credential_store.remove("STS.log")


# --- Knobs ------------------------------------------------------------------------------------


def test_throttle_next(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.throttle_next(2)
    for _ in range(2):
        body = assert_error(v3(emulator, client, image("m-demo0000002")), 400, "Throttling.User")
        assert body["Message"] == "Request was denied due to user flow control."
    assert v3(emulator, client, image("m-demo0000002")).status_code == 200


def test_qps_limit(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.set(qps_limit=2)
    # Three calls fit in one second window unless the second boundary falls between them;
    # retry the burst until it lands inside one window.
    for _ in range(5):
        codes = [v3(emulator, client, image("m-demo0000002")).status_code for _ in range(3)]
        if codes.count(400):
            break
    assert codes.count(400) >= 1
    assert emulator.knobs.counters()["outcomes"]["Throttling.User"] >= 1


def test_error_rate(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.set(error_rate=1.0)
    statuses = set()
    for _ in range(12):
        response = v3(emulator, client, image("m-demo0000002"))
        code = response.json()["Code"]
        assert (response.status_code, code) in {(503, "ServiceUnavailable"), (500, "InternalError")}
        statuses.add(response.status_code)
    assert statuses == {500, 503}
    with pytest.raises(ValueError, match="error_rate"):
        emulator.knobs.set(error_rate=1.5)


def test_latency(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.set(latency_ms=150)
    started = time.monotonic()
    assert v3(emulator, client, image("m-demo0000002")).status_code == 200
    assert time.monotonic() - started >= 0.15


def test_fault_reset(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.fault("reset", count=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        v3(emulator, client, image("m-demo0000002"))
    assert v3(emulator, client, image("m-demo0000002")).status_code == 200
    assert emulator.knobs.counters()["outcomes"]["fault:reset"] == 1


def test_fault_truncated(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.fault("truncated", count=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        v3(emulator, client, image("m-demo0000001"))
    assert v3(emulator, client, image("m-demo0000001")).status_code == 200


def test_fault_malformed(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.fault("malformed", count=1)
    response = v3(emulator, client, image("m-demo0000001"))
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_fault_slow_body(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.fault("slow_body", count=1, interval_ms=30)
    started = time.monotonic()
    response = v3(emulator, client, image("m-demo0000001"))
    assert response.json()["TotalCount"] == 137
    assert time.monotonic() - started >= 0.25
    emulator.knobs.fault("slow_body", count=1, interval_ms=300)
    with (
        httpx.Client(timeout=httpx.Timeout(5, read=0.2)) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        v3(emulator, impatient, image("m-demo0000001"))


@pytest.mark.parametrize(
    ("code", "status"),
    [("Forbidden.RAM", 403), ("SignatureDoesNotMatch", 400), ("InternalError", 500)],
)
def test_fault_error_code(emulator: Emulator, client: httpx.Client, code: str, status: int) -> None:
    emulator.knobs.fault("error_code", count=2, code=code, status=status)
    for _ in range(2):
        assert_error(v3(emulator, client, image("m-demo0000002")), status, code)
    assert v3(emulator, client, image("m-demo0000002")).status_code == 200
    assert emulator.knobs.counters()["outcomes"][code] == 2


def test_fault_at_a_rate(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.fault("error_code", rate=1.0, code="Throttling", status=400)
    for _ in range(3):
        assert_error(v3(emulator, client, image("m-demo0000002")), 400, "Throttling")
    emulator.knobs.clear_faults()
    assert v3(emulator, client, image("m-demo0000002")).status_code == 200


def test_fault_arguments_are_checked(emulator: Emulator) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        emulator.knobs.fault("explode", count=1)
    with pytest.raises(ValueError, match="exactly one"):
        emulator.knobs.fault("reset")


def test_down(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.set(down=True)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        v3(emulator, client, image("m-demo0000002"))
    with EmulatorAdmin(emulator.url) as admin:
        assert admin.settings()["down"] is True
        admin.set(down=False)
    assert v3(emulator, client, image("m-demo0000002")).status_code == 200


def test_change_after(emulator: Emulator, client: httpx.Client) -> None:
    emulator.knobs.upsert_image(
        {"region_id": "cn-hangzhou", "image_id": "m-changing", "accounts": [{"aliyun_id": "1"}]}
    )
    try:
        emulator.knobs.change_after(
            "cn-hangzhou", "m-changing", 2, [{"aliyun_id": "2"}, {"aliyun_id": "3"}]
        )
        totals = [v3(emulator, client, image("m-changing")).json()["TotalCount"] for _ in range(3)]
        assert totals == [1, 1, 2]
    finally:
        emulator.knobs.delete_image("cn-hangzhou", "m-changing")


def test_modify_share_adds_and_removes_accounts_and_groups(
    emulator: Emulator, client: httpx.Client
) -> None:
    knobs = emulator.knobs
    knobs.upsert_image(
        {
            "region_id": "cn-hangzhou",
            "image_id": "m-modified",
            "accounts": [
                {"aliyun_id": "1", "shared_time": "2025-01-01T00:00:00Z"},
                {"aliyun_id": "2"},
            ],
        }
    )
    try:
        changed = knobs.modify_share(
            "cn-hangzhou",
            "m-modified",
            add_accounts=["3", {"aliyun_id": "1", "shared_time": "2026-02-02T00:00:00Z"}],
            remove_accounts=["2"],
            add_groups=["all"],
        )
        assert changed is not None
        body = v3(emulator, client, image("m-modified")).json()
        shares = body["Accounts"]["Account"]
        assert [a["AliyunId"] for a in shares] == ["1", "3"]
        assert shares[0]["SharedTime"] == "2026-02-02T00:00:00Z"  # re-shared: the new time
        assert shares[1]["SharedTime"]  # a new share is stamped with the current time
        assert [g["Group"] for g in body["ShareGroups"]["ShareGroup"]] == ["all"]
        with EmulatorAdmin(emulator.url) as admin:
            after = admin.modify_share(
                "cn-hangzhou", "m-modified", remove_accounts=["1"], remove_groups=["all"]
            )
            assert after is not None
            assert [a["aliyun_id"] for a in after["accounts"]] == ["3"]
            assert after["share_groups"] == []
            assert admin.modify_share("cn-hangzhou", "m-nosuchimage", add_groups=["all"]) is None
        assert v3(emulator, client, image("m-modified")).json()["TotalCount"] == 1
    finally:
        knobs.delete_image("cn-hangzhou", "m-modified")


# --- Counters ----------------------------------------------------------------------------------


def test_counters(emulator: Emulator, client: httpx.Client) -> None:
    v3(emulator, client, image("m-demo0000001", PageNumber="2", PageSize="100"))
    v3(emulator, client, image("m-demo0000001", PageNumber="2", PageSize="100"))
    v1(emulator, client, image("m-demo0000001"))
    v1(emulator, client, image("m-missing"))
    v3(emulator, client, image("m-demo0000001"), action="DescribeImages")
    counters = emulator.knobs.counters()
    assert counters["calls_by_action"] == {ACTION: 4, "DescribeImages": 1}
    assert counters["total"] == 5
    assert emulator.knobs.page_calls("m-demo0000001", 2, 100) == 2
    assert emulator.knobs.page_calls("m-demo0000001", 1, 10) == 1
    assert counters["outcomes"] == {
        "Success": 3,
        "InvalidImageId.NotFound": 1,
        "InvalidAction.NotFound": 1,
    }
    assert counters["signature_versions"] == {"v3": 3, "v1": 2}
    assert len(counters["nonces"]) == len(set(counters["nonces"])) == 5
    assert counters["in_flight"] == 0
    emulator.knobs.reset()
    assert emulator.knobs.counters()["total"] == 0
    assert emulator.knobs.counters()["nonces"] == []


async def test_200_concurrent_callers_with_latency(emulator: Emulator) -> None:
    # Long enough that even a client slowed down by a loaded machine has many requests
    # in flight at once if (and only if) the emulator serves them concurrently.
    emulator.knobs.set(latency_ms=200)
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
    async with httpx.AsyncClient(timeout=30, limits=limits) as aclient:

        async def call() -> int:
            params = image("m-demo0000002")
            headers = _signed_v3_headers(emulator, params)
            response = await aclient.get(emulator.url + "/", params=params, headers=headers)
            return response.status_code

        statuses = await asyncio.gather(*(call() for _ in range(200)))
    assert statuses == [200] * 200
    counters = emulator.knobs.counters()
    # The client shares two busy cores with the server, so it cannot keep all 200 requests
    # in flight at once; what matters is that they overlap (the emulator counts the
    # requests it holds at once, so no wall-clock bound is needed) and none is refused.
    assert counters["max_in_flight"] >= 20


def test_in_flight_maximum(emulator: Emulator) -> None:
    emulator.knobs.set(latency_ms=200)
    barrier = threading.Barrier(5)

    def call() -> None:
        with httpx.Client(timeout=10) as c:
            barrier.wait()
            assert v3(emulator, c, image("m-demo0000002")).status_code == 200

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert emulator.knobs.counters()["max_in_flight"] >= 3


# --- Admin HTTP API ----------------------------------------------------------------------------


def test_admin_http_api(emulator: Emulator, client: httpx.Client) -> None:
    with EmulatorAdmin(emulator.url) as admin:
        assert admin.health() == {"url": emulator.url}
        admin.throttle_next(1)
        assert_error(v3(emulator, client, image("m-demo0000002")), 400, "Throttling.User")
        admin.fault("error_code", count=1, code="Forbidden.RAM", status=403)
        assert_error(v3(emulator, client, image("m-demo0000002")), 403, "Forbidden.RAM")
        admin.set(latency_ms=5, qps_limit=1000)
        assert admin.settings()["latency_ms"] == 5
        admin.upsert_image(
            {"region_id": "me-east-1", "image_id": "m-admin", "accounts": [{"aliyun_id": "7"}]}
        )
        admin.change_after("me-east-1", "m-admin", 1, [])
        params = {"RegionId": "me-east-1", "ImageId": "m-admin"}
        assert v3(emulator, client, params).json()["TotalCount"] == 1
        assert v3(emulator, client, params).json()["TotalCount"] == 0
        assert admin.delete_image("me-east-1", "m-admin") is True
        admin.add_credentials("STS.admin", "admin-secret", "admin-token", time.time() + 60)
        sts = Credentials("STS.admin", "admin-secret", "admin-token")
        assert v3(emulator, client, image("m-demo0000002"), creds=sts).status_code == 200
        admin.remove_credentials("STS.admin")
        assert_error(
            v3(emulator, client, image("m-demo0000002"), creds=sts),
            404,
            "InvalidAccessKeyId.NotFound",
        )
        counters = admin.counters()
        assert counters["calls_by_action"][ACTION] == 6
        assert admin.page_calls("m-admin", 1, 10) == 2
        admin.reset()
        assert admin.counters()["total"] == 0
        with pytest.raises(EmulatorAdminError, match="no admin operation"):
            admin._call("explode")
        with pytest.raises(EmulatorAdminError, match="bad arguments"):
            admin._call("add_credentials", access_key_id="k", secret="s", nonsense=1)


def test_admin_errors_do_not_echo_secrets(emulator: Emulator, client: httpx.Client) -> None:
    response = client.post(
        emulator.url + "/_emulator/add_credentials",
        json={"access_key_id": "k", "secret": "do-not-echo", "bogus": True},
    )
    assert response.status_code == 400
    assert "do-not-echo" not in response.text


# --- Data --------------------------------------------------------------------------------------


def test_demo_data_is_deterministic() -> None:
    first, second = demo_data(), demo_data()
    one = first.get("cn-hangzhou", "m-demo0000001")
    assert one is not None
    assert one == second.get("cn-hangzhou", "m-demo0000001")
    assert len(one.accounts) == 137
    assert all(a.shared_time for a in one.accounts)
    public = first.get("cn-hangzhou", "m-demo0000002")
    assert public is not None
    assert public.share_groups == ("all",)
    assert len(public.accounts) == 2


def write_data(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "images": [
                    {
                        "region_id": "rus-west-1",
                        "image_id": "m-fromfile",
                        "accounts": [
                            {"aliyun_id": "1111", "shared_time": "2025-01-01T00:00:00Z"},
                            {"aliyun_id": "2222"},
                        ],
                        "share_groups": ["all"],
                    }
                ]
            }
        )
    )
    return path


def test_data_file(tmp_path: Path, client: httpx.Client) -> None:
    data = load_data(write_data(tmp_path / "data.json"))
    assert isinstance(data, EmulatorData)
    assert data.has_region("rus-west-1")
    assert data.has_region("cn-hangzhou")
    with Emulator(data=data, credentials={KEY_ID: SECRET}) as emu:
        body = v3(emu, client, {"RegionId": "rus-west-1", "ImageId": "m-fromfile"}).json()
        assert body["Accounts"]["Account"] == [
            {"AliyunId": "1111", "SharedTime": "2025-01-01T00:00:00Z"},
            {"AliyunId": "2222"},
        ]
        assert_error(v3(emu, client, image("m-demo0000001")), 404, "InvalidImageId.NotFound")


def test_bad_data_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"image_id": "m-x"}]}))
    with pytest.raises(ValueError, match="invalid image"):
        load_data(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="images"):
        load_data(bad)


def test_credentials_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "LTAI5tFromEnv")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "env-secret")
    assert Emulator().credential_store.key_ids() == ["LTAI5tFromEnv"]
    monkeypatch.delenv("ALIBABA_CLOUD_ACCESS_KEY_ID")
    assert Emulator().credential_store.key_ids() == ["LTAI5tDemoAccessKeyId"]


# --- CLI ---------------------------------------------------------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """The next stderr line, failing instead of hanging when the process says nothing."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
        if ready:
            return proc.stderr.readline()
    raise AssertionError("no line from the emulator process")


@pytest.mark.subprocess
def test_cli_runs_until_sigterm(tmp_path: Path, client: httpx.Client) -> None:
    """The ``imageshare-emulator`` command itself: its ready line on stderr, ``--data``, the
    credentials from its environment, and exit code 0 on SIGTERM need a process of its own."""
    data_file = write_data(tmp_path / "data.json")
    env = {
        "PATH": "/usr/bin:/bin",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imageshare_emulator.cli",
            "--listen",
            "127.0.0.1:0",
            "--data",
            str(data_file),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = json.loads(read_line(proc))
        assert ready["event"] == "emulator_listening"
        url = ready["url"]
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        params = {"RegionId": "rus-west-1", "ImageId": "m-fromfile"}
        headers = signing.sign_v3(
            method="GET",
            host=f"127.0.0.1:{port}",
            action=ACTION,
            version=VERSION,
            query=params,
            credentials=CREDS,
        )
        assert client.get(url + "/", params=params, headers=headers).json()["TotalCount"] == 2
        with EmulatorAdmin(url) as admin:
            assert admin.counters()["outcomes"] == {"Success": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        rest = proc.stderr.read()
        assert SECRET not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.subprocess
def test_cli_rejects_a_bad_data_file(tmp_path: Path) -> None:
    """The command's exit code (2) and its last stderr line: only a process has them."""
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    result = subprocess.run(
        [sys.executable, "-m", "imageshare_emulator.cli", "--data", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert json.loads(result.stderr.strip().splitlines()[-1])["event"] == "emulator_failed"


def test_stop_hangs_up_on_kept_alive_clients() -> None:
    emu = Emulator(credentials={KEY_ID: SECRET})
    emu.start()
    with httpx.Client(timeout=5) as keep_alive:
        assert v3(emu, keep_alive, image("m-demo0000002")).status_code == 200
        emu.stop()
        with pytest.raises(httpx.TransportError):
            v3(emu, keep_alive, image("m-demo0000002"))
