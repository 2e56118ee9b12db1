"""What a buggy or hostile caller does, from loopback (the isolation tests, bench/abuse.py)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

from imageshare.v1 import image_share_pb2

LIST_PATH = "/imageshare.v1.ImageShareService/ListImageShares"
WATCH_PATH = "/imageshare.v1.ImageShareService/WatchImageShares"


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class ZeroWindowAttacker:
    """One HTTP/2 connection that opens ``streams`` calls at once and never lets data flow.

    Its initial stream window is 0 and it never sends WINDOW_UPDATE, so the
    server can send headers and trailers but no message. It ignores the
    server's SETTINGS: every stream is sent before they arrive.
    """

    def __init__(
        self,
        host: str,
        port: int,
        streams: int,
        *,
        region_id: str = "cn-hangzhou",
        image_id: str = "m-demo0000001",
        body: bytes | None = None,
        path: str = LIST_PATH,
    ) -> None:
        self.sock = socket.create_connection((host, port))
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.initiate_connection()
        self.lock = threading.Lock()
        self.reset: dict[int, int] = {}  # stream id -> RST_STREAM error code
        self.ended: set[int] = set()
        self.goaway = False
        if body is None:
            request = image_share_pb2.ListImageSharesRequest(region_id=region_id, image_id=image_id)
            body = grpc_frame(request.SerializeToString())
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{host}:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        for _ in range(streams):
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, headers)
            self.conn.send_data(stream_id, body, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                try:
                    events = self.conn.receive_data(data)
                except Exception:  # the server hung up mid-frame: the attack is over
                    return
                for event in events:
                    if isinstance(event, h2.events.StreamReset):
                        self.reset[event.stream_id] = int(event.error_code)
                    elif isinstance(event, h2.events.StreamEnded):
                        self.ended.add(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.goaway = True
                out = self.conn.data_to_send()
            if out:
                try:
                    self.sock.sendall(out)
                except OSError:
                    return

    @property
    def refused(self) -> int:
        with self.lock:
            return len(self.reset)

    def close(self) -> None:
        """Hang up (a FIN, even while the reader thread is blocked in ``recv``)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    """Poll a condition the caller cannot be notified of."""
    end = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
