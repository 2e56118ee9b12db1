"""Start the real server and emulator as subprocesses and wait for their ready lines.

Readiness is an event the process announces on stderr (a JSON line with
``"event"``), never a sleep. Every stderr line is kept so tests can assert on
the logs (and on what never appears in them).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
DEMO_ENV = {
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAI5tDemoAccessKeyId",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "DemoAccessKeySecretForTheEmulator",
}


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ALIBABA_CLOUD_", "IMAGESHARE_"))
    }
    # Never let a credential chain probe the real metadata service from a test.
    env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Process:
    """A child process whose stderr JSON lines are collected as they arrive."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], ready_event: str) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.proc = subprocess.Popen(
            self.argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self.wait_for(ready_event)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._events.put(record)
        self._events.put(None)

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """Block until the process logs ``{"event": event}``; fail if it exits first."""
        while True:
            try:
                record = self._events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{self.argv[0]}: no {event!r} within {timeout}s") from None
            if record is None:
                raise AssertionError(
                    f"{self.argv[0]} exited ({self.proc.wait()}) before {event!r}:\n"
                    + "".join(self.lines[-30:])
                )
            if record.get("event") == event:
                return record

    @property
    def log_text(self) -> str:
        return "".join(self.lines)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


class EmulatorProcess(Process):
    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        super().__init__(
            [str(BIN / "imageshare-emulator"), "--listen", "127.0.0.1:0", *args],
            base_env({**DEMO_ENV, **(env or {})}),
            "emulator_listening",
        )
        self.url: str = self.ready["url"]


class ServerProcess(Process):
    def __init__(
        self,
        *args: str,
        upstream: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        argv = [
            str(BIN / "imageshare-server"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            *(["--upstream-endpoint", upstream] if upstream else []),
            *args,
        ]
        super().__init__(argv, base_env({**DEMO_ENV, **(env or {})}), "serving")
        self.grpc_port: int = self.ready["grpc_port"]
        self.metrics_port: int | None = self.ready.get("metrics_port")
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
