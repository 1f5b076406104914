"""The ops HTTP endpoint: what an orchestrator and Prometheus ask a replica.

    GET /healthz   200 while the process runs (a liveness probe)
    GET /readyz    200 when the replica serves, else 503 with the reason
    GET /metrics   the replica's metrics, Prometheus text or OpenMetrics

It runs in the replica's own Trio loop, on hypercorn's Trio worker, with a
port of its own so that it can be kept off the network clients use. The
listening socket is made here rather than by hypercorn, so that a port in
use is a clear ServeError and no socket is left open.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from hypercorn.utils import wrap_app

from ._grpc import ServeError

__all__ = ["OpsServer"]

log = logging.getLogger("registry.ops")

# hypercorn's own log: only its warnings and errors are worth an operator's
# time (its INFO line says to press CTRL + C).
_server_log = logging.getLogger("registry.ops.server")
_server_log.addFilter(lambda record: record.levelno >= logging.WARNING)

# None when ready, else why not: a short sentence.
Readiness = Callable[[], Awaitable[str | None]]
# The Accept header -> the body and its content type.
Exposition = Callable[[str], Awaitable[tuple[bytes, str]]]


class OpsServer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        readiness: Readiness,
        metrics: Exposition,
    ) -> None:
        self.host = host
        self.port = port
        self._readiness = readiness
        self._metrics = metrics

    async def serve(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report the bound port through task_status, serve until
        cancelled."""
        sock = self._listen()
        try:
            self.port = sock.getsockname()[1]
            config = HypercornConfig()
            config.errorlog = _server_log
            config.accesslog = None
            # Cancellation ends the server; nothing is left to finish.
            config.graceful_timeout = 0
            app = wrap_app(self._app, config.wsgi_max_body_size, "asgi")
            sockets = Sockets([], [sock], [])
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(worker_serve, app, config, sockets=sockets))
                log.info("ops endpoint on http://%s:%d", self.host, self.port)
                task_status.started(self.port)
        finally:
            sock.close()

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            return socket.create_server((self.host, self.port), family=family)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"cannot listen on {self.host}:{self.port} for the ops endpoint: "
                    "the port is already in use; stop the other process or choose "
                    "another port (--ops-port, REGISTRY_OPS_PORT)"
                ) from None
            raise ServeError(
                f"cannot listen on {self.host}:{self.port} for the ops endpoint: "
                f"{exc.strerror}"
            ) from None

    async def _app(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"only GET and HEAD\n", allow=b"GET, HEAD")
        elif path == "/healthz":
            await _respond(send, 200, b"ok\n")
        elif path == "/readyz":
            reason = await self._readiness()
            if reason is None:
                await _respond(send, 200, b"ready\n")
            else:
                await _respond(send, 503, f"not ready: {reason}\n".encode())
        elif path == "/metrics":
            accept = dict(scope["headers"]).get(b"accept", b"").decode("latin-1")
            body, content_type = await self._metrics(accept)
            await _respond(send, 200, body, content_type=content_type)
        else:
            await _respond(send, 404, b"not found; try /metrics, /healthz or /readyz\n")


async def _lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(
    send: ASGISendCallable,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: bytes | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if allow is not None:
        headers.append((b"allow", allow))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
