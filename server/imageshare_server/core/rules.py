"""What a valid request looks like, in one place: the gRPC validation, the settings and the
README's table all read these rules.

The region becomes part of the upstream host name, so its rule is strict
enough that no value can name another host, and short enough to be one DNS
label (63 characters).
"""

from __future__ import annotations

import re

REGION_PATTERN = re.compile(r"[a-z]{2,4}(?:-[a-z0-9]{1,20}){1,4}")
MAX_REGION_LENGTH = 63
REGION_RULE = (
    "a region id like cn-hangzhou: 2 to 4 lower-case letters, then 1 to 4 hyphen-separated "
    "parts of lower-case letters and digits (^[a-z]{2,4}(-[a-z0-9]{1,20}){1,4}$), "
    "63 characters at most"
)

IMAGE_PATTERN = re.compile(r"m-[A-Za-z0-9]{1,62}")
IMAGE_RULE = "a custom image id: m- then 1 to 62 letters or digits"

# RAM login names: printable ASCII, no spaces (e.g. ECSforCloud@Alibaba.com).
OWNER_ACCOUNT_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
OWNER_ACCOUNT_RULE = "1 to 128 printable ASCII characters without spaces"

# Alibaba Cloud account ids are decimal numbers (16 digits today); a check names one.
ALIYUN_ID_PATTERN = re.compile(r"[0-9]{1,32}")
ALIYUN_ID_RULE = "an Alibaba Cloud account id: 1 to 32 digits"

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


def is_region_id(value: str) -> bool:
    return len(value) <= MAX_REGION_LENGTH and REGION_PATTERN.fullmatch(value) is not None
