"""Shared fixtures: one emulator and one server process for the session, fresh knobs per test.

Tests that need a server with other settings start their own with
``ServerProcess`` (see ``start_server``); every process is stopped at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from imageshare.v1 import image_share_pb2_grpc
from imageshare_emulator import Emulator, EmulatorAdmin
from tests.support.node import install_node_modules
from tests.support.processes import DEMO_ENV, EmulatorProcess, ServerProcess


@pytest.fixture(scope="session")
def emulator_process() -> Iterator[EmulatorProcess]:
    emulator = EmulatorProcess()
    yield emulator
    emulator.stop()


@pytest.fixture
def emulator(emulator_process: EmulatorProcess) -> Iterator[EmulatorAdmin]:
    """The session emulator with every knob and counter reset, before and after the test."""
    admin = EmulatorAdmin(emulator_process.url)
    admin.reset()
    yield admin
    admin.reset()


@pytest.fixture(scope="session")
def server(emulator_process: EmulatorProcess) -> Iterator[ServerProcess]:
    process = ServerProcess("--cache-ttl", "0", upstream=emulator_process.url)
    yield process
    process.stop()


@pytest.fixture
def start_server(emulator_process: EmulatorProcess) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str, upstream: str | None = "emulator", **kwargs: object) -> ServerProcess:
        url = emulator_process.url if upstream == "emulator" else upstream
        process = ServerProcess(*args, upstream=url, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[image_share_pb2_grpc.ImageShareServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield image_share_pb2_grpc.ImageShareServiceStub(channel)


@pytest.fixture(scope="session")
def local_emulator() -> Iterator[Emulator]:
    """An emulator serving from a thread of the test process (for in-process apps)."""
    emulator = Emulator(
        credentials={
            DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_ID"]: DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]
        }
    )
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def ecs(local_emulator: Emulator) -> Iterator[Emulator]:
    """The in-process emulator with every knob and counter reset, before and after the test."""
    local_emulator.knobs.reset()
    yield local_emulator
    local_emulator.knobs.reset()


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """clients/node's dependencies, installed on a fresh clone (see tests/support/node.py)."""
    return install_node_modules()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow or toolchain tests first (a stable sort: order within a file kept).

    ``make pytest`` hands whole files to its workers in this order, so the long files
    start at once instead of leaving one worker busy at the end while the other idles.
    """
    heavy = {
        item.path
        for item in items
        if item.get_closest_marker("slow") or item.get_closest_marker("toolchain")
    }
    items.sort(key=lambda item: item.path not in heavy)
