"""`imageshare audit`: read many images' share lists through the server, report findings.

Each image is listed once, at most ``--concurrency`` at a time. The server keeps the
upstream calls within its quota (its fair rate limiter); a listing it cannot serve
before its deadline comes back RESOURCE_EXHAUSTED with a retry hint, which the audit
waits out and tries again, so a large audit takes as long as the quota needs, never
more calls than the images' pages. A listing whose turn came too late to finish
(DEADLINE_EXCEEDED) is tried again too, a couple of times: the server finishes such a
read as a cache fill, so the next try is usually served from the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from .aio import AsyncImageShareClient
from .errors import ImageShareError

DEFAULT_CONCURRENCY = 16
# Waits for a rate-limit turn per image before its error is reported.
MAX_WAITS = 10
# Listings that ran out of time, tried again per image before the error is reported.
MAX_LATE = 2
# Accounts outside the allow list named per image (the count is always complete).
OUTSIDE_SHOWN = 100
BAR_WIDTH = 24


class AuditInputError(Exception):
    """An input file that cannot be read or holds something that is not an id."""


@dataclass(slots=True)
class ImageResult:
    image_id: str
    public: bool = False
    accounts: int = 0
    outside: list[str] = field(default_factory=list)
    outside_count: int = 0
    error: ImageShareError | None = None

    @property
    def found(self) -> bool:
        return self.public or self.outside_count > 0

    def json(self) -> dict[str, Any]:
        error = self.error
        return {
            "type": "image",
            "image_id": self.image_id,
            "public": self.public,
            "accounts": self.accounts,
            "outside_count": self.outside_count,
            "outside_accounts": self.outside,
            "error": None
            if error is None
            else {"code": error.code_name, "reason": error.reason, "message": error.message},
        }


def read_ids(path: str) -> list[str]:
    """Ids one a line ('-': stdin); blank lines and # comments skipped, duplicates dropped."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as exc:
        raise AuditInputError(f"cannot read {path}: {exc.strerror}") from None
    ids = []
    for line in text.splitlines():
        value = line.split("#", 1)[0].strip()
        if value:
            if any(c.isspace() for c in value):
                raise AuditInputError(f"{path}: one id a line, got {value!r}")
            ids.append(value)
    return list(dict.fromkeys(ids))


async def audit_image(
    client: AsyncImageShareClient,
    region: str,
    image_id: str,
    allow: frozenset[str] | None,
    owner_account: str = "",
) -> ImageResult:
    """One image's findings, or the error that kept it from being read."""
    waits = late = 0
    while True:
        result = ImageResult(image_id)
        try:
            async with client.list_shares(
                region, image_id, owner_account=owner_account, page_size=100
            ) as listing:
                result.public = (await listing.start()).is_public
                async for account in listing:
                    result.accounts += 1
                    if allow is not None and account.aliyun_id not in allow:
                        result.outside_count += 1
                        if len(result.outside) < OUTSIDE_SHOWN:
                            result.outside.append(account.aliyun_id)
            return result
        except ImageShareError as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.retry_after is not None:
                waits += 1
            elif exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                # A read whose turn for the quota came just before the deadline: the
                # server finishes it as a cache fill, so the next try is usually a hit.
                late += 1
            else:
                waits = MAX_WAITS
            if waits >= MAX_WAITS or late > MAX_LATE:
                result.error = exc
                return result
            await asyncio.sleep(exc.retry_after or 0.0)


@dataclass(slots=True)
class Tally:
    total: int
    done: int = 0
    public: int = 0
    outside: int = 0
    errors: int = 0

    def add(self, result: ImageResult) -> None:
        self.done += 1
        self.public += result.public
        self.outside += result.outside_count > 0
        self.errors += result.error is not None


class ProgressBar:
    """A self-overwriting bar on stderr, only when a person is watching."""

    def __init__(self, stream: TextIO, started: float) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._started = started
        self._shown = False

    def update(self, tally: Tally) -> None:
        if not self._enabled:
            return
        filled = BAR_WIDTH * tally.done // max(1, tally.total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self._stream.write(
            f"\r[{bar}] {tally.done}/{tally.total} images, {tally.public} public, "
            f"{tally.outside} shared outside, {tally.errors} errors, "
            f"{time.monotonic() - self._started:.1f}s"
        )
        self._stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\033[K")
            self._stream.flush()


async def audit(
    target: str,
    region: str,
    images: Sequence[str],
    *,
    allow: frozenset[str] | None,
    concurrency: int,
    timeout: float | None,  # noqa: ASYNC109 (each listing's gRPC deadline)
    owner_account: str = "",
    on_result: Callable[[ImageResult], None] = lambda _: None,
) -> list[ImageResult]:
    """Every image's result, in the order given; ``on_result`` as each one completes."""
    gate = asyncio.Semaphore(concurrency)
    async with AsyncImageShareClient(target, timeout=timeout) as client:

        async def one(image_id: str) -> ImageResult:
            async with gate:
                result = await audit_image(client, region, image_id, allow, owner_account)
            on_result(result)
            return result

        return list(await asyncio.gather(*(one(i) for i in images)))


def _print_table(out: TextIO, results: Sequence[ImageResult]) -> None:
    rows = [r for r in results if r.found or r.error is not None]
    if not rows:
        out.write("no public images, no shares outside the allow list\n\n")
        return
    width = max(len("IMAGE"), *(len(r.image_id) for r in rows))
    out.write(f"{'IMAGE':<{width}}  PUBLIC  ACCOUNTS  OUTSIDE  DETAIL\n")
    for r in rows:
        if r.error is not None:
            detail = f"error {r.error.code_name}: {r.error.reason or r.error.message}"
            out.write(f"{r.image_id:<{width}}  {'-':<6}  {'-':>8}  {'-':>7}  {detail}\n")
            continue
        more = r.outside_count - min(3, len(r.outside))
        detail = ", ".join(r.outside[:3]) + (f" (+{more} more)" if more > 0 else "")
        public = "yes" if r.public else "no"
        out.write(
            f"{r.image_id:<{width}}  {public:<6}  {r.accounts:>8}  {r.outside_count:>7}  {detail}\n"
        )
    out.write("\n")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    images = read_ids(args.images)
    allow = frozenset(read_ids(args.allow_accounts)) if args.allow_accounts else None
    started = time.monotonic()
    tally = Tally(len(images))
    progress = ProgressBar(err, started)

    def done(result: ImageResult) -> None:
        tally.add(result)
        progress.update(tally)

    try:
        results = asyncio.run(
            audit(
                args.target,
                args.region,
                images,
                allow=allow,
                concurrency=args.concurrency,
                timeout=args.timeout,
                owner_account=args.owner_account,
                on_result=done,
            )
        )
    finally:
        progress.clear()
    seconds = time.monotonic() - started
    if args.json:
        for result in results:
            out.write(json.dumps(result.json()) + "\n")
        summary = {
            "type": "summary",
            "region_id": args.region,
            "images": len(results),
            "public": tally.public,
            "outside": tally.outside,
            "errors": tally.errors,
            "seconds": round(seconds, 3),
        }
        out.write(json.dumps(summary) + "\n")
    else:
        _print_table(out, results)
        shared_outside = sum(r.outside_count for r in results)
        out.write(f"images:         {len(results)} in {seconds:.1f}s\n")
        out.write(f"public:         {tally.public}\n")
        if allow is not None:
            out.write(f"shared outside: {tally.outside} images, {shared_outside} account shares\n")
        out.write(f"errors:         {tally.errors}\n")
    for result in results:
        if result.error is not None:
            err.write(
                f"imageshare: {result.image_id}: {result.error.code_name}: {result.error.message}\n"
            )
    if tally.errors:
        return 3
    return 1 if tally.public or tally.outside else 0
