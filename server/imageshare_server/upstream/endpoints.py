"""Which host an ECS call goes to.

The host is derived only from a region id that already passed
``validation.REGION_PATTERN`` or from the operator's ``--upstream-endpoint``;
nothing a caller sends can point the service at another host.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

# The official SDK's endpoint map (alibabacloud-ecs20140526): regions whose
# endpoint is not ``ecs.<region>.aliyuncs.com``.
ENDPOINT_MAP: dict[str, str] = {
    "cn-hangzhou": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-shanghai-finance-1": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-shenzhen-finance-1": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-north-2-gov-1": "ecs.aliyuncs.com",
    "ap-northeast-2-pop": "ecs.aliyuncs.com",
    "cn-beijing-finance-pop": "ecs.aliyuncs.com",
    "cn-beijing-gov-1": "ecs.aliyuncs.com",
    "cn-beijing-nu16-b01": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-edge-1": "ecs.cn-qingdao-nebula.aliyuncs.com",
    "cn-fujian": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-haidian-cm12-c01": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-hangzhou-bj-b01": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-hangzhou-finance": "ecs.aliyuncs.com",
    "cn-hangzhou-internal-prod-1": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-hangzhou-internal-test-1": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-hangzhou-internal-test-2": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-hangzhou-internal-test-3": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-hangzhou-test-306": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-hongkong-finance-pop": "ecs.aliyuncs.com",
    "cn-huhehaote-nebula-1": "ecs.cn-qingdao-nebula.aliyuncs.com",
    "cn-shanghai-et15-b01": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-shanghai-et2-b01": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-shanghai-inner": "ecs.aliyuncs.com",
    "cn-shanghai-internal-test-1": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-shenzhen-inner": "ecs.aliyuncs.com",
    "cn-shenzhen-st4-d01": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-shenzhen-su18-b01": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-wuhan": "ecs.aliyuncs.com",
    "cn-yushanfang": "ecs.aliyuncs.com",
    "cn-zhangbei": "ecs.aliyuncs.com",
    "cn-zhangbei-na61-b01": "ecs-cn-hangzhou.aliyuncs.com",
    "cn-zhangjiakou-na62-a01": "ecs.cn-zhangjiakou.aliyuncs.com",
    "cn-zhengzhou-nebula-1": "ecs.cn-qingdao-nebula.aliyuncs.com",
    "eu-west-1-oxs": "ecs.cn-shenzhen-cloudstone.aliyuncs.com",
    "rus-west-1-pop": "ecs.aliyuncs.com",
}

# Public regions, used to keep metric labels bounded: any other valid region
# is labelled "other".
KNOWN_REGIONS = frozenset(
    {
        "cn-hangzhou", "cn-shanghai", "cn-qingdao", "cn-beijing", "cn-zhangjiakou",
        "cn-huhehaote", "cn-wulanchabu", "cn-shenzhen", "cn-heyuan", "cn-guangzhou",
        "cn-chengdu", "cn-nanjing", "cn-fuzhou", "cn-wuhan-lr", "cn-hongkong",
        "ap-northeast-1", "ap-northeast-2", "ap-southeast-1", "ap-southeast-2",
        "ap-southeast-3", "ap-southeast-5", "ap-southeast-6", "ap-southeast-7",
        "ap-south-1", "us-east-1", "us-west-1", "na-south-1", "eu-west-1",
        "eu-central-1", "me-east-1", "me-central-1", "rus-west-1",
    }
)  # fmt: skip


def region_label(region_id: str) -> str:
    return region_id if region_id in KNOWN_REGIONS or region_id in ENDPOINT_MAP else "other"


# The bucket every region outside the known set shares (see ``EndpointResolver.bucket``),
# and the one every region shares when all calls go to one ``--upstream-endpoint``.
OTHER_REGIONS_BUCKET = "other"
ENDPOINT_BUCKET = "endpoint"


@dataclass(frozen=True)
class Endpoint:
    """Where a request goes (``base_url``) and the ``host`` value it is signed with."""

    base_url: str
    host: str


def official_host(region_id: str, *, vpc: bool = False) -> str:
    """The SDK's rule: its endpoint map first, else ``ecs[-vpc].<region>.aliyuncs.com``."""
    if vpc:
        return f"ecs-vpc.{region_id}.aliyuncs.com"
    return ENDPOINT_MAP.get(region_id, f"ecs.{region_id}.aliyuncs.com")


class EndpointResolver:
    """Resolve the upstream endpoint for a (validated) region.

    With ``override`` every region goes to that one URL (the emulator, a
    private endpoint or a proxy); otherwise HTTPS to the official host.
    """

    def __init__(
        self,
        override: str | None = None,
        *,
        vpc: bool = False,
        extra_regions: frozenset[str] = frozenset(),
    ) -> None:
        self._override: Endpoint | None = None
        self._vpc = vpc
        self._known = KNOWN_REGIONS | ENDPOINT_MAP.keys() | extra_regions
        if override:
            url = httpx.URL(override if "://" in override else f"https://{override}")
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"upstream endpoint must be an http(s) URL, got {override!r}")
            host = url.host if url.port is None else f"{url.host}:{url.port}"
            self._override = Endpoint(f"{url.scheme}://{host}", host)

    @property
    def overridden(self) -> bool:
        return self._override is not None

    def bucket(self, region_id: str) -> str:
        """The rate-limit (and retry-budget) bucket of a region: a fixed, bounded set of names.

        Callers choose region ids, so per-region state must not grow with them.
        With one ``--upstream-endpoint`` every call reaches the same host and
        counts against one bucket. Otherwise each known region (the SDK's
        endpoint map, the public regions and ``--extra-regions``) has its own,
        and every other region shares one: a region Alibaba Cloud opens after
        this release still works, at a shared rate, until it is listed.
        """
        if self._override is not None:
            return ENDPOINT_BUCKET
        return region_id if region_id in self._known else OTHER_REGIONS_BUCKET

    def resolve(self, region_id: str) -> Endpoint:
        if self._override is not None:
            return self._override
        host = official_host(region_id, vpc=self._vpc)
        return Endpoint(f"https://{host}", host)
