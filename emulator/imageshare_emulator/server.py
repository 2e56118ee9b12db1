"""The HTTP server: one thread per connection, HTTP/1.1 keep-alive, API and admin routes."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from imageshare_emulator import api, errors
from imageshare_emulator.credentials import CredentialStore, default_keys
from imageshare_emulator.data import EmulatorData, demo_data
from imageshare_emulator.knobs import Fault, Knobs
from imageshare_emulator.render import error_document, render
from imageshare_emulator.verify import IncomingRequest, Verifier

logger = logging.getLogger("imageshare.emulator")

ADMIN_PREFIX = "/_emulator/"
MALFORMED_BODY = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


def new_request_id() -> str:
    return str(uuid.uuid4()).upper()


@dataclass
class EmulatorResponse:
    """An answer before it is written, so faults can still mangle it."""

    status: int
    body: bytes
    content_type: str
    request_id: str
    code: str = "Success"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # Hundreds of callers connect at once in the load tests; the default backlog (5) would
    # make the kernel drop SYNs and turn injected latency into connect timeouts.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on kept-alive clients, so that a stopped emulator really stops answering."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-answer are routine here (faults, timeouts): no stderr traceback.
        logger.debug("emulator connection error", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (about 40 ms per call on Linux), which no real endpoint adds.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The request line holds V1 signatures and STS tokens: log the path only.
        logger.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        # Only the template: its arguments can include the raw request line.
        logger.debug("emulator: %s", format)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        if url.path.startswith(ADMIN_PREFIX):
            self._admin(url.path[len(ADMIN_PREFIX) :], body)
            return
        emulator = self.server.emulator
        if emulator.knobs.down:
            self._reset()
            return
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        params = dict(query)
        content_type = self.headers.get("content-type", "")
        if body and content_type.startswith("application/x-www-form-urlencoded"):
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        request = IncomingRequest(
            method=self.command,
            path=url.path or "/",
            query=query,
            params=params,
            headers=list(self.headers.items()),
            body=body,
        )
        knobs = emulator.knobs
        generation = knobs.enter(request.action or "", params, request.nonce)
        outcome = "Success"
        counted = False
        try:
            delay = knobs.latency_seconds()
            if delay > 0:
                time.sleep(delay)
            fault = knobs.draw_fault()
            if fault is not None and fault.mode == "reset":
                outcome = "fault:reset"
                self._reset()
                return
            response = emulator.answer(request, fault)
            outcome = response.code
            if fault is not None and fault.mode != "error_code":
                outcome = f"fault:{fault.mode}"
            # Counted before the answer leaves: a client that has read it may look at the
            # counters at once and must find its call there.
            knobs.leave(generation, outcome, request.signature_version)
            counted = True
            self._send(response, fault)
        finally:
            if not counted:
                knobs.leave(generation, outcome, request.signature_version)

    def _send(self, response: EmulatorResponse, fault: Fault | None = None) -> None:
        if fault is not None and fault.mode == "raw":
            self._send_raw(fault, response.request_id)
            return
        body, content_type = response.body, response.content_type
        if fault is not None and fault.mode == "malformed":
            body, content_type = MALFORMED_BODY, "text/html"
        self.send_response(200 if fault and fault.mode == "malformed" else response.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-acs-request-id", response.request_id)
        self.end_headers()
        if fault is not None and fault.mode == "truncated":
            self.wfile.write(body[: max(1, len(body) // 2)])
            self._reset()
        elif fault is not None and fault.mode == "slow_body":
            step = max(1, len(body) // 10)
            for start in range(0, len(body), step):
                self.wfile.write(body[start : start + step])
                self.wfile.flush()
                time.sleep(fault.interval_ms / 1000.0)
        else:
            self.wfile.write(body)

    def _send_raw(self, fault: Fault, request_id: str) -> None:
        body = fault.body.encode("latin-1")
        self.send_response(fault.status)
        names = {name.lower() for name, _ in fault.headers}
        if "content-type" not in names:
            self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-acs-request-id", request_id)
        for name, value in fault.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        """Drop the connection with a TCP RST and no answer, like a crashed upstream."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _admin(self, op: str, body: bytes) -> None:
        try:
            kwargs = json.loads(body) if body else {}
            if not isinstance(kwargs, dict):
                raise ValueError("the body must be a JSON object")
            result = self.server.emulator.admin(op, self.command, kwargs)
            status, payload = 200, {"ok": True, "result": result}
        except KeyError:
            status, payload = 404, {"ok": False, "error": f"no admin operation {op!r}"}
        except (TypeError, ValueError) as exc:
            # Only the exception type: the body may carry a secret (add_credentials).
            status, payload = 400, {"ok": False, "error": f"bad arguments ({type(exc).__name__})"}
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Emulator:
    """An ECS endpoint serving ``DescribeImageSharePermission``, for tests and demos."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data: EmulatorData | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.data = data if data is not None else demo_data()
        self.credential_store = CredentialStore(
            credentials if credentials is not None else default_keys()
        )
        self.verifier = Verifier(self.credential_store)
        self.knobs = Knobs(self.data)
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (and after stop), else the one asked for."""
        return self._port

    @property
    def url(self) -> str:
        if self._port == 0:
            raise RuntimeError("the emulator is not started")
        return f"http://{self.host}:{self._port}"

    def start(self) -> None:
        """Bind and serve in a background thread; returns once the socket is listening."""
        if self._server is not None:
            return
        self._server = _HTTPServer((self.host, self._port), self)
        self._port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ecs-emulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("ECS emulator listening on %s", self.url)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, request: IncomingRequest, fault: Fault | None = None) -> EmulatorResponse:
        """Authenticate, admit and run one API call; every failure becomes an ECS error."""
        request_id = new_request_id()
        params = request.params
        as_xml = request.signature_version == "v1" and params.get("Format", "XML").upper() != (
            "JSON"
        )
        try:
            if fault is not None and fault.mode == "error_code":
                raise errors.ApiError(fault.status, fault.code, fault.message)
            if request.action != api.ACTION:
                raise errors.ACTION_NOT_FOUND
            if request.version != api.API_VERSION:
                raise errors.INVALID_VERSION
            self.verifier.verify(request)
            refused = self.knobs.admit(api.ACTION)
            if refused is not None:
                raise refused
            document = api.describe_image_share_permission(params, self.data, request_id)
            self.knobs.answered(document["RegionId"], document["ImageId"])
            body, content_type = render(f"{api.ACTION}Response", document, as_xml)
            return EmulatorResponse(200, body, content_type, request_id)
        except errors.ApiError as exc:
            host_id = request.header("host") or "ecs.aliyuncs.com"
            document = error_document(request_id, host_id, exc.code, exc.message)
            body, content_type = render("Error", document, as_xml)
            return EmulatorResponse(exc.status, body, content_type, request_id, exc.code)

    def admin(self, op: str, method: str, kwargs: dict[str, Any]) -> Any:
        """Run an admin operation by name; raises KeyError for an unknown one."""
        knobs = self.knobs
        reads: dict[str, Callable[[], Any]] = {
            "health": lambda: {"url": self.url},
            "counters": knobs.counters,
            "settings": knobs.settings,
        }
        if method == "GET" and op in reads and not kwargs:
            return reads[op]()
        writes: dict[str, Callable[..., Any]] = {
            **reads,
            "set": knobs.set,
            "throttle_next": knobs.throttle_next,
            "fault": knobs.fault,
            "clear_faults": knobs.clear_faults,
            "reset": knobs.reset,
            "upsert_image": knobs.upsert_image,
            "delete_image": knobs.delete_image,
            "modify_share": knobs.modify_share,
            "change_after": knobs.change_after,
            "churn": knobs.churn,
            "add_credentials": self.credential_store.add,
            "remove_credentials": self.credential_store.remove,
        }
        return writes[op](**kwargs)
