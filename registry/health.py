"""The standard grpc.health.v1.Health service.

It answers SERVING only while the replica is ready: every task started, its
database reachable (the notifier's connection up), and not draining. Both
the server as a whole ("") and the Registry service by name are known. Once
draining, a Watch stream ends (OK) right after it has said NOT_SERVING: left
open, it would hold the drain for its whole grace period and then be cut
with UNAVAILABLE.
"""

from __future__ import annotations

import trio
from grpc_health.v1 import health_pb2

from ._grpc import Call, Method, Service
from .errors import NotFound

SERVICE_NAME = "grpc.health.v1.Health"

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health:
    def __init__(self, services: list[str]) -> None:
        self._known = {"", *services}
        self._serving = False
        self._draining = False
        self._changed = trio.Event()

    @property
    def serving(self) -> bool:
        return self._serving

    def set_serving(self, serving: bool) -> None:
        if serving != self._serving and not self._draining:
            self._serving = serving
            self._changed.set()
            self._changed = trio.Event()

    def drain(self) -> None:
        """Answer NOT_SERVING from now on, and end every Watch stream once it
        has sent that."""
        self._draining = True
        self._serving = False
        self._changed.set()
        self._changed = trio.Event()

    def service(self) -> Service:
        return Service(
            SERVICE_NAME,
            {
                "Check": Method(health_pb2.HealthCheckRequest, self.check),
                "Watch": Method(
                    health_pb2.HealthCheckRequest, self.watch, streaming=True
                ),
            },
        )

    def _status(self, service: str) -> int:
        if service not in self._known:
            return SERVICE_UNKNOWN
        return SERVING if self._serving else NOT_SERVING

    async def check(
        self, request: health_pb2.HealthCheckRequest, call: Call
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self._known:
            raise NotFound(f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status(request.service))

    async def watch(self, request: health_pb2.HealthCheckRequest, call: Call) -> None:
        while True:
            changed = self._changed
            await call.send(
                health_pb2.HealthCheckResponse(status=self._status(request.service))
            )
            if self._draining:
                return
            await changed.wait()
