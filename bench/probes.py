"""Figures of the registry's health probing: how fast a dead service is seen,
and how many HTTP targets one replica probes per interval.

Both need a registry that probes (a Register with an HTTP check makes the
replica GET it); against one that does not, they raise NotMeasurable after a
short wait instead of a figure.
"""

from __future__ import annotations

import contextlib
import http.server
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc
import trio
from google.protobuf.duration_pb2 import Duration

from bench import load
from bench.measure import Sample
from bench.systems import BenchError, System, cpu_seconds
from registry.v1 import registry_pb2 as pb
from registry.v1 import registry_pb2_grpc as registry_grpc

FAILURE_NAME = "bench-failure"
CAPACITY_NAME = "bench-probed"
HEALTH_PATH = "/healthz"


class NotMeasurable(BenchError):
    """The system lacks what the figure measures."""


def duration(seconds: float) -> Duration:
    whole = math.floor(seconds)
    return Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def http_check(interval: float, failures: int, successes: int = 1) -> Any:
    # A probe must end before the next is due.
    timeout = min(1.0, interval / 2)
    return pb.HealthCheck(
        http=pb.HttpCheck(path=HEALTH_PATH, api="http"),
        interval=duration(interval),
        timeout=duration(timeout),
        failure_threshold=failures,
        success_threshold=successes,
    )


# --- failure detection -------------------------------------------------------


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the name http.server calls
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@dataclass
class _Stage:
    name: str = "pending"
    stopped_at: float = math.nan
    inactive_at: float = math.nan


def failure_detection(
    system: System, round_index: int, *, interval: float, failures: int
) -> Sample:
    """Seconds from a service ceasing to answer its HTTP check (its port
    closes: connection refused) to a watcher receiving its INACTIVE event."""
    service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    serving = threading.Thread(target=service.serve_forever, daemon=True)
    serving.start()
    port = service.server_address[1]
    instance_id = f"f{round_index}-{time.monotonic_ns()}"
    request = pb.RegisterRequest(
        name=FAILURE_NAME,
        instance_id=instance_id,
        version="1.0.0",
        address="127.0.0.1",
        apis=[pb.Api(name="http", port=port)],
        check=http_check(interval, failures),
    )
    # Becoming ACTIVE takes one successful probe; a registry that probes does
    # it well within this.
    pending_limit = interval + 10.0
    detection_limit = interval * failures + 30.0
    stage = _Stage()
    stopped = False
    with grpc.insecure_channel(system.targets[0]) as channel:
        stub = registry_grpc.RegistryStub(channel)
        watch = stub.Watch(
            pb.WatchRequest(names=[FAILURE_NAME], snapshot=True),
            timeout=pending_limit + detection_limit,
        )

        def give_up_pending() -> None:
            if stage.name == "pending":
                watch.cancel()

        timer = threading.Timer(pending_limit, give_up_pending)
        token = ""
        try:
            for response in watch:
                kind = response.WhichOneof("kind")
                if kind == "snapshot_end":
                    token = _register(stub, request)
                    timer.start()
                    continue
                if (
                    kind != "event"
                    or response.event.instance.instance_id != instance_id
                ):
                    continue
                status = response.event.instance.status
                if stage.name == "pending" and status == pb.STATUS_ACTIVE:
                    stage.name = "active"
                    service.shutdown()
                    service.server_close()
                    stopped = True
                    stage.stopped_at = time.monotonic()
                elif stage.name == "active" and status == pb.STATUS_INACTIVE:
                    stage.inactive_at = time.monotonic()
                    stage.name = "inactive"
                    watch.cancel()
                    break
        except grpc.RpcError as exc:
            if stage.name == "pending":
                raise NotMeasurable(
                    f"an instance with an HTTP check every {interval:g}s stayed "
                    f"PENDING for {pending_limit:.0f}s: this registry does not probe"
                ) from None
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise BenchError(
                    f"the watch ended before INACTIVE: {exc.code()}: {exc.details()}"
                ) from None
        finally:
            timer.cancel()
            if not stopped:
                service.shutdown()
                service.server_close()
            if token:
                _deregister(stub, FAILURE_NAME, instance_id, token)
    goal = interval * failures + 1.0
    detected = stage.inactive_at - stage.stopped_at
    return Sample(value=detected, note=f"goal {goal:g}s (interval x failures + 1 s)")


def _register(stub: Any, request: Any) -> str:
    try:
        token: str = stub.Register(request, timeout=load.CALL_TIMEOUT).token
    except grpc.RpcError as exc:
        raise BenchError(
            f"registering an instance with an HTTP check failed: {exc.code()}: "
            f"{exc.details()}"
        ) from None
    return token


def _deregister(stub: Any, name: str, instance_id: str, token: str) -> None:
    # Only tidiness: the bench database is dropped at the end anyway.
    with contextlib.suppress(grpc.RpcError):
        stub.Deregister(
            pb.DeregisterRequest(name=name, instance_id=instance_id, token=token),
            timeout=load.CALL_TIMEOUT,
        )


# --- probe capacity ----------------------------------------------------------

_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
)


def target_address(index: int) -> str:
    """The loopback address of HTTP target `index` (Linux routes all of
    127.0.0.0/8 to the loopback interface)."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


def targets_process(conn: Connection, count: int, port: int) -> None:
    """HTTP targets on `count` loopback addresses, one port: each answers
    every GET with 200 and counts it. Reports ("ready",), then answers
    "count" with the hits so far, until "stop"."""
    trio.run(_serve_targets, conn, count, port)


async def _serve_targets(conn: Connection, count: int, port: int) -> None:
    hits = 0

    async def answer(stream: trio.SocketStream) -> None:
        nonlocal hits
        buffered = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buffered += data
                while b"\r\n\r\n" in buffered:
                    _, buffered = buffered.split(b"\r\n\r\n", 1)
                    hits += 1
                    try:
                        await stream.send_all(_RESPONSE)
                    except trio.BrokenResourceError:
                        return

    listeners: list[trio.SocketListener] = []
    for index in range(count):
        listeners += await trio.open_tcp_listeners(port, host=target_address(index))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, answer, listeners)
        conn.send(("ready",))
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            message = conn.recv()
            if message == "count":
                conn.send(hits)
            else:
                nursery.cancel_scope.cancel()
                return


class Targets:
    """The runner's handle on a targets process."""

    def __init__(self, count: int, port: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(
            target=targets_process, args=(theirs, count, port), daemon=True
        )
        self._process.start()
        theirs.close()
        if not self._conn.poll(60) or self._conn.recv() != ("ready",):
            self.close()
            raise BenchError(f"the {count} HTTP targets did not start")

    def hits(self) -> int:
        self._conn.send("count")
        if not self._conn.poll(30):
            raise BenchError("the HTTP targets stopped answering")
        hits: int = self._conn.recv()
        return hits

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


def _register_targets(
    target: str, first: int, last: int, port: int, interval: float
) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = registry_grpc.RegistryStub(channel)

        def register(index: int) -> None:
            stub.Register(
                pb.RegisterRequest(
                    name=CAPACITY_NAME,
                    instance_id=f"t{index}",
                    version="1.0.0",
                    address=target_address(index),
                    apis=[pb.Api(name="http", port=port)],
                    check=http_check(interval, 3),
                ),
                timeout=load.CALL_TIMEOUT,
            )

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(register, range(first, last)))


def probe_capacity(
    system: System,
    targets: Targets,
    port: int,
    *,
    interval: float,
    ladder: tuple[int, ...],
    window: float,
) -> Sample:
    """The most HTTP targets, from `ladder`, that the system's one replica
    probes every interval while staying under one core.

    At each step the replica gets more targets, settles for a few intervals,
    then is watched for `window` seconds: the targets count the probes, /proc
    the replica's CPU (its Postgres backends are not counted).
    """
    pid = system.servers[0].pid
    registered = 0
    best, best_cost = 0, math.nan
    steps: list[str] = []
    for count in ladder:
        _register_targets(system.targets[0], registered, count, port, interval)
        registered = count
        time.sleep(3 * interval)

        hits, cpu, started = targets.hits(), cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - started
        probed = (targets.hits() - hits) / elapsed * interval
        cores = (cpu_seconds(pid) - cpu) / elapsed
        steps.append(f"{count}: {probed:,.0f} probed, {cores:.2f} cores")
        if probed == 0:
            raise NotMeasurable(
                f"{count} instances with an HTTP check every {interval:g}s got no "
                "probe: this registry does not probe"
            )
        if probed < 0.95 * count or cores >= 1.0:
            break
        best, best_cost = count, cores / probed * interval
    note = "; ".join(steps)
    if best:
        # What one core would cover if CPU were the only limit.
        note = f"{1 / best_cost:,.0f} probes per core-second at {best}; " + note
    return Sample(value=best, note=note)
