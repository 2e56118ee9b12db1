"""What the emulator knows: regions, images and who each image is shared with.

The store is shared by every request thread and by the test knobs that mutate it, so all
access goes through one lock and readers get copies.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

KNOWN_REGIONS: tuple[str, ...] = (
    "cn-hangzhou",
    "cn-shanghai",
    "cn-beijing",
    "cn-shenzhen",
    "cn-qingdao",
    "cn-zhangjiakou",
    "cn-huhehaote",
    "cn-wulanchabu",
    "cn-heyuan",
    "cn-guangzhou",
    "cn-chengdu",
    "cn-nanjing",
    "cn-fuzhou",
    "cn-wuhan-lr",
    "cn-hongkong",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-5",
    "ap-southeast-6",
    "ap-southeast-7",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-south-1",
    "eu-central-1",
    "eu-west-1",
    "us-west-1",
    "us-east-1",
    "me-east-1",
    "me-central-1",
    "na-south-1",
)


@dataclass(frozen=True)
class Account:
    aliyun_id: str
    shared_time: str | None = None


@dataclass(frozen=True)
class Image:
    region_id: str
    image_id: str
    accounts: tuple[Account, ...] = ()
    share_groups: tuple[str, ...] = ()
    # The current documentation's sample answers AliyunId as a JSON number; this flag lets a
    # test reproduce that so clients prove they cope.
    aliyun_id_as_number: bool = False


def image_from_dict(raw: Mapping[str, Any]) -> Image:
    """Build an image from the data-file shape (``region_id``, ``image_id``, ``accounts``...)."""
    try:
        accounts = tuple(
            Account(str(a["aliyun_id"]), a.get("shared_time")) for a in raw.get("accounts", [])
        )
        return Image(
            region_id=str(raw["region_id"]),
            image_id=str(raw["image_id"]),
            accounts=accounts,
            share_groups=tuple(str(g) for g in raw.get("share_groups", [])),
            aliyun_id_as_number=bool(raw.get("aliyun_id_as_number", False)),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"invalid image entry: {exc}") from exc


def image_to_dict(image: Image) -> dict[str, Any]:
    return {
        "region_id": image.region_id,
        "image_id": image.image_id,
        "accounts": [
            {"aliyun_id": a.aliyun_id} | ({"shared_time": a.shared_time} if a.shared_time else {})
            for a in image.accounts
        ],
        "share_groups": list(image.share_groups),
        "aliyun_id_as_number": image.aliyun_id_as_number,
    }


@dataclass
class EmulatorData:
    """Images keyed by (region, image id), plus the regions that exist."""

    images: dict[tuple[str, str], Image] = field(default_factory=dict)
    regions: set[str] = field(default_factory=lambda: set(KNOWN_REGIONS))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def from_images(cls, images: Iterable[Image]) -> EmulatorData:
        data = cls()
        for image in images:
            data.upsert(image)
        return data

    def upsert(self, image: Image) -> None:
        with self._lock:
            self.images[(image.region_id, image.image_id)] = image
            self.regions.add(image.region_id)

    def delete(self, region_id: str, image_id: str) -> bool:
        with self._lock:
            return self.images.pop((region_id, image_id), None) is not None

    def get(self, region_id: str, image_id: str) -> Image | None:
        with self._lock:
            return self.images.get((region_id, image_id))

    def has_region(self, region_id: str) -> bool:
        with self._lock:
            return region_id in self.regions

    def replace_accounts(self, region_id: str, image_id: str, accounts: Iterable[Account]) -> None:
        with self._lock:
            image = self.images.get((region_id, image_id))
            if image is not None:
                self.images[(region_id, image_id)] = replace(image, accounts=tuple(accounts))

    def modify_share(
        self,
        region_id: str,
        image_id: str,
        *,
        add_accounts: Iterable[Account] = (),
        remove_accounts: Iterable[str] = (),
        add_groups: Iterable[str] = (),
        remove_groups: Iterable[str] = (),
    ) -> Image | None:
        """Share and unshare in one step, like ECS's ModifyImageSharePermission.

        Removals apply first; an added account already in the list keeps its place
        and takes the new shared time; new accounts and groups go at the end.
        Returns the image as changed, None when there is no such image.
        """
        with self._lock:
            image = self.images.get((region_id, image_id))
            if image is None:
                return None
            gone = set(remove_accounts)
            accounts = {a.aliyun_id: a for a in image.accounts if a.aliyun_id not in gone}
            for account in add_accounts:
                accounts[account.aliyun_id] = account
            dropped = set(remove_groups)
            groups = [g for g in image.share_groups if g not in dropped]
            groups += [g for g in dict.fromkeys(add_groups) if g not in groups]
            changed = replace(image, accounts=tuple(accounts.values()), share_groups=tuple(groups))
            self.images[(region_id, image_id)] = changed
            return changed


def load_data(path: str | Path) -> EmulatorData:
    """Read ``{"images": [...], "regions": [...]?}``; the known regions are always included."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list")
    data = EmulatorData.from_images(image_from_dict(entry) for entry in raw["images"])
    for region in raw.get("regions", []):
        data.regions.add(str(region))
    return data


DEMO_REGION = "cn-hangzhou"
DEMO_ACCOUNT_COUNT = 137


def demo_accounts(count: int = DEMO_ACCOUNT_COUNT) -> tuple[Account, ...]:
    """Deterministic account ids and share times, so tests can name them."""
    base = datetime(2025, 1, 1, tzinfo=UTC)
    return tuple(
        Account(
            aliyun_id=str(1_500_000_000_000_000 + i * 7_919_123_457),
            shared_time=(base + timedelta(hours=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        for i in range(count)
    )


def demo_data() -> EmulatorData:
    """Three images: a long share list (needs paging), a public image, an unshared image."""
    return EmulatorData.from_images(
        [
            Image(DEMO_REGION, "m-demo0000001", demo_accounts()),
            Image(
                DEMO_REGION,
                "m-demo0000002",
                (
                    Account("1234567890123456", "2025-01-01T00:00:00Z"),
                    Account("1234567890654321", "2025-02-01T00:00:00Z"),
                ),
                ("all",),
            ),
            Image(DEMO_REGION, "m-demo0000003"),
        ]
    )
