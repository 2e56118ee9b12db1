"""The ``DescribeImageSharePermission`` action: parameter rules and the result page."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imageshare_emulator import errors
from imageshare_emulator.data import EmulatorData, Image

ACTION = "DescribeImageSharePermission"
API_VERSION = "2014-05-26"
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 10


def _int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.invalid_parameter(name, raw) from None
    if not low <= value <= high:
        raise errors.invalid_parameter(name, raw)
    return value


def page_params(params: Mapping[str, str]) -> tuple[int, int]:
    """(PageNumber, PageSize) with the ECS defaults and bounds."""
    number = _int_param(params, "PageNumber", 1, 1, 2**31 - 1)
    size = _int_param(params, "PageSize", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    return number, size


def lookup_image(params: Mapping[str, str], data: EmulatorData) -> Image:
    region_id = params.get("RegionId", "")
    image_id = params.get("ImageId", "")
    if not region_id:
        raise errors.missing_parameter("RegionId")
    if not image_id:
        raise errors.missing_parameter("ImageId")
    if not data.has_region(region_id):
        raise errors.REGION_NOT_FOUND
    image = data.get(region_id, image_id)
    if image is None:
        raise errors.IMAGE_NOT_FOUND
    return image


def describe_image_share_permission(
    params: Mapping[str, str], data: EmulatorData, request_id: str
) -> dict[str, Any]:
    """The JSON document ECS returns, keys in ECS's order."""
    image = lookup_image(params, data)
    number, size = page_params(params)
    start = (number - 1) * size
    accounts: list[dict[str, Any]] = []
    for account in image.accounts[start : start + size]:
        entry: dict[str, Any] = {
            "AliyunId": int(account.aliyun_id)
            if image.aliyun_id_as_number and account.aliyun_id.isdigit()
            else account.aliyun_id
        }
        if account.shared_time:
            entry["SharedTime"] = account.shared_time
        accounts.append(entry)
    return {
        "RequestId": request_id,
        "RegionId": image.region_id,
        "ImageId": image.image_id,
        "PageNumber": number,
        "PageSize": size,
        "TotalCount": len(image.accounts),
        "ShareGroups": {"ShareGroup": [{"Group": g} for g in image.share_groups]},
        "Accounts": {"Account": accounts},
    }
