"""Request validation: everything a caller sends is checked before any upstream call.

The rules themselves live in ``core.rules``; this module applies them to
the protobuf request and names every field that breaks one.
"""

from __future__ import annotations

from imageshare.v1 import image_share_pb2
from imageshare_server.core.errors import FieldViolation, InvalidRequestError
from imageshare_server.core.rules import (
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


def validate(request: image_share_pb2.ListImageSharesRequest) -> ShareQuery:
    """Return the validated query or raise ``InvalidRequestError`` naming every bad field."""
    violations: list[FieldViolation] = []
    if not request.region_id:
        violations.append(FieldViolation("region_id", "required, e.g. cn-hangzhou"))
    elif not is_region_id(request.region_id):
        violations.append(FieldViolation("region_id", f"must be {REGION_RULE}"))
    if not request.image_id:
        violations.append(FieldViolation("image_id", "required, e.g. m-bp1caf3yicx5jlfl0000"))
    elif not IMAGE_PATTERN.fullmatch(request.image_id):
        violations.append(FieldViolation("image_id", f"must be {IMAGE_RULE}"))
    if request.owner_account and not OWNER_ACCOUNT_PATTERN.fullmatch(request.owner_account):
        violations.append(FieldViolation("owner_account", f"must be {OWNER_ACCOUNT_RULE}"))
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        violations.append(
            FieldViolation(
                "page_size", f"must be between 1 and {MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}"
            )
        )
    if violations:
        raise InvalidRequestError(violations)
    return ShareQuery(
        key=ShareKey(request.region_id, request.image_id, request.owner_account),
        page_size=request.page_size or DEFAULT_PAGE_SIZE,
        bypass_cache=request.bypass_cache,
    )
