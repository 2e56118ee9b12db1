"""`imageshare`: ask an imageshare server from a shell or a script.

Exit status (stable, scripts rely on it):
  0  success; for `check`: the account may use the image (listed, or the image is public)
  1  `check` only: the account may not use the image
  2  usage error (bad or missing options)
  3  the call failed: the gRPC status name and message are printed to stderr
  130 interrupted (Ctrl-C)

`list --json` prints JSON lines on stdout, written as they arrive:
  {"type": "account", "aliyun_id": "1234567890", "shared_time": "2025-01-01T00:00:00Z"}
  ... one per account, in upstream order (shared_time is null when upstream has none), then
  {"type": "summary", "region_id": ..., "image_id": ..., "total_count": N, "accounts": N,
   "share_groups": ["all"], "public": true, "cache_status": "HIT", "cache_age_seconds": 1.5,
   "read_time": "...Z", "upstream_request_ids": [...]}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .client import DEFAULT_TIMEOUT, ImageShareClient
from .errors import ImageShareError
from .models import ListingMetadata, SharedAccount

EXIT_OK = 0
EXIT_NOT_SHARED = 1
EXIT_USAGE = 2
EXIT_RPC_ERROR = 3
EXIT_INTERRUPTED = 130
DEFAULT_TARGET = "127.0.0.1:50051"
JSON_FORMAT = """--json output, one JSON object per line, written as accounts arrive:
  {"type": "account", "aliyun_id": "...", "shared_time": "2025-01-01T00:00:00Z" or null}
  ... then one summary line:
  {"type": "summary", "region_id", "image_id", "total_count", "accounts", "share_groups",
   "public", "cache_status", "cache_age_seconds", "read_time", "upstream_request_ids"}"""
# Progress is worth showing only when a listing is long enough to make a person wait.
PROGRESS_EVERY = 50


def _iso(ts: dt.datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("IMAGESHARE_TARGET", DEFAULT_TARGET),
        help="server HOST:PORT (default: $IMAGESHARE_TARGET or %(default)s)",
    )
    common.add_argument("--region", required=True, help="region id, e.g. cn-hangzhou")
    common.add_argument("--image", required=True, help="custom image id, e.g. m-bp1...")
    common.add_argument("--owner-account", default="", help="RAM user passed as OwnerAccount")
    common.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="deadline in seconds for the whole call (default: %(default)s)",
    )
    parser = argparse.ArgumentParser(
        prog="imageshare",
        description="Who is a custom Alibaba Cloud ECS image shared with?",
        epilog="exit status: 0 ok, 1 not shared (check), 2 usage, 3 gRPC error, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser(
        "list",
        parents=[common],
        help="list the accounts an image is shared with",
        epilog=JSON_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lst.add_argument("--page-size", type=int, default=0, help="accounts per message (1-100)")
    lst.add_argument("--bypass-cache", action="store_true", help="read the upstream now")
    lst.add_argument("--json", action="store_true", help="JSON lines for scripts (format below)")
    chk = sub.add_parser("check", parents=[common], help="exit 0 if ACCOUNT may use the image")
    chk.add_argument("--account", required=True, help="Alibaba Cloud account id")
    chk.add_argument("--quiet", "-q", action="store_true", help="print nothing, exit status only")
    return parser


class _Progress:
    """A single self-overwriting line on stderr, only when a person is watching."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._shown = False

    def update(self, received: int, total: int) -> None:
        if self._enabled and received % PROGRESS_EVERY == 0:
            self._stream.write(f"\rreceived {received}/{total} accounts…")
            self._stream.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._shown = False


def _summary(meta: ListingMetadata, accounts: int, request_ids: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "summary",
        "region_id": meta.region_id,
        "image_id": meta.image_id,
        "total_count": meta.total_count,
        "accounts": accounts,
        "share_groups": list(meta.share_groups),
        "public": meta.is_public,
        "cache_status": meta.cache_status.name,
        "cache_age_seconds": None if meta.cache_age is None else meta.cache_age.total_seconds(),
        "read_time": _iso(meta.read_time),
        "upstream_request_ids": list(request_ids),
    }


def _print_table(
    out: TextIO, accounts: Sequence[SharedAccount], meta: ListingMetadata, ids: Sequence[str]
) -> None:
    width = max([len("ALIYUN_ID"), *(len(a.aliyun_id) for a in accounts)])
    out.write(f"{'ALIYUN_ID':<{width}}  SHARED_TIME\n")
    for account in accounts:
        out.write(f"{account.aliyun_id:<{width}}  {_iso(account.shared_time) or '-'}\n")
    groups = ", ".join(meta.share_groups) or "-"
    public = "  (public: every account may use it)" if meta.is_public else ""
    out.write(f"\nshare groups: {groups}{public}\n")
    out.write(f"total:        {meta.total_count} accounts ({len(accounts)} listed)\n")
    age = "" if meta.cache_age is None else f", age {meta.cache_age.total_seconds():.1f}s"
    out.write(f"cache:        {meta.cache_status.name}{age}\n")
    if ids:
        out.write(f"upstream request ids: {', '.join(ids)}\n")


def _list(client: ImageShareClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    listing = client.list_shares(
        args.region,
        args.image,
        owner_account=args.owner_account,
        page_size=args.page_size,
        bypass_cache=args.bypass_cache,
    )
    with listing:
        meta = listing.metadata
        if args.json:
            count = 0
            for account in listing:
                line = {
                    "type": "account",
                    "aliyun_id": account.aliyun_id,
                    "shared_time": _iso(account.shared_time),
                }
                out.write(json.dumps(line) + "\n")
                count += 1
            out.write(json.dumps(_summary(meta, count, listing.upstream_request_ids)) + "\n")
            return EXIT_OK
        progress = _Progress(err)
        accounts: list[SharedAccount] = []
        try:
            for account in listing:
                accounts.append(account)
                progress.update(len(accounts), meta.total_count)
        finally:
            progress.clear()
        _print_table(out, accounts, meta, listing.upstream_request_ids)
    return EXIT_OK


def _check(client: ImageShareClient, args: argparse.Namespace, out: TextIO) -> int:
    shared = client.is_shared_with(
        args.region, args.image, args.account, owner_account=args.owner_account
    )
    if not args.quiet:
        verdict = "may use" if shared else "may not use"
        out.write(f"{args.account} {verdict} {args.image}\n")
    return EXIT_OK if shared else EXIT_NOT_SHARED


def _report(error: ImageShareError, err: TextIO) -> None:
    err.write(f"imageshare: {error.code_name}: {error.message}\n")
    if error.reason:
        details = ", ".join(f"{k}={v}" for k, v in sorted(error.metadata.items()))
        err.write(f"  reason: {error.reason}" + (f" ({details})" if details else "") + "\n")
    for violation in error.field_violations:
        err.write(f"  field {violation.field}: {violation.description}\n")
    if error.retry_after is not None:
        err.write(f"  retry after {error.retry_after:g}s\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        with ImageShareClient(args.target, timeout=args.timeout) as client:
            if args.command == "list":
                return _list(client, args, out, err)
            return _check(client, args, out)
    except ImageShareError as error:
        _report(error, err)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `imageshare list | head` closes stdout early; that is not an error for the caller.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
