"""`imageshare`: ask an imageshare server from a shell or a script.

Exit status (stable, scripts rely on it):
  0  success; `check`: the account may use the image (listed, or the image is public);
     `audit`: nothing found
  1  `check`: the account may not use the image; `audit`: a public image, or a share to
     an account outside the allow list
  2  usage error (bad or missing options)
  3  the call failed (for `audit`: at least one image could not be read, whatever else
     was found): the gRPC status name and message are printed to stderr
  130 interrupted (Ctrl-C)

`list --json` prints JSON lines on stdout, written as they arrive:
  {"type": "account", "aliyun_id": "1234567890", "shared_time": "2025-01-01T00:00:00Z"}
  ... one per account, in upstream order (shared_time is null when upstream has none), then
  {"type": "summary", "region_id": ..., "image_id": ..., "total_count": N, "accounts": N,
   "share_groups": ["all"], "public": true, "cache_status": "HIT", "cache_age_seconds": 1.5,
   "read_time": "...Z", "upstream_request_ids": [...]}

`watch --json` prints one line per event: {"type": "snapshot" | "change" | "resumed", ...}.
`audit --json` prints one line per image, then a summary line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from . import _audit
from .client import DEFAULT_TIMEOUT, ImageShareClient
from .errors import ImageShareError
from .models import ListingMetadata, ShareChange, SharedAccount, ShareVia

EXIT_OK = 0
EXIT_NOT_SHARED = 1
EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_RPC_ERROR = 3
EXIT_INTERRUPTED = 130
DEFAULT_TARGET = "127.0.0.1:50051"
JSON_FORMAT = """--json output, one JSON object per line, written as accounts arrive:
  {"type": "account", "aliyun_id": "...", "shared_time": "2025-01-01T00:00:00Z" or null}
  ... then one summary line:
  {"type": "summary", "region_id", "image_id", "total_count", "accounts", "share_groups",
   "public", "cache_status", "cache_age_seconds", "read_time", "upstream_request_ids"}"""
WATCH_FORMAT = """Prints the list, then each change as the server sees it (every --watch-interval
of the server, 60 s by default), until interrupted. Reconnects by itself when the server
drains or restarts; changes made meanwhile are printed as "resumed".

--json output, one JSON object per line:
  {"type": "snapshot" | "change" | "resumed", "region_id", "image_id", "read_time",
   "added": [{"aliyun_id", "shared_time"}], "removed": ["..."], "groups_added": ["all"],
   "groups_removed": [], "total_count": N, "public": true, "became_public": true,
   "became_private": false}"""
AUDIT_FORMAT = """Reads the share list of every image given (one id per line; blank lines and
# comments ignored; '-' reads stdin) through the server, which keeps to the upstream quota,
and reports public images and, with --allow-accounts (one account id per line), shares
to any account outside the list. Exit 0 when clean, 1 when something was found, 3 when
an image could not be read (its error is reported).

--json output: one line per image, in the order given, then a summary:
  {"type": "image", "image_id", "public", "accounts", "outside_accounts": [...],
   "error": null | {"code", "reason", "message"}}
  {"type": "summary", "region_id", "images", "public", "outside", "errors", "seconds"}"""
# Progress is worth showing only when a listing is long enough to make a person wait.
PROGRESS_EVERY = 50


def _iso(ts: dt.datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parser() -> argparse.ArgumentParser:
    connect = argparse.ArgumentParser(add_help=False)
    connect.add_argument(
        "--target",
        default=os.environ.get("IMAGESHARE_TARGET", DEFAULT_TARGET),
        help="server HOST:PORT (default: $IMAGESHARE_TARGET or %(default)s)",
    )
    image = argparse.ArgumentParser(add_help=False)
    image.add_argument("--region", required=True, help="region id, e.g. cn-hangzhou")
    image.add_argument("--image", required=True, help="custom image id, e.g. m-bp1...")
    image.add_argument("--owner-account", default="", help="RAM user passed as OwnerAccount")
    deadline = argparse.ArgumentParser(add_help=False)
    deadline.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="deadline in seconds for each call (default: %(default)s)",
    )
    parser = argparse.ArgumentParser(
        prog="imageshare",
        description="Who is a custom Alibaba Cloud ECS image shared with?",
        epilog="exit status: 0 ok, 1 not shared (check) or found (audit), 2 usage, "
        "3 gRPC error, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser(
        "list",
        parents=[connect, image, deadline],
        help="list the accounts an image is shared with",
        epilog=JSON_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lst.add_argument("--page-size", type=int, default=0, help="accounts per message (1-100)")
    lst.add_argument("--bypass-cache", action="store_true", help="read the upstream now")
    lst.add_argument("--json", action="store_true", help="JSON lines for scripts (format below)")
    chk = sub.add_parser(
        "check", parents=[connect, image, deadline], help="exit 0 if ACCOUNT may use the image"
    )
    chk.add_argument("--account", required=True, help="Alibaba Cloud account id (digits)")
    chk.add_argument("--bypass-cache", action="store_true", help="read the upstream now")
    chk.add_argument("--quiet", "-q", action="store_true", help="print nothing, exit status only")
    wat = sub.add_parser(
        "watch",
        parents=[connect, image],
        help="print an image's share list, then every change to it",
        epilog=WATCH_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wat.add_argument("--json", action="store_true", help="JSON lines for scripts (format below)")
    wat.add_argument(
        "--max-changes",
        type=int,
        default=None,
        metavar="N",
        help="exit 0 after N changes (the first list not counted); default: never",
    )
    aud = sub.add_parser(
        "audit",
        parents=[connect, deadline],
        help="find public images and shares outside an allow list, over many images",
        epilog=AUDIT_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    aud.add_argument("--region", required=True, help="region id of every image, e.g. cn-hangzhou")
    aud.add_argument(
        "--images", required=True, metavar="FILE", help="image ids, one a line ('-': stdin)"
    )
    aud.add_argument(
        "--allow-accounts", metavar="FILE", help="account ids images may be shared with"
    )
    aud.add_argument(
        "--concurrency",
        type=int,
        default=_audit.DEFAULT_CONCURRENCY,
        metavar="N",
        help="images read at once (default: %(default)s); the server keeps to the quota",
    )
    aud.add_argument("--owner-account", default="", help="RAM user passed as OwnerAccount")
    aud.add_argument("--json", action="store_true", help="JSON lines for scripts (format below)")
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
    answer = client.check(
        args.region,
        args.image,
        args.account,
        owner_account=args.owner_account,
        bypass_cache=args.bypass_cache,
    )
    if not args.quiet:
        if answer.via is ShareVia.ACCOUNT:
            when = _iso(answer.shared_time)
            how = f" (listed{f', shared {when}' if when else ''})"
        elif answer.via is ShareVia.PUBLIC:
            how = " (the image is public)"
        else:
            how = ""
        verdict = "may use" if answer.shared else "may not use"
        out.write(f"{args.account} {verdict} {args.image}{how}\n")
    return EXIT_OK if answer.shared else EXIT_NOT_SHARED


def _kind(change: ShareChange) -> str:
    return "snapshot" if change.snapshot else "resumed" if change.resumed else "change"


def _change_json(change: ShareChange, public: bool) -> dict[str, Any]:
    return {
        "type": _kind(change),
        "region_id": change.region_id,
        "image_id": change.image_id,
        "read_time": _iso(change.read_time),
        "added": [
            {"aliyun_id": a.aliyun_id, "shared_time": _iso(a.shared_time)} for a in change.added
        ],
        "removed": list(change.removed),
        "groups_added": list(change.groups_added),
        "groups_removed": list(change.groups_removed),
        "total_count": change.total_count,
        "public": public,
        "became_public": change.became_public,
        "became_private": change.became_private,
    }


def _print_change(out: TextIO, change: ShareChange, public: bool) -> None:
    when = _iso(change.read_time) or "-"
    if change.snapshot:
        state = "public, " if public else ""
        out.write(f"{when}  {change.image_id}: {state}{change.total_count} accounts\n")
        for account in change.added:
            out.write(f"{when}    {account.aliyun_id}  {_iso(account.shared_time) or '-'}\n")
        for group in change.groups_added:
            out.write(f"{when}    group {group}\n")
        return
    note = " (while reconnecting)" if change.resumed else ""
    for group in change.groups_added:
        alarm = "  PUBLIC: every account may use it" if group == "all" else ""
        out.write(f"{when}  + group {group}{alarm}{note}\n")
    for group in change.groups_removed:
        out.write(f"{when}  - group {group}{note}\n")
    for account in change.added:
        out.write(f"{when}  + {account.aliyun_id}  {_iso(account.shared_time) or '-'}{note}\n")
    for aliyun_id in change.removed:
        out.write(f"{when}  - {aliyun_id}{note}\n")
    out.write(f"{when}  = {change.total_count} accounts\n")


def _watch(client: ImageShareClient, args: argparse.Namespace, out: TextIO) -> int:
    changes = 0
    with client.watch(args.region, args.image, owner_account=args.owner_account) as watch:
        for change in watch:
            if args.json:
                out.write(json.dumps(_change_json(change, watch.is_public)) + "\n")
            else:
                _print_change(out, change, watch.is_public)
            out.flush()
            if not change.snapshot:
                changes += 1
                if args.max_changes is not None and changes >= args.max_changes:
                    return EXIT_OK
    return EXIT_OK


def _report(error: ImageShareError, err: TextIO) -> None:
    err.write(f"imageshare: {error.code_name}: {error.message}\n")
    if error.reason:
        details = ", ".join(f"{k}={v}" for k, v in sorted(error.metadata.items()))
        err.write(f"  reason: {error.reason}" + (f" ({details})" if details else "") + "\n")
    for violation in error.field_violations:
        err.write(f"  field {violation.field}: {violation.description}\n")
    if error.retry_after is not None:
        err.write(f"  retry after {error.retry_after:g}s\n")


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.command == "audit":
        return _audit.run(args, out, err)
    with ImageShareClient(args.target, timeout=getattr(args, "timeout", None)) as client:
        if args.command == "list":
            return _list(client, args, out, err)
        if args.command == "watch":
            return _watch(client, args, out)
        return _check(client, args, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "audit" and args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.command == "watch" and args.max_changes is not None and args.max_changes < 1:
        parser.error("--max-changes must be at least 1")
    out, err = sys.stdout, sys.stderr
    try:
        return _run(args, out, err)
    except ImageShareError as error:
        _report(error, err)
        return EXIT_RPC_ERROR
    except _audit.AuditInputError as error:
        err.write(f"imageshare: {error}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `imageshare list | head` closes stdout early; that is not an error for the caller.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
