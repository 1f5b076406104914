"""The ceiling of the registry's stack: a gRPC server whose handler does
nothing, under Trio.

    python -m bench.servers purerpc    plain purerpc.Server
    python -m bench.servers shell      the registry's own GrpcServer

Both answer `registry.v1.Registry/Resolve` and `/Register` with an empty
response, so the load generator calls them exactly as it calls the registry.
Each prints "listening on 127.0.0.1:PORT" once it accepts calls, and serves
until SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Any

import anyio
import anyio.abc
import purerpc
import trio
from purerpc.server import ConnectionHandler

from registry._grpc import Call, GrpcServer, Method, Service
from registry.service import SERVICE_NAME
from registry.v1 import registry_pb2 as pb
from registry.v1.registry_grpc import RegistryServicer

HOST = "127.0.0.1"


class _EmptyServicer(RegistryServicer):  # type: ignore[misc]  # purerpc is untyped
    async def Resolve(self, message: pb.ResolveRequest) -> pb.ResolveResponse:
        return pb.ResolveResponse()

    async def Register(self, message: pb.RegisterRequest) -> pb.RegisterResponse:
        return pb.RegisterResponse()


class _LoopbackServer(purerpc.Server):  # type: ignore[misc]  # purerpc is untyped
    """purerpc.Server, bound to loopback only.

    purerpc's serve_async() always listens on every interface; this is the
    same code with the host given. The connection handling is purerpc's own.
    """

    async def serve_async(
        self, *, task_status: Any = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        services = {}
        async with contextlib.AsyncExitStack() as stack:
            for name, context in self.services.items():
                services[name] = await stack.enter_async_context(context)
            task_status.started(self.port)
            await listener.serve(ConnectionHandler(services, self))


async def _serve_purerpc(task_status: trio.TaskStatus[int]) -> None:
    server = _LoopbackServer()
    server.add_service(_EmptyServicer().service)
    await server.serve_async(task_status=task_status)


async def _serve_shell(task_status: trio.TaskStatus[int]) -> None:
    async def resolve(request: pb.ResolveRequest, call: Call) -> pb.ResolveResponse:
        return pb.ResolveResponse()

    async def register(request: pb.RegisterRequest, call: Call) -> pb.RegisterResponse:
        return pb.RegisterResponse()

    server = GrpcServer(
        [
            Service(
                SERVICE_NAME,
                {
                    "Resolve": Method(pb.ResolveRequest, resolve),
                    "Register": Method(pb.RegisterRequest, register),
                },
            )
        ],
        host=HOST,
        port=0,
    )
    await server.serve(task_status=task_status)


async def _main(flavour: str) -> None:
    serve = {"purerpc": _serve_purerpc, "shell": _serve_shell}[flavour]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve)
            print(f"listening on {HOST}:{port}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in ("purerpc", "shell"):
        raise SystemExit("usage: python -m bench.servers purerpc|shell")
    trio.run(_main, sys.argv[1])


if __name__ == "__main__":
    main()
