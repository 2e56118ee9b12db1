"""State and decisions shared by the sync and async watches and checks; no I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import grpc

from imageshare.v1 import image_share_pb2 as pb

from .channel import RetryPolicy
from .errors import ImageShareError
from .models import PUBLIC_GROUP, ShareChange, SharedAccount, _time

# A watch reconnects for as long as it is iterated: UNAVAILABLE is what a watch ends with
# when its server drains or its connection reaches its age, and the next one serves it.
DEFAULT_RECONNECT = RetryPolicy(max_attempts=1_000_000, initial_backoff=0.1, max_backoff=10.0)
# Backoff grows no further than this many failures in a row: the cap (max_backoff) is
# reached long before, and a larger exponent would overflow a float.
_MAX_EXPONENT = 20


def check_request(
    region: str, image: str, account_id: str, owner_account: str, bypass_cache: bool
) -> pb.CheckImageShareRequest:
    return pb.CheckImageShareRequest(
        region_id=region,
        image_id=image,
        aliyun_id=account_id,
        owner_account=owner_account,
        bypass_cache=bypass_cache,
    )


def watch_request(region: str, image: str, owner_account: str) -> pb.WatchImageSharesRequest:
    return pb.WatchImageSharesRequest(region_id=region, image_id=image, owner_account=owner_account)


def reconnect_delay(error: ImageShareError, failures: int, policy: RetryPolicy) -> float | None:
    """Seconds to wait before reconnecting after ``failures`` failures in a row, or None
    when ``error`` must reach the caller.

    UNAVAILABLE (a drain, a connection at its age, a stalled stream, no server) and
    RESOURCE_EXHAUSTED with a retry hint (the server's watch limit) are waited out;
    anything else (NOT_FOUND: the image was deleted; INVALID_ARGUMENT...) is an answer.
    """
    if failures >= policy.max_attempts:
        return None
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return policy.backoff(min(failures, _MAX_EXPONENT))
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None:
        return max(error.retry_after, policy.backoff(min(failures, _MAX_EXPONENT)))
    return None


def ended_error() -> ImageShareError:
    return ImageShareError(grpc.StatusCode.UNAVAILABLE, "the server ended the watch")


@dataclass(slots=True)
class WatchState:
    """The list a watch holds, brought up to date by each message.

    A snapshot after a reconnect is compared with what the watch held, and the
    difference is reported as a ``resumed`` change: the caller sees every change,
    whether it happened while connected or not.
    """

    region_id: str
    image_id: str
    accounts: dict[str, SharedAccount] = field(default_factory=dict)
    share_groups: list[str] = field(default_factory=list)
    started: bool = False
    reconnects: int = 0

    @property
    def is_public(self) -> bool:
        return PUBLIC_GROUP in self.share_groups

    def apply(self, msg: pb.WatchImageSharesResponse) -> ShareChange | None:
        """The change ``msg`` makes to the state (None: it changes nothing the caller has)."""
        if msg.snapshot:
            return self._snapshot(msg)
        removed = tuple(i for i in msg.removed_aliyun_ids if i in self.accounts)
        for gone in removed:
            del self.accounts[gone]
        groups_removed = tuple(g for g in msg.removed_share_groups if g in self.share_groups)
        self.share_groups = [g for g in self.share_groups if g not in groups_removed]
        added = tuple(SharedAccount.from_proto(a) for a in msg.accounts)
        self.accounts.update((a.aliyun_id, a) for a in added)
        groups_added = tuple(g.group for g in msg.share_groups if g.group not in self.share_groups)
        self.share_groups.extend(groups_added)
        return self._change(msg, added, removed, groups_added, groups_removed)

    def _snapshot(self, msg: pb.WatchImageSharesResponse) -> ShareChange | None:
        accounts = {a.aliyun_id: SharedAccount.from_proto(a) for a in msg.accounts}
        groups = list(dict.fromkeys(g.group for g in msg.share_groups))
        if not self.started:
            self.started = True
            self.accounts, self.share_groups = accounts, groups
            change = self._change(msg, tuple(accounts.values()), (), tuple(groups), ())
            return replace(change, snapshot=True)
        # A new stream after a reconnect: report what changed while disconnected.
        added = tuple(a for i, a in accounts.items() if self.accounts.get(i) != a)
        removed = tuple(i for i in self.accounts if i not in accounts)
        groups_added = tuple(g for g in groups if g not in self.share_groups)
        groups_removed = tuple(g for g in self.share_groups if g not in groups)
        self.accounts, self.share_groups = accounts, groups
        if not (added or removed or groups_added or groups_removed):
            return None
        change = self._change(msg, added, removed, groups_added, groups_removed)
        return replace(change, resumed=True)

    def _change(
        self,
        msg: pb.WatchImageSharesResponse,
        added: tuple[SharedAccount, ...],
        removed: tuple[str, ...],
        groups_added: tuple[str, ...],
        groups_removed: tuple[str, ...],
    ) -> ShareChange:
        return ShareChange(
            region_id=self.region_id,
            image_id=self.image_id,
            snapshot=False,
            added=added,
            removed=removed,
            groups_added=groups_added,
            groups_removed=groups_removed,
            total_count=len(self.accounts),
            read_time=_time(msg),
        )
