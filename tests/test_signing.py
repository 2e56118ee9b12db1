"""The signer against the official vectors and, for random input, against the official SDK.

The SDK (``alibabacloud_tea_openapi``) is a test-only oracle: if our canonicalisation drifts
from what the SDK sends, ECS would reject our calls, and these tests say so first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from alibabacloud_tea_openapi.utils import Utils as SdkUtils
from alibabacloud_tea_openapi.utils import get_canonicalized_headers
from hypothesis import given, settings
from hypothesis import strategies as st

from imageshare_server.core.credentials import Credentials
from imageshare_server.upstream import signing


@dataclass
class SdkRequest:
    """The attributes of a darabonba request that the SDK's signer reads."""

    method: str
    query: dict[str, str]
    headers: dict[str, str]
    pathname: str = "/"
    body: bytes = field(default=b"")


# --- Official vectors (upstream-facts.md section 3) -------------------------------------------


def test_v3_documentation_example() -> None:
    headers = signing.sign_v3(
        method="POST",
        host="ecs.cn-shanghai.aliyuncs.com",
        action="RunInstances",
        version="2014-05-26",
        query={
            "ImageId": "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
            "RegionId": "cn-shanghai",
        },
        credentials=Credentials("YourAccessKeyId", "YourAccessKeySecret"),
        date="2023-10-26T10:22:32Z",
        nonce="3156853299f313e23d1673dc12e1703d",
    )
    string_to_sign, signed = signing.v3_string_to_sign(
        "POST",
        "/",
        {
            "ImageId": "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
            "RegionId": "cn-shanghai",
        },
        {k: v for k, v in headers.items() if k != "Authorization"},
        signing.EMPTY_SHA256,
    )
    assert (
        signed
        == "host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version"
    )
    assert string_to_sign == (
        "ACS3-HMAC-SHA256\n7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
    )
    assert headers["Authorization"] == (
        "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders="
        "host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,"
        "Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
    )


def test_v3_sdk_vector_merges_duplicate_header_names() -> None:
    string_to_sign, signed = signing.v3_string_to_sign(
        "GET",
        "/",
        {"test": "ok", "empty": ""},
        [("x-acs-test", "http"), ("x-acs-TEST", "https")],
        "55e12e91650d2fec56ec74e1d3e4ddbfce2ef3a65890c2a19ecf88a307e76a23",
    )
    assert signed == "x-acs-test"
    assert signing.v3_signature("secret", string_to_sign) == (
        "d16b30a7699ae9e43875b13195b2f81bcc3ed10c14a9b5eb780e51619aa50be1"
    )


def test_v1_documentation_example() -> None:
    params = {
        "AccessKeyId": "testid",
        "Action": "DescribeRegions",
        "Format": "XML",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
        "SignatureVersion": "1.0",
        "Timestamp": "2016-02-23T12:46:24Z",
        "Version": "2014-05-26",
    }
    string_to_sign = signing.v1_string_to_sign("GET", params)
    assert string_to_sign == (
        "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML"
        "%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"
        "%26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z"
        "%26Version%3D2014-05-26"
    )
    assert signing.v1_signature("testsecret", string_to_sign) == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
    signed = signing.sign_v1(
        method="GET",
        action="DescribeRegions",
        version="2014-05-26",
        params={},
        credentials=Credentials("testid", "testsecret"),
        timestamp="2016-02-23T12:46:24Z",
        nonce="3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
        response_format="XML",
    )
    assert signed["Signature"] == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="


def test_v1_sdk_vector() -> None:
    string_to_sign = signing.v1_string_to_sign("GET", {"query": "test", "body": "test"})
    assert signing.v1_signature("secret", string_to_sign) == "XlUyV4sXjOuX5FnjUz9IF9tm5rU="


def test_v1_signature_parameter_itself_is_not_signed() -> None:
    params = {"query": "test", "body": "test"}
    assert signing.v1_string_to_sign("GET", {**params, "Signature": "x"}) == (
        signing.v1_string_to_sign("GET", params)
    )


# --- Encoding rules ---------------------------------------------------------------------------


def test_percent_encoding_follows_rfc3986() -> None:
    assert signing.percent_encode("a b+c*d~e/f@g") == "a%20b%2Bc%2Ad~e%2Ff%40g"
    assert signing.percent_encode("-_.~AZaz09") == "-_.~AZaz09"
    assert signing.percent_encode("é") == "%C3%A9"
    assert signing.canonical_query([("b", ""), ("a", "1")]) == "a=1&b="


# --- Nonce and STS ----------------------------------------------------------------------------


def test_every_signature_gets_a_fresh_nonce() -> None:
    creds = Credentials("ak", "secret")
    v3 = {
        signing.sign_v3(
            method="GET",
            host="h",
            action="A",
            version="v",
            query={},
            credentials=creds,
        )["x-acs-signature-nonce"]
        for _ in range(50)
    }
    v1 = {
        signing.sign_v1(method="GET", action="A", version="v", params={}, credentials=creds)[
            "SignatureNonce"
        ]
        for _ in range(50)
    }
    assert len(v3) == 50
    assert len(v1) == 50


def test_sts_token_is_sent_and_signed() -> None:
    creds = Credentials("STS.ak", "secret", "token-value")
    headers = signing.sign_v3(
        method="GET", host="h", action="A", version="v", query={}, credentials=creds
    )
    assert headers["x-acs-security-token"] == "token-value"
    assert "x-acs-security-token" in headers["Authorization"].split("SignedHeaders=")[1]
    params = signing.sign_v1(method="GET", action="A", version="v", params={}, credentials=creds)
    assert params["SecurityToken"] == "token-value"
    unsigned = {k: v for k, v in params.items() if k != "Signature"}
    assert params["Signature"] == SdkUtils.get_rpcsignature(unsigned, "GET", "secret")


def test_permanent_credentials_send_no_token() -> None:
    creds = Credentials("ak", "secret")
    headers = signing.sign_v3(
        method="GET", host="h", action="A", version="v", query={}, credentials=creds
    )
    params = signing.sign_v1(method="GET", action="A", version="v", params={}, credentials=creds)
    assert "x-acs-security-token" not in headers
    assert "SecurityToken" not in params


# --- Property tests against the official SDK --------------------------------------------------

# Characters that break naive encoders, plus anything else Unicode has (lone surrogates are
# excluded: they cannot be UTF-8 encoded, so no HTTP client can send them).
NO_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
tricky = st.sampled_from(list("+@~*/ %&=?#-_.!'()é中\t"))
values = st.lists(
    st.one_of(tricky, st.characters(exclude_categories=NO_SURROGATES)), max_size=12
).map("".join)
# The SDK's V3 canonical query leaves parameter *names* unencoded (ECS names are plain
# identifiers), so V3 names are drawn from the unreserved set where both spellings agree.
v3_names = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~",
    min_size=1,
    max_size=12,
)
v1_names = st.lists(
    st.one_of(tricky, st.characters(exclude_categories=NO_SURROGATES)), min_size=1, max_size=12
).map("".join)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
)
secrets_ = st.text(st.characters(exclude_categories=NO_SURROGATES), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST"]),
    query=st.dictionaries(v3_names, values, max_size=6),
    body=st.binary(max_size=64),
    token=st.none() | header_values,
    secret=secrets_,
)
def test_v3_matches_official_sdk(
    method: str, query: dict[str, str], body: bytes, token: str | None, secret: str
) -> None:
    creds = Credentials("ak-id", secret, token)
    headers = signing.sign_v3(
        method=method,
        host="ecs.cn-hangzhou.aliyuncs.com",
        action="DescribeImageSharePermission",
        version="2014-05-26",
        query=query,
        credentials=creds,
        body=body,
        content_type="application/x-www-form-urlencoded" if body else None,
    )
    sdk_headers = {k: v for k, v in headers.items() if k != "Authorization"}
    expected = SdkUtils.get_authorization(
        SdkRequest(method=method, query=dict(query), headers=sdk_headers),
        "ACS3-HMAC-SHA256",
        hashlib.sha256(body).hexdigest(),
        "ak-id",
        secret,
    )
    assert headers["Authorization"] == expected


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST"]),
    params=st.dictionaries(v1_names, values, max_size=6),
    token=st.none() | header_values,
    secret=secrets_,
)
def test_v1_matches_official_sdk(
    method: str, params: dict[str, str], token: str | None, secret: str
) -> None:
    signed = signing.sign_v1(
        method=method,
        action="DescribeImageSharePermission",
        version="2014-05-26",
        params=params,
        credentials=Credentials("ak-id", secret, token),
    )
    unsigned = {k: v for k, v in signed.items() if k != "Signature"}
    assert signed["Signature"] == SdkUtils.get_rpcsignature(unsigned, method, secret)


@settings(max_examples=100, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["x-acs-a", "X-ACS-A", "x-Acs-a", "x-acs-b", "host"]), header_values
    )
)
def test_canonical_headers_match_sdk(headers: dict[str, str]) -> None:
    """Duplicate names in different case merge exactly like the SDK merges them."""
    assert signing.canonical_headers(headers) == get_canonicalized_headers(headers)
