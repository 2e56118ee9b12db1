"""Test knobs and counters: latency, throttling, faults, data changes, and what was called.

One object serves the in-process API (``emulator.knobs``) and the admin HTTP API; every
public method takes and returns JSON-friendly values so the two stay the same operations.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from imageshare_emulator import errors
from imageshare_emulator.data import (
    Account,
    EmulatorData,
    Image,
    image_from_dict,
    image_to_dict,
)

FAULT_MODES = ("reset", "truncated", "malformed", "slow_body", "error_code", "raw")


@dataclass(frozen=True)
class Fault:
    """A fault to inflict on one call."""

    mode: str
    status: int = 500
    code: str = "InternalError"
    message: str = "The request processing has failed due to some unknown error."
    interval_ms: int = 200
    # mode "raw": answer with exactly this status, body and headers (a broken or hostile ECS).
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class _FaultRule:
    fault: Fault
    remaining: int | None
    rate: float | None


def _page_key(params: Mapping[str, str]) -> tuple[str, int | str, int | str]:
    def num(name: str, default: int) -> int | str:
        raw = params.get(name)
        if raw is None or raw == "":
            return default
        return int(raw) if raw.isdigit() else raw

    return params.get("ImageId", ""), num("PageNumber", 1), num("PageSize", 10)


class Knobs:
    def __init__(self, data: EmulatorData) -> None:
        self._data = data
        self._lock = threading.Lock()
        self._random = random.Random()
        self._generation = 0
        self._clear()

    def _clear(self) -> None:
        self._generation += 1
        self.latency_ms = 0.0
        self.latency_jitter_ms = 0.0
        self.error_rate = 0.0
        self.qps_limit = 0
        self.down = False
        self._throttle_next = 0
        self._faults: list[_FaultRule] = []
        self._changes: dict[tuple[str, str], tuple[int, tuple[Account, ...]]] = {}
        self._churning: set[tuple[str, str]] = set()
        self._qps_window: dict[str, tuple[int, int]] = {}
        self._calls_by_action: Counter[str] = Counter()
        self._calls_by_page: Counter[tuple[str, int | str, int | str]] = Counter()
        self._outcomes: Counter[str] = Counter()
        self._versions: Counter[str] = Counter()
        self._nonces: list[str] = []
        self._in_flight = 0
        self._max_in_flight = 0

    # --- Operations (same names as the admin HTTP API) ---------------------------------------

    def set(
        self,
        *,
        latency_ms: float | None = None,
        latency_jitter_ms: float | None = None,
        error_rate: float | None = None,
        qps_limit: int | None = None,
        down: bool | None = None,
        seed: int | None = None,
    ) -> None:
        """Change the given settings; ``None`` leaves a setting as it is.

        ``seed`` fixes the random draws (error_rate, fault rates, jitter) so a
        test of random failures replays the same failures every run.
        """
        if error_rate is not None and not 0.0 <= error_rate <= 1.0:
            raise ValueError("error_rate must be within 0..1")
        with self._lock:
            if latency_ms is not None:
                self.latency_ms = float(latency_ms)
            if latency_jitter_ms is not None:
                self.latency_jitter_ms = float(latency_jitter_ms)
            if error_rate is not None:
                self.error_rate = float(error_rate)
            if qps_limit is not None:
                self.qps_limit = int(qps_limit)
            if down is not None:
                self.down = bool(down)
            if seed is not None:
                self._random.seed(int(seed))

    def throttle_next(self, n: int) -> None:
        """The next ``n`` calls answer ``Throttling.User``."""
        with self._lock:
            self._throttle_next = int(n)

    def fault(
        self,
        mode: str,
        *,
        count: int | None = None,
        rate: float | None = None,
        status: int | None = None,
        code: str | None = None,
        message: str | None = None,
        interval_ms: int | None = None,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Inflict ``mode`` on the next ``count`` calls, or on a ``rate`` share of calls.

        ``raw`` answers with ``status``, ``body`` (Latin-1: one byte per character, so
        any bytes can be sent through the JSON admin API) and ``headers`` as given.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; choose from {FAULT_MODES}")
        if (count is None) == (rate is None):
            raise ValueError("give exactly one of count or rate")
        fault = Fault(mode)
        overrides: dict[str, Any] = {}
        if status is not None:
            overrides["status"] = int(status)
        if code is not None:
            overrides["code"] = code
            if message is None:
                overrides["message"] = f"Injected {code}."
        if message is not None:
            overrides["message"] = message
        if interval_ms is not None:
            overrides["interval_ms"] = int(interval_ms)
        if body is not None:
            overrides["body"] = str(body)
        if headers is not None:
            overrides["headers"] = tuple((str(k), str(v)) for k, v in headers.items())
        fault = replace(fault, **overrides)
        with self._lock:
            self._faults.append(_FaultRule(fault, count, rate))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Clear every knob and counter (the data stays as it is)."""
        with self._lock:
            self._clear()

    def upsert_image(self, image: Mapping[str, Any] | Image) -> None:
        self._data.upsert(image if isinstance(image, Image) else image_from_dict(image))

    def delete_image(self, region_id: str, image_id: str) -> bool:
        return self._data.delete(region_id, image_id)

    def modify_share(
        self,
        region_id: str,
        image_id: str,
        *,
        add_accounts: Iterable[Mapping[str, Any] | str] = (),
        remove_accounts: Iterable[str] = (),
        add_groups: Iterable[str] = (),
        remove_groups: Iterable[str] = (),
    ) -> dict[str, Any] | None:
        """Share the image with accounts or groups and unshare others, as ECS's
        ModifyImageSharePermission does (``add_groups=["all"]`` makes it public).

        An added account is an id or ``{"aliyun_id", "shared_time"}``; without a
        shared time it gets the current time. Returns the image as it now is (the
        data-file shape), or None when there is no such image.
        """
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        added = tuple(
            Account(a, now)
            if isinstance(a, str)
            else Account(str(a["aliyun_id"]), a.get("shared_time") or now)
            for a in add_accounts
        )
        changed = self._data.modify_share(
            region_id,
            image_id,
            add_accounts=added,
            remove_accounts=[str(a) for a in remove_accounts],
            add_groups=[str(g) for g in add_groups],
            remove_groups=[str(g) for g in remove_groups],
        )
        return None if changed is None else image_to_dict(changed)

    def change_after(
        self,
        region_id: str,
        image_id: str,
        calls: int,
        accounts: Iterable[Mapping[str, Any] | Account],
    ) -> None:
        """Replace the image's accounts once ``calls`` more calls for it have been answered."""
        new = tuple(
            a if isinstance(a, Account) else Account(str(a["aliyun_id"]), a.get("shared_time"))
            for a in accounts
        )
        if calls <= 0:
            self._data.replace_accounts(region_id, image_id, new)
            return
        with self._lock:
            self._changes[(region_id, image_id)] = (int(calls), new)

    def churn(self, region_id: str, image_id: str) -> None:
        """Share the image with one more account after every call answered for it.

        Its list then never holds still between two page reads: a reader that
        checks its snapshot cannot settle (the service answers ABORTED).
        """
        with self._lock:
            self._churning.add((region_id, image_id))

    def settings(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency_ms": self.latency_ms,
                "latency_jitter_ms": self.latency_jitter_ms,
                "error_rate": self.error_rate,
                "qps_limit": self.qps_limit,
                "down": self.down,
                "throttle_next": self._throttle_next,
                "faults": [
                    {**asdict(r.fault), "count": r.remaining, "rate": r.rate} for r in self._faults
                ],
            }

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": sum(self._calls_by_action.values()),
                "calls_by_action": dict(self._calls_by_action),
                "calls_by_page": [
                    {"image_id": i, "page_number": n, "page_size": s, "count": c}
                    for (i, n, s), c in self._calls_by_page.items()
                ],
                "outcomes": dict(self._outcomes),
                "signature_versions": dict(self._versions),
                "nonces": list(self._nonces),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
            }

    def page_calls(self, image_id: str, page_number: int, page_size: int) -> int:
        with self._lock:
            return self._calls_by_page[(image_id, page_number, page_size)]

    # --- Hooks the server calls --------------------------------------------------------------

    def enter(self, action: str, params: Mapping[str, str], nonce: str | None) -> int:
        """Count a call as it arrives; returns the counters' generation for ``leave``."""
        with self._lock:
            self._calls_by_action[action] += 1
            if action == "DescribeImageSharePermission":
                self._calls_by_page[_page_key(params)] += 1
            if nonce is not None:
                self._nonces.append(nonce)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return self._generation

    def leave(self, generation: int, outcome: str, signature_version: str | None) -> None:
        """Count a call's outcome, unless the counters were reset while it was answered.

        A slow answer that outlives a ``reset`` belongs to the test before it.
        """
        with self._lock:
            if generation != self._generation:
                return
            self._in_flight -= 1
            self._outcomes[outcome] += 1
            if signature_version is not None:
                self._versions[signature_version] += 1

    def latency_seconds(self) -> float:
        with self._lock:
            base, jitter = self.latency_ms, self.latency_jitter_ms
        return max(0.0, base + self._random.uniform(-jitter, jitter)) / 1000.0

    def draw_fault(self) -> Fault | None:
        with self._lock:
            for rule in self._faults:
                if rule.remaining is not None and rule.remaining > 0:
                    rule.remaining -= 1
                    return rule.fault
                if rule.rate is not None and self._random.random() < rule.rate:
                    return rule.fault
            self._faults = [r for r in self._faults if r.rate is not None or r.remaining]
            return None

    def admit(self, action: str) -> errors.ApiError | None:
        """Throttling and random server errors, decided after authentication like ECS."""
        with self._lock:
            if self._throttle_next > 0:
                self._throttle_next -= 1
                return errors.throttled()
            if self.qps_limit > 0:
                second = int(time.monotonic())
                window, used = self._qps_window.get(action, (second, 0))
                if window != second:
                    window, used = second, 0
                self._qps_window[action] = (window, used + 1)
                if used >= self.qps_limit:
                    return errors.throttled()
            if self.error_rate > 0 and self._random.random() < self.error_rate:
                return self._random.choice([errors.SERVICE_UNAVAILABLE, errors.INTERNAL_ERROR])
        return None

    def answered(self, region_id: str, image_id: str) -> None:
        """Count a call served for an image, applying a pending ``change_after`` or churn."""
        with self._lock:
            churning = (region_id, image_id) in self._churning
        if churning:
            image = self._data.get(region_id, image_id)
            if image is not None:
                grown = (*image.accounts, Account(str(9 * 10**15 + len(image.accounts))))
                self._data.replace_accounts(region_id, image_id, grown)
        with self._lock:
            pending = self._changes.get((region_id, image_id))
            if pending is None:
                return
            remaining, accounts = pending
            if remaining > 1:
                self._changes[(region_id, image_id)] = (remaining - 1, accounts)
                return
            del self._changes[(region_id, image_id)]
        self._data.replace_accounts(region_id, image_id, accounts)
