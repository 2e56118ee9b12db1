"""Property tests: whatever a caller sends, the answer is deliberate and invalid input stays home.

Every request field is drawn from valid values, valid-looking unknown values
and hostile text (control characters, NUL, bidi overrides, huge strings).
The oracle is independent of ``validation.py``: it only knows which
characters may reach a host name or a query string, so a loosened pattern
fails here even if the validator agrees with itself.

The app runs in this process against the in-process emulator, whose counters say
whether a request reached the upstream; one channel serves every example.
"""

from __future__ import annotations

import re
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import Emulator
from tests.support.inprocess import running
from tests.support.rpc import Request, details

REGION = "cn-hangzhou"
KNOWN_IMAGES = {"m-demo0000001": 137, "m-demo0000002": 2, "m-demo0000003": 0}
FIELDS = {"region_id", "image_id", "owner_account", "page_size"}
HOSTILE = [
    "",
    " ",
    "\x00",
    "cn-hangzhou\x00",
    "\u202ecn-hangzhou",  # right-to-left override
    "cn-hangzhou\u200f",  # right-to-left mark
    "cn-hangzhou\n",
    "cn-hangzhou.evil.example",
    "cn-hangzhou@evil.example",
    "cn-hangzhou:443",
    "cn-hangzhou/../x",
    "cn%2Dhangzhou",
    "\uff43\uff4e-hangzhou",  # full-width letters
    "cn-hangzh\u043eu",  # Cyrillic o
    "m-demo0000001\x00",
    "m-demo0000001?PageSize=1",
    "m-demo0000001&OwnerAccount=x",
    "m-" + "a" * 63,
    "x" * 5000,
]
HOSTILE_TEXT = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=1000, max_size=4000),
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=20),
)
REGIONS = st.one_of(
    st.just(REGION),
    st.from_regex(r"[a-z]{2,4}(-[a-z0-9]{1,20}){1,4}", fullmatch=True),
    HOSTILE_TEXT,
)
IMAGES = st.one_of(
    st.sampled_from(sorted(KNOWN_IMAGES)),
    st.from_regex(r"m-[A-Za-z0-9]{1,62}", fullmatch=True),
    HOSTILE_TEXT,
)
OWNERS = st.one_of(
    st.just(""),
    st.text(st.sampled_from(string.ascii_letters + string.digits + "@._-"), max_size=128),
    HOSTILE_TEXT,
)
PAGE_SIZES = st.one_of(
    st.sampled_from([0, 1, 50, 100, 101, -1, 2**31 - 1, -(2**31)]),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
HOST_SAFE = re.compile(r"[a-z0-9-]+")
QUERY_SAFE = re.compile(r"[A-Za-z0-9-]+")


def _must_be_refused(request: image_share_pb2.ListImageSharesRequest) -> set[str]:
    """Fields no correct validator may let through (a subset of what it refuses)."""
    bad = set()
    if not HOST_SAFE.fullmatch(request.region_id) or len(request.region_id) > 120:
        bad.add("region_id")
    if not request.image_id.startswith("m-") or not QUERY_SAFE.fullmatch(request.image_id):
        bad.add("image_id")
    if any(not ("!" <= c <= "~") for c in request.owner_account):
        bad.add("owner_account")
    if not 0 <= request.page_size <= 100:
        bad.add("page_size")
    return bad


@dataclass
class Fuzzed:
    """The app under test, one stub on it, and the emulator behind it."""

    stub: image_share_pb2_grpc.ImageShareServiceAsyncStub
    ecs: Emulator

    def upstream_calls(self) -> int:
        return int(self.ecs.knobs.counters()["total"])


@pytest.fixture
async def fuzzed(ecs: Emulator) -> AsyncIterator[Fuzzed]:
    async with running(ecs, "--cache-ttl", "0") as app:
        yield Fuzzed(app.stub(), ecs)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Random draws seldom get past validation: these reach the upstream on every run.
@example(REGION, "m-demo0000001", "", 0, False)  # two upstream pages, messages of 50
@example(REGION, "m-demo0000001", "", 1, True)
@example(REGION, "m-demo0000002", "ops.team@x-1", 100, False)
@example(REGION, "m-demo0000003", "", 7, False)  # shared with nobody: one empty message
@example(REGION, "m-doesnotexist0", "", 0, False)  # NOT_FOUND from the upstream
@example("cn-nowhere1", "m-demo0000001", "", 0, True)  # a region the upstream does not know
@given(
    region_id=REGIONS,
    image_id=IMAGES,
    owner_account=OWNERS,
    page_size=PAGE_SIZES,
    bypass_cache=st.booleans(),
)
async def test_any_request_gets_a_deliberate_answer(
    fuzzed: Fuzzed,
    region_id: str,
    image_id: str,
    owner_account: str,
    page_size: int,
    bypass_cache: bool,
) -> None:
    fuzzed.ecs.knobs.reset()
    request = Request(
        region_id=region_id,
        image_id=image_id,
        owner_account=owner_account,
        page_size=page_size,
        bypass_cache=bypass_cache,
    )
    must_refuse = _must_be_refused(request)
    try:
        messages = [m async for m in fuzzed.stub.ListImageShares(request, timeout=20)]
    except grpc.aio.AioRpcError as exc:
        error = details(exc)
        assert error.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error
        upstream_calls = fuzzed.upstream_calls()
        if error.error_info is not None and error.error_info.reason == "INVALID_REQUEST":
            assert error.code is grpc.StatusCode.INVALID_ARGUMENT
            assert error.bad_request is not None
            named = {v.field for v in error.bad_request.field_violations}
            assert named
            assert named <= FIELDS
            assert must_refuse <= named
            assert upstream_calls == 0, "invalid input reached the upstream"
            event("refused as invalid")
            return
        # Anything else came from the upstream: so the input was fit to send.
        assert not must_refuse, (must_refuse, error)
        assert upstream_calls >= 1
        assert error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), error
        if error.code is grpc.StatusCode.INVALID_ARGUMENT:
            # A well-formed region the upstream does not know.
            assert region_id != REGION
            assert error.error_info is not None
            assert error.error_info.reason == "INVALID_REGION_ID_NOT_FOUND"
        event(f"upstream answered {error.code.name}")
        return
    assert not must_refuse, must_refuse
    assert region_id == REGION
    assert image_id in KNOWN_IMAGES
    assert fuzzed.upstream_calls() >= 1
    total = KNOWN_IMAGES[image_id]
    accounts = [a.aliyun_id for m in messages for a in m.accounts]
    assert len(accounts) == len(set(accounts)) == total
    assert all(m.total_count == total for m in messages)
    cap = page_size or 50
    assert all(len(m.accounts) <= cap for m in messages)
    event("listed")


async def test_oversized_request_is_refused_and_the_server_keeps_serving(
    fuzzed: Fuzzed,
) -> None:
    huge = Request(region_id=REGION, image_id="m-" + "a" * (70 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [m async for m in fuzzed.stub.ListImageShares(huge, timeout=10)]
    assert details(caught.value).code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fuzzed.upstream_calls() == 0
    small = Request(region_id=REGION, image_id="m-demo0000002")
    messages = [m async for m in fuzzed.stub.ListImageShares(small, timeout=10)]
    assert [a.aliyun_id for m in messages for a in m.accounts] == [
        "1234567890123456",
        "1234567890654321",
    ]
