"""Request validation: everything a caller sends is checked before any upstream call.

The rules themselves live in ``core.rules``; this module applies them to
the protobuf requests and names every field that breaks one.
"""

from __future__ import annotations

from dataclasses import dataclass

from imageshare.v1 import image_share_pb2
from imageshare_server.core.errors import FieldViolation, InvalidRequestError
from imageshare_server.core.rules import (
    ALIYUN_ID_PATTERN,
    ALIYUN_ID_RULE,
    DEFAULT_PAGE_SIZE,
    IMAGE_PATTERN,
    IMAGE_RULE,
    MAX_PAGE_SIZE,
    OWNER_ACCOUNT_PATTERN,
    OWNER_ACCOUNT_RULE,
    REGION_RULE,
    is_region_id,
)
from imageshare_server.core.types import ShareKey, ShareQuery


@dataclass(frozen=True, slots=True)
class CheckQuery:
    """A validated CheckImageShare request: the list to read and the account to look up."""

    query: ShareQuery
    aliyun_id: str


def _key(
    region_id: str, image_id: str, owner_account: str, violations: list[FieldViolation]
) -> ShareKey:
    if not region_id:
        violations.append(FieldViolation("region_id", "required, e.g. cn-hangzhou"))
    elif not is_region_id(region_id):
        violations.append(FieldViolation("region_id", f"must be {REGION_RULE}"))
    if not image_id:
        violations.append(FieldViolation("image_id", "required, e.g. m-bp1caf3yicx5jlfl0000"))
    elif not IMAGE_PATTERN.fullmatch(image_id):
        violations.append(FieldViolation("image_id", f"must be {IMAGE_RULE}"))
    if owner_account and not OWNER_ACCOUNT_PATTERN.fullmatch(owner_account):
        violations.append(FieldViolation("owner_account", f"must be {OWNER_ACCOUNT_RULE}"))
    return ShareKey(region_id, image_id, owner_account)


# Valid queries seen lately, by the request's fields: the same few are asked again and
# again, and a hit skips the rules and two objects. Only valid queries go in, and the
# table is emptied when full, so made-up requests cannot grow it.
_VALID: dict[tuple[str, str, str, int, bool], ShareQuery] = {}
_MAX_VALID = 4096


def validate(request: image_share_pb2.ListImageSharesRequest) -> ShareQuery:
    """Return the validated query or raise ``InvalidRequestError`` naming every bad field."""
    fields = (
        request.region_id,
        request.image_id,
        request.owner_account,
        request.page_size,
        request.bypass_cache,
    )
    query = _VALID.get(fields)
    if query is None:
        query = _validate(request)
        if len(_VALID) >= _MAX_VALID:
            _VALID.clear()
        _VALID[fields] = query
    return query


def _validate(request: image_share_pb2.ListImageSharesRequest) -> ShareQuery:
    violations: list[FieldViolation] = []
    key = _key(request.region_id, request.image_id, request.owner_account, violations)
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        violations.append(
            FieldViolation(
                "page_size", f"must be between 1 and {MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}"
            )
        )
    if violations:
        raise InvalidRequestError(violations)
    return ShareQuery(
        key=key,
        page_size=request.page_size or DEFAULT_PAGE_SIZE,
        bypass_cache=request.bypass_cache,
    )


def validate_check(request: image_share_pb2.CheckImageShareRequest) -> CheckQuery:
    """The validated check, or ``InvalidRequestError`` naming every bad field."""
    violations: list[FieldViolation] = []
    key = _key(request.region_id, request.image_id, request.owner_account, violations)
    if not request.aliyun_id:
        violations.append(FieldViolation("aliyun_id", "required, e.g. 1234567890123456"))
    elif not ALIYUN_ID_PATTERN.fullmatch(request.aliyun_id):
        violations.append(FieldViolation("aliyun_id", f"must be {ALIYUN_ID_RULE}"))
    if violations:
        raise InvalidRequestError(violations)
    query = ShareQuery(key=key, page_size=MAX_PAGE_SIZE, bypass_cache=request.bypass_cache)
    return CheckQuery(query, request.aliyun_id)


def validate_watch(request: image_share_pb2.WatchImageSharesRequest) -> ShareKey:
    """The validated key to watch, or ``InvalidRequestError`` naming every bad field."""
    violations: list[FieldViolation] = []
    key = _key(request.region_id, request.image_id, request.owner_account, violations)
    if violations:
        raise InvalidRequestError(violations)
    return key
