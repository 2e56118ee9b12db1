"""The metrics listener: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for HTTP checks.

Anything else is 404: an HTTP check pointed at a wrong path must fail, not pass on a
200 with metrics. ``/healthz`` says the process serves HTTP; ``/readyz`` says the gRPC
side is SERVING (503 while it starts or drains), for load balancers and checks that
cannot speak gRPC health.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes are not worth a log line each."""


class _Server(ThreadingWSGIServer):
    daemon_threads = True


def _plain(start_response: StartResponse, status: str, body: str) -> Iterable[bytes]:
    data = body.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


class MetricsServer:
    """Serves the registry and the two checks on ``host:port`` from a daemon thread."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]
    ) -> None:
        metrics = make_wsgi_app(registry)

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                served: Iterable[bytes] = metrics(environ, start_response)
                return served
            if path == "/healthz":
                return _plain(start_response, "200 OK", "ok\n")
            if path == "/readyz":
                if ready():
                    return _plain(start_response, "200 OK", "ready\n")
                return _plain(start_response, "503 Service Unavailable", "not serving\n")
            return _plain(start_response, "404 Not Found", "not found: try /metrics\n")

        self._httpd = make_server(host, port, app, _Server, handler_class=_QuietHandler)
        self.port: int = self._httpd.server_port
        # serve_forever checks for shutdown once per poll interval; the default 0.5 s
        # would hold every stop (and every test that starts an app) for that long.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
