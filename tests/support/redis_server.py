"""A throwaway ``redis-server`` on a free loopback port, owned by the test that starts it.

Persistence is off (``--save "" --appendonly no``) so nothing is written to
disk and a restart starts empty; the server on 6379, if any, is never
touched. Readiness is the server's own "Ready to accept connections" line,
confirmed by a PING, never a sleep.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        password: str = "",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key) PEM files; then only the TLS port is served."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("redis-server is not installed: run make bootstrap")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls[0])} if self.tls else {}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password or None,
            socket_timeout=2,
            **tls,  # type: ignore[arg-type]
        )

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same port) and return once PING is answered."""
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--loglevel", "notice",
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            argv[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(self.tls[0]), "--tls-key-file", str(self.tls[1])]
            argv += ["--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            raise AssertionError("redis-server did not start:\n" + "".join(self.lines[-20:]))
        client = self.client()
        try:
            assert client.ping()
        finally:
            client.close()

    def _drain(self, proc: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if "Ready to accept connections" in line:
                ready.set()
        ready.set()  # exited: start() reports the exit

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server, not a dead one)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
