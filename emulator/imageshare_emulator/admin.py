"""``EmulatorAdmin``: drive an emulator in another process through its admin HTTP API."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from imageshare_emulator.server import ADMIN_PREFIX


class EmulatorAdminError(RuntimeError):
    pass


class EmulatorAdmin:
    """Synchronous twin of ``Emulator.knobs`` for a subprocess emulator (tests, benchmarks)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self._client = httpx.Client(base_url=url.rstrip("/") + ADMIN_PREFIX, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> EmulatorAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: str, **kwargs: Any) -> Any:
        body = {k: v for k, v in kwargs.items() if v is not None}
        response = self._client.post(op, json=body)
        payload = response.json()
        if response.status_code != 200 or not payload.get("ok"):
            raise EmulatorAdminError(f"{op}: {payload.get('error', response.status_code)}")
        return payload["result"]

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("health")
        return result

    def counters(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("counters")
        return result

    def settings(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("settings")
        return result

    def page_calls(self, image_id: str, page_number: int, page_size: int) -> int:
        return sum(
            row["count"]
            for row in self.counters()["calls_by_page"]
            if (row["image_id"], row["page_number"], row["page_size"])
            == (image_id, page_number, page_size)
        )

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
        self._call(
            "set",
            latency_ms=latency_ms,
            latency_jitter_ms=latency_jitter_ms,
            error_rate=error_rate,
            qps_limit=qps_limit,
            down=down,
            seed=seed,
        )

    def throttle_next(self, n: int) -> None:
        self._call("throttle_next", n=n)

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
        self._call(
            "fault",
            mode=mode,
            count=count,
            rate=rate,
            status=status,
            code=code,
            message=message,
            interval_ms=interval_ms,
            body=body,
            headers=dict(headers) if headers is not None else None,
        )

    def clear_faults(self) -> None:
        self._call("clear_faults")

    def reset(self) -> None:
        self._call("reset")

    def upsert_image(self, image: Mapping[str, Any]) -> None:
        self._call("upsert_image", image=dict(image))

    def delete_image(self, region_id: str, image_id: str) -> bool:
        return bool(self._call("delete_image", region_id=region_id, image_id=image_id))

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
        result: dict[str, Any] | None = self._call(
            "modify_share",
            region_id=region_id,
            image_id=image_id,
            add_accounts=[a if isinstance(a, str) else dict(a) for a in add_accounts],
            remove_accounts=list(remove_accounts),
            add_groups=list(add_groups),
            remove_groups=list(remove_groups),
        )
        return result

    def change_after(
        self, region_id: str, image_id: str, calls: int, accounts: Iterable[Mapping[str, Any]]
    ) -> None:
        self._call(
            "change_after",
            region_id=region_id,
            image_id=image_id,
            calls=calls,
            accounts=[dict(a) for a in accounts],
        )

    def churn(self, region_id: str, image_id: str) -> None:
        self._call("churn", region_id=region_id, image_id=image_id)

    def add_credentials(
        self,
        access_key_id: str,
        secret: str,
        security_token: str | None = None,
        expires_at: float | None = None,
    ) -> None:
        self._call(
            "add_credentials",
            access_key_id=access_key_id,
            secret=secret,
            security_token=security_token,
            expires_at=expires_at,
        )

    def remove_credentials(self, access_key_id: str) -> None:
        self._call("remove_credentials", access_key_id=access_key_id)
