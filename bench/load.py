"""Load generators: worker processes calling a system with the official grpcio
client, each on its own channel (its own TCP connection).

The runner spawns the workers once and hands each a job over a pipe:

    runner                         worker
    job (UnaryJob | WatchJob)  ->
                               <-  ("ready", ...)   connected, warmed up / streams live
    start time (unary) / ...   ->
                               <-  ("got", revision) (watch: every stream has it)
    "stop" (watch)             ->
                               <-  ("done", result)

Unary callers run a blocking loop bounded by a call count and a time window
that starts at the same monotonic instant in every worker (CLOCK_MONOTONIC is
one clock for all processes of the machine, so times taken in different
processes compare). Watchers run on grpc.aio, many streams per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import grpc.aio

from bench.etcdpb import rpc_pb2 as etcd
from bench.etcdpb import rpc_pb2_grpc as etcd_grpc
from registry.v1 import registry_pb2 as pb
from registry.v1 import registry_pb2_grpc as registry_grpc

# Names and key prefixes the load shapes use.
RESOLVE_NAME = "bench-resolve"
REGISTER_NAME = "bench-register"
WATCH_NAME = "bench-watch"
RESOLVE_PREFIX = b"/bench/resolve/"
REGISTER_PREFIX = b"/bench/register/"
WATCH_PREFIX = b"/bench/watch/"
# Instances per caller that register calls cycle through (replacing them).
REGISTER_KEYS = 50
# Seconds any single call may take before it counts as an error.
CALL_TIMEOUT = 10.0
# A lease long enough to outlive a round.
LEASE_TTL = 60

# Each channel gets its own connection: grpcio otherwise shares one
# connection between channels to the same target in a process.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


# The second byte of the addresses of each shape's instances.
ADDRESS_GROUPS = {REGISTER_NAME: 10, RESOLVE_NAME: 11, WATCH_NAME: 12}


def registration(name: str, instance_id: str, host: int, index: int) -> Any:
    """A RegisterRequest with an address of its own: the registry hands out
    each port once per address. The address is a loopback one, and nothing
    contacts it."""
    return pb.RegisterRequest(
        name=name,
        instance_id=instance_id,
        version="1.0.0",
        address=f"127.{ADDRESS_GROUPS[name]}.{host % 250}.{index % 250 + 1}",
        apis=[pb.Api(name="grpc", port=8090)],
        metadata={"zone": "bench"},
    )


def instance_value(request: Any) -> bytes:
    """What etcd stores for an instance: the same fields, serialized."""
    return bytes(
        pb.Instance(
            name=request.name,
            instance_id=request.instance_id,
            version=request.version,
            address=request.address,
            apis=request.apis,
            metadata=request.metadata,
            status=pb.STATUS_ACTIVE,
        ).SerializeToString()
    )


# --- unary load --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnaryJob:
    # "registry", "etcd" or "empty".
    kind: str
    # "register" or "resolve" (an empty call, for the ceiling).
    shape: str
    target: str
    caller: int
    duration: float
    max_calls: int
    warmup: int


@dataclass(slots=True)
class UnaryResult:
    calls: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0


def _unary_call(job: UnaryJob, channel: Any) -> Callable[[int], None]:
    """One call of the job's shape; its argument numbers the call."""
    if job.kind == "etcd":
        kv = etcd_grpc.KVStub(channel)
        lease = etcd_grpc.LeaseStub(channel)
        if job.shape == "register":

            def register_etcd(n: int) -> None:
                request = registration(
                    REGISTER_NAME, f"c{job.caller}-{n % REGISTER_KEYS}", job.caller, n
                )
                granted = lease.LeaseGrant(
                    etcd.LeaseGrantRequest(TTL=LEASE_TTL), timeout=CALL_TIMEOUT
                )
                kv.Put(
                    etcd.PutRequest(
                        key=REGISTER_PREFIX + request.instance_id.encode(),
                        value=instance_value(request),
                        lease=granted.ID,
                    ),
                    timeout=CALL_TIMEOUT,
                )

            return register_etcd
        range_request = etcd.RangeRequest(
            key=RESOLVE_PREFIX, range_end=prefix_end(RESOLVE_PREFIX)
        )
        return lambda n: kv.Range(range_request, timeout=CALL_TIMEOUT)

    stub = registry_grpc.RegistryStub(channel)
    if job.shape == "register":

        def register(n: int) -> None:
            stub.Register(
                registration(
                    REGISTER_NAME, f"c{job.caller}-{n % REGISTER_KEYS}", job.caller, n
                ),
                timeout=CALL_TIMEOUT,
            )

        return register
    resolve_request = pb.ResolveRequest(name=RESOLVE_NAME)
    return lambda n: stub.Resolve(resolve_request, timeout=CALL_TIMEOUT)


def _run_unary(job: UnaryJob, conn: Connection) -> UnaryResult:
    result = UnaryResult()
    with grpc.insecure_channel(job.target, options=CHANNEL_OPTIONS) as channel:
        call = _unary_call(job, channel)

        # Connect and warm up; a system that fails here fails the figure.
        for n in range(job.warmup):
            call(n)
        conn.send(("ready",))
        start: float = conn.recv()
        # Every worker begins at the same instant, chosen by the runner.
        time.sleep(max(0.0, start - time.monotonic()))

        end = start + job.duration
        now = result.started = time.monotonic()
        n = job.warmup
        while result.calls + result.errors < job.max_calls and now < end:
            try:
                call(n)
            except grpc.RpcError as exc:
                result.errors += 1
                if not result.first_error:
                    result.first_error = f"{exc.code()}: {exc.details()}"
            else:
                result.calls += 1
            finished = time.monotonic()
            result.latencies.append(finished - now)
            now = finished
            n += 1
        result.finished = now
    return result


# --- watch streams -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchJob:
    # "registry" or "etcd".
    kind: str
    # Streams are spread round-robin over these, channel by channel.
    targets: tuple[str, ...]
    streams: int
    streams_per_channel: int
    # Seconds allowed for every stream to become live.
    open_timeout: float


@dataclass(slots=True)
class WatchResult:
    opened: int = 0
    # (revision, receipt time) per event per stream.
    receipts: list[tuple[int, float]] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""


class _Watchers:
    def __init__(self, job: WatchJob, conn: Connection) -> None:
        self.job = job
        self.conn = conn
        self.result = WatchResult()
        self._counts: dict[int, int] = {}

    def received(self, revision: int) -> None:
        self.result.receipts.append((revision, time.monotonic()))
        count = self._counts[revision] = self._counts.get(revision, 0) + 1
        if count == self.job.streams:
            del self._counts[revision]
            self.conn.send(("got", revision))

    def failed(self, exc: BaseException) -> None:
        self.result.errors += 1
        if not self.result.first_error:
            self.result.first_error = repr(exc)

    async def registry_stream(self, channel: Any, live: asyncio.Event) -> None:
        stub = registry_grpc.RegistryStub(channel)
        call = stub.Watch(pb.WatchRequest(names=[WATCH_NAME], snapshot=True))
        try:
            async for response in call:
                kind = response.WhichOneof("kind")
                if kind == "event":
                    self.received(response.event.revision)
                elif kind == "snapshot_end":
                    live.set()
        finally:
            call.cancel()

    async def etcd_stream(self, channel: Any, live: asyncio.Event) -> None:
        stub = etcd_grpc.WatchStub(channel)
        call = stub.Watch()
        try:
            await call.write(
                etcd.WatchRequest(
                    create_request=etcd.WatchCreateRequest(
                        key=WATCH_PREFIX, range_end=prefix_end(WATCH_PREFIX)
                    )
                )
            )
            async for response in call:
                if response.created:
                    live.set()
                for event in response.events:
                    self.received(event.kv.mod_revision)
        finally:
            call.cancel()

    async def run(self) -> WatchResult:
        job = self.job
        channels = [
            grpc.aio.insecure_channel(
                job.targets[index % len(job.targets)], options=CHANNEL_OPTIONS
            )
            for index in range(math.ceil(job.streams / job.streams_per_channel))
        ]
        stream = self.registry_stream if job.kind == "registry" else self.etcd_stream
        tasks: list[asyncio.Task[None]] = []
        try:
            lives = [asyncio.Event() for _ in range(job.streams)]
            for index, live in enumerate(lives):
                task = asyncio.ensure_future(
                    stream(channels[index // job.streams_per_channel], live)
                )
                task.add_done_callback(self._task_done)
                tasks.append(task)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(live.wait() for live in lives)), job.open_timeout
                )
            self.result.opened = sum(live.is_set() for live in lives)
            self.conn.send(("ready", self.result.opened))

            # Until the runner says stop.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_reader(self.conn.fileno(), stop.set)
            await stop.wait()
            loop.remove_reader(self.conn.fileno())
            message = self.conn.recv()
            assert message == "stop", message
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for channel in channels:
                await channel.close()
        return self.result

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            self.failed(exc)


# --- the worker process ------------------------------------------------------


def worker(conn: Connection) -> None:
    """A worker process's main: run jobs until told to exit (None)."""
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            if isinstance(job, UnaryJob):
                result: object = _run_unary(job, conn)
            else:
                result = asyncio.run(_Watchers(job, conn).run())
        except Exception:
            conn.send(("failed", traceback.format_exc()))
            continue
        conn.send(("done", result))
