"""Helpers to run replicas and call them, for the tests.

In-process replicas (`start_replica`) serve on the test's own Trio loop;
replica processes (`replica_process`) are real `registry serve` processes,
for tests that kill one. Both report readiness through a signal: the
started() of the replica's task, or its "replica ready" log line.

grpcio's client is blocking, so its calls run in a worker thread
(`in_thread`), leaving the Trio loop free to serve them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
import trio

from registry.app import Replica
from registry.config import Config
from registry.v1 import registry_pb2 as pb
from registry.v1 import registry_pb2_grpc

T = TypeVar("T")

# A deadline for anything a test waits on; generous for a loaded CI machine.
WAIT = 30.0

TEST_CONFIG = Config(
    host="127.0.0.1",
    port=0,
    pool_size=4,
    progress_interval=5.0,
    poll_interval=0.5,
    drain_grace=5.0,
)


async def start_replica(
    nursery: trio.Nursery, database_url: str, **overrides: Any
) -> Replica:
    """A replica on this Trio loop, ready (its port bound) when returned."""
    replica = Replica(replace(TEST_CONFIG, **overrides), database_url)
    with trio.fail_after(WAIT):
        await nursery.start(replica.run)
    return replica


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking (grpcio) call without blocking the Trio loop."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@dataclass
class GrpcClient:
    """The official grpcio client, on its own channel."""

    target: str
    channel: grpc.Channel = field(init=False)
    stub: registry_pb2_grpc.RegistryStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target)
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)

    async def call(self, method: str, request: Any, deadline: float = WAIT) -> Any:
        """`method` with a gRPC deadline of `deadline` seconds."""
        return await in_thread(getattr(self.stub, method), request, timeout=deadline)

    def close(self) -> None:
        self.channel.close()


@asynccontextmanager
async def grpc_client(port: int) -> AsyncIterator[GrpcClient]:
    client = GrpcClient(f"127.0.0.1:{port}")
    try:
        yield client
    finally:
        client.close()


def registration(name: str = "billing", instance_id: str = "", **fields: Any) -> Any:
    """A valid RegisterRequest, to adjust per test."""
    request = pb.RegisterRequest(
        name=name,
        instance_id=instance_id,
        version="1.4.2",
        address="127.0.0.1",
        apis=[pb.Api(name="grpc", port=8090)],
    )
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(request, key).extend(value)
        elif isinstance(value, dict):
            getattr(request, key).update(value)
        else:
            setattr(request, key, value)
    return request


_READY = re.compile(rb"replica ready: gRPC on [^ ]+:(\d+)")


@dataclass
class ReplicaProcess:
    process: trio.Process
    port: int
    # Everything the process logged, for the assertion messages.
    log: bytearray

    def kill(self) -> None:
        self.process.kill()

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        with trio.fail_after(WAIT):
            return await self.process.wait()


@asynccontextmanager
async def replica_process(
    database_url: str, *args: str, **env: str
) -> AsyncIterator[ReplicaProcess]:
    """A `registry serve` process on a free port; killed on the way out."""
    command = [
        sys.executable,
        "-m",
        "registry",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--database-url",
        database_url,
        *args,
    ]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    assert process.stderr is not None
    log = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            port_found, port_wait = trio.open_memory_channel[int](1)

            async def read_log() -> None:
                assert process.stderr is not None
                found = False
                async for chunk in process.stderr:
                    log.extend(chunk)
                    match = None if found else _READY.search(log)
                    if match:
                        found = True
                        port_found.send_nowait(int(match.group(1)))

            nursery.start_soon(read_log)
            with trio.fail_after(WAIT):
                port = await port_wait.receive()
            try:
                yield ReplicaProcess(process, port, log)
            finally:
                process.kill()
                with trio.fail_after(WAIT):
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
