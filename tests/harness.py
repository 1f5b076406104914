"""Helpers to run replicas and call them, for the tests.

In-process replicas (`start_replica`) serve on the test's own Trio loop;
replica processes (`replica_process`) are real `registry serve` processes,
for tests that kill one. Both report readiness through a signal: the
started() of the replica's task, or its "replica ready" log line.

grpcio's client is blocking, so its calls run in a worker thread
(`in_thread`), leaving the Trio loop free to serve them.
"""

from __future__ import annotations

import contextlib
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
    ops_host="127.0.0.1",
    ops_port=0,
    pool_size=4,
    progress_interval=5.0,
    poll_interval=0.5,
    drain_grace=5.0,
    # No health probes unless a test asks for them (max_probes=...): most
    # tests register made-up addresses, which must not be sent a packet.
    max_probes=0,
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


def registration(
    name: str = "billing", instance_id: str = "", port: int = 0, **fields: Any
) -> Any:
    """A valid RegisterRequest, to adjust per test.

    Its grpc API asks for `port`; 0, the default, has the registry assign one.
    A port named on the same address by two instances is refused to the second.
    """
    request = pb.RegisterRequest(
        name=name,
        instance_id=instance_id,
        version="1.4.2",
        address="127.0.0.1",
        apis=[pb.Api(name="grpc", port=port)],
    )
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(request, key).extend(value)
        elif isinstance(value, dict):
            getattr(request, key).update(value)
        else:
            setattr(request, key, value)
    return request


# grpcio's streaming iterator blocks, so `watch_stream` reads it in a worker
# thread and hands each response to Trio through an unbuffered memory channel:
# the thread takes the next message off the wire only when the test has taken
# the previous one, which also lets a test stop reading altogether.


class StreamEnded(Exception):
    """The watch stream ended with status OK."""


class WatchStream:
    """The responses of one grpcio Watch call, received from Trio."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive

    async def receive(self) -> pb.WatchResponse:
        """The next response; raises the call's grpc.RpcError, or StreamEnded,
        once the stream is over."""
        with trio.fail_after(WAIT):
            item = await self._receive.receive()
        if isinstance(item, grpc.RpcError):
            raise item
        if item is None:
            raise StreamEnded
        assert isinstance(item, pb.WatchResponse)
        return item

    async def receive_event(self) -> pb.Event:
        """The next response, which must be an event."""
        response = await self.receive()
        assert response.WhichOneof("kind") == "event", response
        return response.event

    async def snapshot(self) -> tuple[list[pb.Instance], int]:
        """The snapshot's instances and the revision of its SnapshotEnd."""
        instances: list[pb.Instance] = []
        while True:
            response = await self.receive()
            if response.WhichOneof("kind") == "snapshot_end":
                return instances, response.snapshot_end.revision
            assert response.WhichOneof("kind") == "snapshot", response
            instances.append(response.snapshot)

    async def status(self) -> tuple[list[pb.WatchResponse], Any]:
        """Every response left, and the grpc.RpcError that ended the stream."""
        responses = []
        while True:
            try:
                responses.append(await self.receive())
            except grpc.RpcError as exc:
                return responses, exc


@asynccontextmanager
async def watch_stream(
    stub: registry_pb2_grpc.RegistryStub, request: pb.WatchRequest
) -> AsyncIterator[WatchStream]:
    """A Watch call through a grpcio stub, cancelled on the way out."""
    call = stub.Watch(request, timeout=WAIT)
    send, receive = trio.open_memory_channel[Any](0)

    def read() -> None:
        # Runs in a worker thread: each message, then the outcome (None for
        # OK, else the error), until the test stops listening or is cancelled.
        outcome = None
        try:
            for response in call:
                trio.from_thread.run(send.send, response)
        except grpc.RpcError as exc:
            outcome = exc
        except (trio.BrokenResourceError, trio.Cancelled):
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.Cancelled):
            trio.from_thread.run(send.send, outcome)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, read)
        try:
            yield WatchStream(receive)
        finally:
            call.cancel()
            receive.close()


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
        "--ops-port",
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
        # No health probes unless asked for, as in TEST_CONFIG.
        env={**os.environ, "REGISTRY_MAX_PROBES": "0", **env},
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
