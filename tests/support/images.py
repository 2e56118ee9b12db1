"""Images of the tests' own in the emulator: unique ids, so no cache entry leaks between tests."""

from __future__ import annotations

import itertools
import os
from typing import Protocol

REGION = "cn-hangzhou"
_ids = itertools.count(1)


class Uploads(Protocol):
    """An emulator's ``Knobs`` (in process) or ``EmulatorAdmin`` (another process)."""

    def upsert_image(self, image: dict[str, object]) -> None: ...


def new_image(
    emulator: Uploads,
    accounts: int,
    *,
    region: str = REGION,
    groups: tuple[str, ...] = (),
    first_id: int = 7 * 10**15,
) -> tuple[str, list[str]]:
    """Upload an image shared with ``accounts`` accounts; returns its id and the account ids."""
    image_id = f"m-t{os.getpid() % 1000:03d}{next(_ids):06d}"
    ids = [str(first_id + i) for i in range(accounts)]
    emulator.upsert_image(
        {
            "region_id": region,
            "image_id": image_id,
            "accounts": [{"aliyun_id": i} for i in ids],
            "share_groups": list(groups),
        }
    )
    return image_id, ids
