"""The documentation says what the code does: error reasons, the region rule, the layout.

Every reason the status table can produce is named in the proto's comment, the README's
error table and the Python client's error docstring; the region rule in the proto and
the README is the one validation applies.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

import imageshare_client
from imageshare_server.core import errors
from imageshare_server.core.rules import MAX_REGION_LENGTH, REGION_PATTERN
from imageshare_server.grpcapi import status

ROOT = Path(__file__).resolve().parent.parent
PROTO = (ROOT / "protos" / "imageshare" / "v1" / "image_share.proto").read_text()
README = (ROOT / "README.md").read_text()

SAMPLES: list[errors.ImageShareError] = [
    errors.InvalidRequestError([errors.FieldViolation("region_id", "required")]),
    errors.MalformedRequestError(),
    *(errors.UpstreamTransportError(kind, "x") for kind in ("timeout", "connection_error")),
    errors.UpstreamTransportError("malformed_response", "x"),
    errors.DeadlineExceededError("x"),
    errors.RateLimitedError(1.0),
    errors.UpstreamBusyError(8),
    errors.ListingUnstableError("x"),
    errors.ListingTimeoutError(30),
    errors.ShareListTooLargeError(60_000, 600, 30.0, 30.0),
    errors.OverloadedError(1000),
    errors.StreamStalledError(30),
    errors.TooManyWatchersError(10_000),
    errors.ShuttingDownError(),
]


def service_reasons() -> dict[str, grpc.StatusCode]:
    """Every reason of the service's own domain, with its code."""
    reasons: dict[str, grpc.StatusCode] = {}
    for error in SAMPLES:
        result = status.to_status(error)
        details = dict(result.trailing_metadata)["grpc-status-details-bin"]
        assert isinstance(details, bytes)
        for detail in status_pb2.Status.FromString(details).details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                assert info.domain == status.SERVICE_DOMAIN
                reasons[info.reason] = result.code
    reasons["INTERNAL"] = status.internal_error().code
    return reasons


def test_every_error_class_has_a_row_in_the_status_table() -> None:
    classes = {type(e) for e in SAMPLES} | {errors.UpstreamApiError}
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.ImageShareError):
            if cls in (errors.ImageShareError, errors.UpstreamError, errors.CredentialsUnavailable):
                continue  # a base, or a start-up failure that never reaches a caller
            assert cls in classes, f"{cls.__name__} is not in this test's samples"
            assert status.mapped(cls.__new__(cls)), f"{cls.__name__} has no status"


def test_every_service_reason_is_documented_with_its_code() -> None:
    client_doc = imageshare_client.ImageShareError.__doc__ or ""
    reasons = service_reasons()
    assert len(reasons) >= 14
    for reason, code in reasons.items():
        assert reason in client_doc, f"{reason} missing from the client's ImageShareError doc"
        if reason.startswith("UPSTREAM_") and code is grpc.StatusCode.UNAVAILABLE:
            assert "UPSTREAM_*" in PROTO
            assert "UPSTREAM_*" in README
            continue
        if reason in ("INTERNAL",):
            continue
        assert reason in PROTO, f"{reason} missing from the proto's error comment"
        rows = [line for line in README.splitlines() if reason in line and line.startswith("|")]
        assert rows, f"{reason} missing from the README's error table"
        assert any(f"`{code.name}`" in row for row in rows), f"{reason}: README says another code"


def test_the_region_rule_is_written_down_as_validation_applies_it() -> None:
    pattern = REGION_PATTERN.pattern
    for document in (PROTO, README):
        assert f"^{pattern.replace('(?:', '(')}$" in document
        assert f"{MAX_REGION_LENGTH} characters" in document
    assert MAX_REGION_LENGTH == 63  # one DNS label


def test_the_readme_layout_names_every_server_package() -> None:
    packages = sorted(
        p.parent.name for p in (ROOT / "server" / "imageshare_server").glob("*/__init__.py")
    )
    section = README.split("Layout", 1)[1]
    for package in packages:
        assert re.search(rf"\b{package}\b", section), f"README layout omits {package}"
