"""One measurement of one system: the runner's side of the load generators.

Every function here returns a Sample for one round, or raises BenchError; a
loop that waits on a worker or a server always has a deadline.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import grpc

from bench import load
from bench.etcdpb import rpc_pb2 as etcd
from bench.etcdpb import rpc_pb2_grpc as etcd_grpc
from bench.stats import percentile
from bench.systems import BenchError, System, cpu_seconds, rss_bytes
from registry.v1 import registry_pb2 as pb
from registry.v1 import registry_pb2_grpc as registry_grpc

# Seconds the runner waits for a worker beyond what its job should take.
SLACK = 60.0
# The common start lies this far ahead of the moment all workers are ready.
START_LEAD = 0.1


@dataclass(slots=True)
class Sample:
    """One system's figure in one round."""

    value: float
    p50: float = math.nan
    p99: float = math.nan
    # CPU of the system's processes during the measurement, in cores.
    cores: float = math.nan
    note: str = ""


@dataclass(slots=True)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection


class Workers:
    """Load generator processes, spawned once and reused job after job."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=load.worker, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            self._workers.append(_Worker(process, ours))

    def __len__(self) -> int:
        return len(self._workers)

    def close(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers.clear()

    def conns(self, count: int) -> list[Connection]:
        if count > len(self._workers):
            raise BenchError(f"{count} workers asked for; the bench has {len(self)}")
        return [worker.conn for worker in self._workers[:count]]


def _receive(conns: Sequence[Connection], deadline: float, what: str) -> list[Any]:
    """One message from each connection, in their order, by the deadline."""
    messages: dict[Connection, Any] = {}
    while len(messages) < len(conns):
        pending = [c for c in conns if c not in messages]
        ready = wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise BenchError(f"workers did not answer in time while {what}")
        for conn in ready:
            assert isinstance(conn, Connection)
            messages[conn] = _checked(_recv(conn, what), what)
    return [messages[conn] for conn in conns]


def _recv(conn: Connection, what: str) -> Any:
    try:
        return conn.recv()
    except (EOFError, OSError):
        raise BenchError(f"a worker process died while {what}") from None


def _checked(message: Any, what: str) -> Any:
    if isinstance(message, tuple) and message[0] == "failed":
        raise BenchError(f"a worker failed while {what}:\n{message[1]}")
    return message


def _cpu(pids: Iterable[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def _cores(before: dict[int, float], pids: Iterable[int], seconds: float) -> float:
    """CPU cores the processes used since `before` (processes that appeared
    meanwhile count from zero)."""
    used = sum(cpu_seconds(pid) - before.get(pid, 0.0) for pid in set(pids))
    return used / seconds if seconds > 0 else math.nan


# --- unary calls -------------------------------------------------------------


def unary(
    workers: Workers,
    system: System,
    shape: str,
    callers: int,
    *,
    duration: float,
    warmup: int,
    max_calls: int,
) -> Sample:
    """Calls per second of `shape` with `callers` concurrent callers, each in
    its own process on its own connection; the callers are spread over the
    system's targets (its replicas)."""
    conns = workers.conns(callers)
    for index, conn in enumerate(conns):
        conn.send(
            load.UnaryJob(
                kind=system.kind,
                shape=shape,
                target=system.targets[index % len(system.targets)],
                caller=index,
                duration=duration,
                max_calls=max_calls,
                warmup=warmup,
            )
        )
    _receive(conns, time.monotonic() + SLACK, f"warming up {system.name}")

    pids = system.pids()
    before = _cpu(pids)
    start = time.monotonic() + START_LEAD
    for conn in conns:
        conn.send(start)
    replies = _receive(
        conns, start + duration + SLACK, f"loading {system.name} with {shape}"
    )
    results: list[load.UnaryResult] = [reply[1] for reply in replies]
    finished = max(result.finished for result in results)
    cores = _cores(before, system.pids(), finished - start)

    calls = sum(result.calls for result in results)
    errors = sum(result.errors for result in results)
    latencies = [latency for result in results for latency in result.latencies]
    note = ""
    if errors:
        first = next(result.first_error for result in results if result.first_error)
        note = f"{errors} of {calls + errors} calls failed, first: {first}"
    return Sample(
        value=calls / (finished - start),
        p50=percentile(latencies, 0.5),
        p99=percentile(latencies, 0.99),
        cores=cores,
        note=note,
    )


# --- watch propagation and idle streams --------------------------------------


def _open_watchers(
    workers: Workers,
    system: System,
    streams: int,
    *,
    processes: int,
    per_channel: int,
    open_timeout: float,
) -> list[Connection]:
    """`streams` live watch streams, spread over `processes` workers and over
    the system's targets."""
    processes = max(1, min(processes, streams))
    conns = workers.conns(processes)
    shares = [
        streams // processes + (1 if index < streams % processes else 0)
        for index in range(processes)
    ]
    for index, (conn, share) in enumerate(zip(conns, shares, strict=True)):
        # Rotate the targets so that the streams spread evenly over them.
        targets = system.targets[index:] + system.targets[:index]
        conn.send(
            load.WatchJob(
                kind=system.kind,
                targets=tuple(targets),
                streams=share,
                streams_per_channel=per_channel,
                open_timeout=open_timeout,
            )
        )
    replies = _receive(
        conns, time.monotonic() + open_timeout + SLACK, f"opening {system.name} watches"
    )
    opened = sum(reply[1] for reply in replies)
    if opened < streams:
        _stop_watchers(conns, time.monotonic() + SLACK)
        raise BenchError(
            f"only {opened} of {streams} watch streams on {system.name} became "
            f"live within {open_timeout:.0f}s"
        )
    return conns


def _stop_watchers(conns: Sequence[Connection], deadline: float) -> list[Any]:
    for conn in conns:
        conn.send("stop")
    results: list[Any] = []
    for conn in conns:
        # Late "got" messages may still precede the result.
        while True:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise BenchError("a watcher did not stop in time")
            message = _checked(_recv(conn, "stopping watchers"), "stopping watchers")
            if message[0] == "done":
                results.append(message[1])
                break
    return results


class _Writer:
    """Writes one change that every watcher sees; returns its revision."""

    def __init__(self, system: System) -> None:
        self._channel = grpc.insecure_channel(
            system.targets[0], options=load.CHANNEL_OPTIONS
        )
        self._kind = system.kind
        if system.kind == "etcd":
            self._kv = etcd_grpc.KVStub(self._channel)
        else:
            self._registry = registry_grpc.RegistryStub(self._channel)

    def write(self, n: int) -> int:
        request = load.registration(load.WATCH_NAME, f"w{n % 5}", 0, n % 5)
        if self._kind == "etcd":
            put = self._kv.Put(
                etcd.PutRequest(
                    key=load.WATCH_PREFIX + request.instance_id.encode(),
                    value=load.instance_value(request),
                ),
                timeout=load.CALL_TIMEOUT,
            )
            return int(put.header.revision)
        response = self._registry.Register(request, timeout=load.CALL_TIMEOUT)
        return int(response.revision)

    def close(self) -> None:
        self._channel.close()


def watch(
    workers: Workers,
    system: System,
    watchers: int,
    *,
    writes: int,
    warmup: int,
    processes: int,
    per_channel: int,
    open_timeout: float,
    delivery_timeout: float,
) -> Sample:
    """Write-to-receipt latency of a change, over `watchers` streams.

    Each write waits until every stream has received the one before, so the
    figure is propagation, not queueing behind earlier writes.
    """
    conns = _open_watchers(
        workers,
        system,
        watchers,
        processes=processes,
        per_channel=per_channel,
        open_timeout=open_timeout,
    )
    writer = _Writer(system)
    written: dict[int, float] = {}
    # How long each write itself took to be acknowledged.
    acknowledged: list[float] = []
    note = ""
    try:
        for n in range(warmup + writes):
            sent = time.monotonic()
            revision = writer.write(n)
            if n >= warmup:
                written[revision] = sent
                acknowledged.append(time.monotonic() - sent)
            if not _all_received(conns, revision, sent + delivery_timeout):
                note = (
                    f"write {n} (revision {revision}) did not reach every watcher "
                    f"within {delivery_timeout:.0f}s"
                )
                break
    except grpc.RpcError as exc:
        note = f"a write failed: {exc.code()}: {exc.details()}"
    finally:
        writer.close()
        results: list[load.WatchResult] = _stop_watchers(
            conns, time.monotonic() + SLACK
        )

    latencies = [
        received - written[revision]
        for result in results
        for revision, received in result.receipts
        if revision in written
    ]
    errors = sum(result.errors for result in results)
    if errors:
        first = next(result.first_error for result in results if result.first_error)
        note = f"{note}; " if note else ""
        note += f"{errors} streams failed, first: {first}"
    p99 = percentile(latencies, 0.99)
    failed = bool(note)
    if not failed:
        note = f"the write itself: p50 {percentile(acknowledged, 0.5) * 1000:.1f} ms"
    return Sample(
        value=math.nan if failed else p99,
        p50=percentile(latencies, 0.5),
        p99=p99,
        note=note,
    )


def _all_received(conns: Sequence[Connection], revision: int, deadline: float) -> bool:
    """Wait until every worker reports that all its streams got `revision`."""
    waiting = set(conns)
    while waiting:
        ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        for conn in ready:
            assert isinstance(conn, Connection)
            message = _checked(_recv(conn, "watching"), "watching")
            if message == ("got", revision):
                waiting.discard(conn)
    return True


def idle_streams(
    workers: Workers,
    system: System,
    streams: int,
    *,
    processes: int,
    per_channel: int,
    open_timeout: float,
) -> Sample:
    """Resident memory of the system's first server holding `streams` idle
    watch streams."""
    pid = system.servers[0].pid
    baseline = rss_bytes(pid)
    conns = _open_watchers(
        workers,
        system,
        streams,
        processes=processes,
        per_channel=per_channel,
        open_timeout=open_timeout,
    )
    try:
        holding = rss_bytes(pid)
    finally:
        _stop_watchers(conns, time.monotonic() + SLACK)
    per_stream = (holding - baseline) / streams
    return Sample(
        value=holding,
        note=f"{baseline / 2**20:,.0f} MiB before, {per_stream / 1024:,.1f} KiB "
        "per stream",
    )


# --- setup -------------------------------------------------------------------


def seed_resolve(system: System, instances: int = 5) -> None:
    """Store the `instances` entries that resolve calls read."""
    with grpc.insecure_channel(system.targets[0]) as channel:
        for index in range(instances):
            request = load.registration(load.RESOLVE_NAME, f"r{index}", 200, index)
            if system.kind == "etcd":
                etcd_grpc.KVStub(channel).Put(
                    etcd.PutRequest(
                        key=load.RESOLVE_PREFIX + request.instance_id.encode(),
                        value=load.instance_value(request),
                    ),
                    timeout=load.CALL_TIMEOUT,
                )
            elif system.kind == "registry":
                registry_grpc.RegistryStub(channel).Register(
                    request, timeout=load.CALL_TIMEOUT
                )
        if system.kind == "registry":
            # The answer the callers will get: every instance, ACTIVE.
            resolved = registry_grpc.RegistryStub(channel).Resolve(
                pb.ResolveRequest(name=load.RESOLVE_NAME), timeout=load.CALL_TIMEOUT
            )
            if len(resolved.instances) != instances:
                raise BenchError(
                    f"{system.name} resolves {len(resolved.instances)} of the "
                    f"{instances} instances registered for the resolve load"
                )
