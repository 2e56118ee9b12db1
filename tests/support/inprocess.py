"""The whole app in the test's own process: ``app.start(settings)`` on a fresh registry,
against an emulator running in a thread of the same process.

Behaviour tests use this: no process to start, and the clock, the metrics
registry and the log records are the test's to inspect. A subprocess is
kept for what needs a process boundary (signals, stderr, the CLI, the image).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import Emulator
from imageshare_server import app
from imageshare_server.config import parse_settings
from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.credentials import Credentials
from imageshare_server.credentials._base import StaticCredentialsProvider
from tests.support.processes import DEMO_ENV
from tests.support.rpc import Details, details

Request = image_share_pb2.ListImageSharesRequest
Response = image_share_pb2.ListImageSharesResponse

DEMO_CREDENTIALS = Credentials(
    DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_ID"], DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]
)


class RecordCapture(logging.Handler):
    """Keeps every record logged while an app runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def rpc_lines(self) -> list[dict[str, Any]]:
        """The per-RPC log lines' fields, in the order the calls ended."""
        return [
            dict(r.fields)  # type: ignore[attr-defined]
            for r in self.records
            if r.name == "imageshare.rpc" and isinstance(getattr(r, "fields", None), dict)
        ]


@contextlib.contextmanager
def captured_logs() -> Iterator[RecordCapture]:
    capture = RecordCapture()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(previous)


@dataclass
class InProcessApp:
    runtime: app.Runtime
    emulator: Emulator
    registry: CollectorRegistry
    clock: Clock
    logs: RecordCapture
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.runtime.grpc_port}"

    def channel(self, *options: tuple[str, Any]) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.target, options=list(options))
        self.channels.append(channel)
        return channel

    def stub(self, *options: tuple[str, Any]) -> image_share_pb2_grpc.ImageShareServiceAsyncStub:
        return image_share_pb2_grpc.ImageShareServiceStub(self.channel(*options))

    async def list(self, rpc_timeout: float | None = 10.0, **fields: Any) -> list[Response]:
        call = self.stub().ListImageShares(Request(**fields), timeout=rpc_timeout)
        return [message async for message in call]

    async def error(self, rpc_timeout: float | None = 10.0, **fields: Any) -> Details:
        try:
            await self.list(rpc_timeout=rpc_timeout, **fields)
        except grpc.aio.AioRpcError as exc:
            return details(exc)
        raise AssertionError("the call succeeded")

    def metric(self, name: str, **labels: str) -> float:
        """A sample of this app's own registry (every metric it exports)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels``."""
        return sum(
            sample.value
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def upstream_calls(self, image_id: str | None = None) -> int:
        counters = self.emulator.knobs.counters()
        if image_id is None:
            return int(counters["calls_by_action"].get("DescribeImageSharePermission", 0))
        return sum(p["count"] for p in counters["calls_by_page"] if p["image_id"] == image_id)


@contextlib.asynccontextmanager
async def running(
    emulator: Emulator, *args: str, clock: Clock = SYSTEM_CLOCK
) -> AsyncIterator[InProcessApp]:
    """Start the app with ``args`` (flags) against ``emulator``; stop it afterwards."""
    settings = parse_settings(
        [
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--upstream-endpoint",
            emulator.url,
            "--grace-period",
            "1",
            *args,
        ],
        env={},
    )
    registry = CollectorRegistry()
    with captured_logs() as logs:
        runtime = await app.start(
            settings,
            registry=registry,
            clock=clock,
            credentials=StaticCredentialsProvider(DEMO_CREDENTIALS),
        )
        started = InProcessApp(runtime, emulator, registry, clock, logs)
        try:
            yield started
        finally:
            for channel in started.channels:
                await channel.close()
            await app.shutdown(runtime)
