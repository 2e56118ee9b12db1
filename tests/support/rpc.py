"""Small helpers to call ListImageShares and read rich error details."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc

Request = image_share_pb2.ListImageSharesRequest
Response = image_share_pb2.ListImageSharesResponse


@dataclass
class Details:
    code: grpc.StatusCode
    message: str
    error_info: error_details_pb2.ErrorInfo | None = None
    bad_request: error_details_pb2.BadRequest | None = None
    retry_info: error_details_pb2.RetryInfo | None = None
    trailing: dict[str, str] = field(default_factory=dict)


def details(error: grpc.RpcError) -> Details:
    """Rich details of a sync (``grpc.Call``) or asyncio (``AioRpcError``) failure."""
    assert isinstance(error, grpc.Call | grpc.aio.AioRpcError)
    out = Details(error.code(), error.details() or "")
    status = None
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            status = status_pb2.Status.FromString(value)
        elif isinstance(value, str):
            out.trailing[key] = value
    for any_detail in status.details if status else []:
        for kind, attr in (
            (error_details_pb2.ErrorInfo, "error_info"),
            (error_details_pb2.BadRequest, "bad_request"),
            (error_details_pb2.RetryInfo, "retry_info"),
        ):
            if any_detail.Is(kind.DESCRIPTOR):  # type: ignore[arg-type]
                message = kind()
                any_detail.Unpack(message)
                setattr(out, attr, message)
    return out


def list_all(
    stub: image_share_pb2_grpc.ImageShareServiceStub, timeout: float = 10.0, **fields: object
) -> list[Response]:
    return list(stub.ListImageShares(Request(**fields), timeout=timeout))  # type: ignore[arg-type]


def list_error(
    stub: image_share_pb2_grpc.ImageShareServiceStub, timeout: float = 10.0, **fields: object
) -> Details:
    try:
        list_all(stub, timeout=timeout, **fields)
    except grpc.RpcError as exc:
        return details(exc)
    raise AssertionError("the call succeeded")


def account_ids(messages: list[Response]) -> list[str]:
    return [a.aliyun_id for m in messages for a in m.accounts]
