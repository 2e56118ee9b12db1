"""Request validation: everything a caller sends is checked before any upstream call.

The region becomes part of the upstream host name, so its pattern is strict
enough that no value can name another host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imageshare.v1 import image_share_pb2

REGION_PATTERN = re.compile(r"[a-z]{2,4}(?:-[a-z0-9]{1,20}){1,4}")
IMAGE_PATTERN = re.compile(r"m-[A-Za-z0-9]{1,62}")
# RAM login names: printable ASCII, no spaces (e.g. ECSforCloud@Alibaba.com).
OWNER_ACCOUNT_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequestError(Exception):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


@dataclass(frozen=True, slots=True)
class ShareKey:
    """What identifies a share list upstream, and so a cache entry."""

    region_id: str
    image_id: str
    owner_account: str = ""


@dataclass(frozen=True, slots=True)
class ShareQuery:
    key: ShareKey
    page_size: int
    bypass_cache: bool


def validate(request: image_share_pb2.ListImageSharesRequest) -> ShareQuery:
    """Return the validated query or raise ``InvalidRequestError`` naming every bad field."""
    violations: list[FieldViolation] = []
    if not request.region_id:
        violations.append(FieldViolation("region_id", "required, e.g. cn-hangzhou"))
    elif not REGION_PATTERN.fullmatch(request.region_id):
        violations.append(
            FieldViolation(
                "region_id",
                "must be a region id like cn-hangzhou: lower-case letters, digits and hyphens "
                "(pattern ^[a-z]{2,4}(-[a-z0-9]{1,20}){1,4}$)",
            )
        )
    if not request.image_id:
        violations.append(FieldViolation("image_id", "required, e.g. m-bp1caf3yicx5jlfl0000"))
    elif not IMAGE_PATTERN.fullmatch(request.image_id):
        violations.append(
            FieldViolation(
                "image_id", "must be a custom image id: m- then 1 to 62 letters or digits"
            )
        )
    if request.owner_account and not OWNER_ACCOUNT_PATTERN.fullmatch(request.owner_account):
        violations.append(
            FieldViolation(
                "owner_account", "must be 1 to 128 printable ASCII characters without spaces"
            )
        )
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        violations.append(
            FieldViolation("page_size", f"must be between 1 and {MAX_PAGE_SIZE}, or 0 for 50")
        )
    if violations:
        raise InvalidRequestError(violations)
    return ShareQuery(
        key=ShareKey(request.region_id, request.image_id, request.owner_account),
        page_size=request.page_size or DEFAULT_PAGE_SIZE,
        bypass_cache=request.bypass_cache,
    )
