"""gRPC health service whose Watch streams end once the server starts draining.

A ``Watch`` stream never ends by itself, and gRPC clients with client-side
health checking keep one open on every connection. The stock servicer tells
them NOT_SERVING but keeps the stream open, so ``server.stop(grace)`` waited
for those streams and every shutdown lasted the whole grace period. Here a
watcher is sent NOT_SERVING and the stream then ends with OK, so the drain
waits only for real work. ``Check`` is the stock one.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from grpc_health.v1 import health, health_pb2

# HealthCheckResponse.ServingStatus values (the health stubs are untyped).
Status = int
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class DrainingHealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, Status] = {"": int(NOT_SERVING)}  # until the app is up
        self._changed = asyncio.Condition()
        self._draining = False

    async def set(self, service: str, status: Status) -> None:
        await super().set(service, status)
        async with self._changed:
            if not self._draining:
                self._statuses[service] = int(status)
                self._changed.notify_all()

    @property
    def serving(self) -> bool:
        """True while the overall service ("") is SERVING: not before start, not while draining."""
        return not self._draining and self._statuses.get("") == int(SERVING)

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        async with self._changed:
            self._draining = True
            self._statuses = dict.fromkeys(self._statuses, int(NOT_SERVING))
            self._changed.notify_all()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        last: Status | None = None
        while True:
            # The lock is not held while writing: a slow watcher must not block ``set``.
            async with self._changed:
                await self._changed.wait_for(partial(self._news, request.service, last))
                status, draining = self._status(request.service), self._draining
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if draining:
                return

    def _news(self, service: str, last: Status | None) -> bool:
        return self._draining or self._status(service) != last

    def _status(self, service: str) -> Status:
        return self._statuses.get(service, int(SERVICE_UNKNOWN))
