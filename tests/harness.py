"""Helpers to run replicas and call them, for the tests.

In-process replicas (`start_replica`) serve on the test's own Trio loop;
replica processes (`replica_process`) are real `registry serve` processes,
for tests that kill one. Both report readiness through a signal: the
started() of the replica's task, or its "replica ready" log line.

grpcio's client is blocking, so its calls run in a worker thread
(`in_thread`), leaving the Trio loop free to serve them.

`TcpProxy` stands between a replica and Postgres or RabbitMQ, so that a test
can cut the connection or stall it without touching the shared servers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import grpc
import trio

from registry.app import Replica
from registry.config import Config
from registry.model import Event, EventType, HealthCheck, Instance, Status
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


_SAMPLE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def sample_event(
    revision: int,
    name: str = "billing",
    *,
    kind: EventType = EventType.REGISTERED,
    check: HealthCheck | None = None,
) -> Event:
    """An event of instance `{name}-1`, as the notifier hands it to the hub."""
    instance = Instance(
        name=name,
        instance_id=f"{name}-1",
        generation=1,
        status=Status.ACTIVE,
        address="127.0.0.1",
        version="",
        description="",
        apis=(),
        brokers=(),
        metadata={},
        check=check,
        registered_at=_SAMPLE_TIME,
        updated_at=_SAMPLE_TIME,
        revision=revision,
    )
    return Event(revision, kind, name, f"{name}-1", instance, _SAMPLE_TIME)


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


# --- the network between a replica and its servers ---------------------------

# The port of a URL that names none, by scheme.
_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "amqp": 5672}


class TcpProxy:
    """Forwards connections from a loopback port to `target`.

    cut() closes every connection and refuses new ones until heal(). pause()
    is a silent partition instead: connections stay open, nothing is
    forwarded either way (new ones are accepted and go nowhere) until
    resume(). `accepted` counts the connections that came in;
    wait_held() returns once data waits at a pause.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._cut = False
        self._links: set[trio.CancelScope] = set()
        self._flowing = trio.Event()
        self._flowing.set()
        self._came_in = trio.Event()
        self._held = trio.Event()
        self.accepted = 0
        self.port = 0

    @classmethod
    def to(cls, url: str) -> TcpProxy:
        """A proxy to the server of a postgresql:// or amqp:// URL."""
        parts = urllib.parse.urlsplit(url)
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        return cls(parts.hostname or "127.0.0.1", port)

    def url(self, url: str) -> str:
        """`url` pointed at the proxy instead."""
        parts = urllib.parse.urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def cut(self) -> None:
        self._cut = True
        for link in self._links:
            link.cancel()

    def heal(self) -> None:
        self._cut = False

    def pause(self) -> None:
        if self._flowing.is_set():
            self._flowing = trio.Event()
            self._held = trio.Event()

    async def wait_held(self) -> None:
        """Return once some data, sent either way, waits at the pause."""
        with trio.fail_after(WAIT):
            await self._held.wait()

    def resume(self) -> None:
        self._flowing.set()

    async def wait_accepted(self, count: int) -> None:
        """Return once `count` connections have come in, in all."""
        with trio.fail_after(WAIT):
            while self.accepted < count:
                await self._came_in.wait()

    async def run(self, *, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(
                self._forward, listeners, handler_nursery=nursery
            )

    async def _forward(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        self._came_in.set()
        self._came_in = trio.Event()
        async with client:
            if self._cut:
                return
            with trio.CancelScope() as link:
                self._links.add(link)
                try:
                    await self._flowing.wait()
                    upstream = None
                    with trio.move_on_after(WAIT), contextlib.suppress(OSError):
                        upstream = await trio.open_tcp_stream(*self._target)
                    if upstream is None:
                        # As a refused connection would be: closed at once.
                        return
                    async with upstream, trio.open_nursery() as pipes:
                        pipes.start_soon(self._pipe, client, upstream, link)
                        pipes.start_soon(self._pipe, upstream, client, link)
                finally:
                    self._links.discard(link)

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, link: trio.CancelScope
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in source:
                if not self._flowing.is_set():
                    self._held.set()
                    await self._flowing.wait()
                await sink.send_all(chunk)
        # One side closed: close the whole link.
        link.cancel()


async def start_replica_behind_proxy(
    nursery: trio.Nursery, database_url: str, **overrides: Any
) -> tuple[Replica, TcpProxy]:
    """A replica whose Postgres connections all go through a TcpProxy, for
    tests that cut or stall its database."""
    proxy = TcpProxy.to(database_url)
    await nursery.start(proxy.run)
    replica = await start_replica(nursery, proxy.url(database_url), **overrides)
    assert replica.port is not None
    return replica, proxy


@contextmanager
def logged(logger: str, fragment: str) -> Iterator[trio.Event]:
    """An event set when `logger` logs a message containing `fragment`."""
    seen = trio.Event()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if fragment in record.getMessage():
                seen.set()

    handler = Handler(logging.DEBUG)
    target = logging.getLogger(logger)
    level = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


# --- replica processes ---------------------------------------------------------

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
    database_url: str | None, *args: str, ready_within: float = WAIT, **env: str
) -> AsyncIterator[ReplicaProcess]:
    """A `registry serve` process on a free port; killed on the way out.

    With `database_url` None, no database is configured: the process starts
    an embedded Postgres of its own.
    """
    database = [] if database_url is None else ["--database-url", database_url]
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
        *database,
        *args,
    ]
    inherited = dict(os.environ)
    if database_url is None:
        inherited.pop("REGISTRY_DATABASE_URL", None)
        inherited.pop("REGISTRY_TEST_DATABASE_URL", None)
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # No health probes unless asked for, as in TEST_CONFIG.
        env={**inherited, "REGISTRY_MAX_PROBES": "0", **env},
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
            with trio.fail_after(ready_within):
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


class Relay:
    """A TCP relay in front of a replica, for tests that need the network to
    misbehave: hold() keeps back what the replica sends (its answers reach
    the client only after release()), while what the client sends goes on
    through."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold(self) -> None:
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def release(self) -> None:
        self._flowing.set()

    async def _relay(self, client: trio.SocketStream) -> None:
        with trio.fail_after(WAIT):
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, server, trio.open_nursery() as nursery:

            async def pump(
                source: trio.SocketStream, sink: trio.SocketStream, held: bool
            ) -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    async for chunk in source:
                        if held:
                            await self._flowing.wait()
                        await sink.send_all(chunk)
                # Either side hanging up ends both.
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, server, False)
            nursery.start_soon(pump, server, client, True)


@asynccontextmanager
async def relay(port: int) -> AsyncIterator[Relay]:
    """A Relay to the replica on `port`, closed (with its connections) on the
    way out."""
    proxy = Relay(port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, proxy._relay, 0, host="127.0.0.1")
        )
        proxy.port = listeners[0].socket.getsockname()[1]
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
