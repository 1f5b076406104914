"""The ops endpoint as Prometheus and Kubernetes use it: /metrics scraped
with a real HTTP client and read with prometheus-client's own parser, after
API calls and after health probes of servers the test runs; /healthz and
/readyz through a replica's start, a Postgres that goes away (cut by a TCP
proxy the test controls) and comes back."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import grpc
import httpx
import pytest
import trio
import trio.testing
from google.protobuf.duration_pb2 import Duration
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    TEST_CONFIG,
    WAIT,
    TcpProxy,
    WatchStream,
    grpc_client,
    logged,
    registration,
    start_replica,
    watch_stream,
)
from probe_targets import HttpTarget, Mode, TcpTarget
from registry._grpc import ServeError
from registry.app import Replica
from registry.model import CheckKind
from registry.ops import OpsServer
from registry.v1 import registry_pb2 as pb

REGISTRY = "registry.v1.Registry"


class Scrape:
    """One /metrics answer, parsed: the value of each sample by name and
    labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.samples[key] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[name, frozenset(labels.items())]

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _ in self.samples)


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def scrape(replica: Replica) -> Scrape:
    assert replica.ops.port
    response = await get(replica.ops.port, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def on_port(name: str, instance_id: str, port: int) -> pb.RegisterRequest:
    request = registration(name, instance_id)
    request.apis[0].port = port
    return request


def rpc(method: str, code: str = "OK") -> Mapping[str, str]:
    kind = "server_stream" if method == "Watch" else "unary"
    return {
        "grpc_type": kind,
        "grpc_service": REGISTRY,
        "grpc_method": method,
        "grpc_code": code,
    }


async def test_metrics_count_rpcs_events_instances_and_watchers_after_a_run(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        registered = [
            await client.call("Register", on_port(name, instance_id, port))
            for name, instance_id, port in [
                ("billing", "b-1", 8101),
                ("billing", "b-2", 8102),
                ("orders", "o-1", 8103),
            ]
        ]
        gone = await client.call(
            "Deregister",
            pb.DeregisterRequest(
                name="orders", instance_id="o-1", token=registered[2].token
            ),
        )
        with pytest.raises(grpc.RpcError) as missing:
            await client.call("Resolve", pb.ResolveRequest(name="payments"))
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND

        with logged("registry.grpc", f"/{REGISTRY}/Watch from ") as watch_ended:
            async with watch_stream(
                client.stub, pb.WatchRequest(snapshot=True)
            ) as watch:
                await watch.snapshot()
                # The notifier has fanned out every event of the run.
                with trio.fail_after(WAIT):
                    await replica.hub.wait_for(gone.revision)
                metrics = await scrape(replica)
            # The server logs the end of the call once its handler has
            # detached the stream from the hub.
            with trio.fail_after(WAIT):
                await watch_ended.wait()

    # Every call, by method and status code, with its latency.
    assert metrics("grpc_server_handled_total", **rpc("Register")) == 3
    assert metrics("grpc_server_handled_total", **rpc("Deregister")) == 1
    assert metrics("grpc_server_handled_total", **rpc("Resolve", "NOT_FOUND")) == 1
    unary_register = {k: v for k, v in rpc("Register").items() if k != "grpc_code"}
    assert metrics("grpc_server_handling_seconds_count", **unary_register) == 3
    assert metrics("grpc_server_handling_seconds_sum", **unary_register) > 0
    watch_labels = {k: v for k, v in rpc("Watch").items() if k != "grpc_code"}
    # Still open: started, not yet handled.
    assert metrics("grpc_server_started_total", **watch_labels) == 1
    assert metrics("grpc_server_handled_total", **rpc("Watch")) == 0
    # Methods never called show at zero.
    assert metrics("grpc_server_handled_total", **rpc("List")) == 0

    # The log and its fan-out.
    assert metrics("registry_revision") == gone.revision == 4
    assert metrics("registry_notifier_revision") == 4
    assert metrics("registry_notifier_lag_revisions") == 0
    assert metrics("registry_events_total", type="registered") == 3
    assert metrics("registry_events_total", type="deregistered") == 1
    assert metrics("registry_events_total", type="status_changed") == 0
    assert metrics("registry_watch_streams") == 1

    # What is registered, by status.
    assert metrics("registry_instances", status="active") == 2
    for status in ("pending", "inactive", "draining"):
        assert metrics("registry_instances", status=status) == 0
    assert metrics("registry_database_up") == 1

    # No instance has a health check: no probe ran, of any kind.
    assert metrics("registry_probes_total", kind="http") == 0
    assert metrics("registry_probe_failures_total", kind="tcp") == 0
    # The guard, the outbox and the process are there for dashboards.
    for name in (
        "registry_mass_failure_guard_active",
        "registry_outbox_backlog",
        "registry_outbox_publish_failures_total",
    ):
        assert metrics.has(name), name
    assert metrics.has("process_resident_memory_bytes")

    # The client cancelled the stream: the gauge follows.
    ended = await scrape(replica)
    assert ended("registry_watch_streams") == 0
    assert ended("grpc_server_handled_total", **rpc("Watch", "CANCELLED")) == 1
    replica.stop()


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def probed(
    instance_id: str, api: str, port: int, check: pb.HealthCheck
) -> pb.RegisterRequest:
    request: pb.RegisterRequest = registration("billing", instance_id)
    del request.apis[:]
    request.apis.append(pb.Api(name=api, port=port))
    request.check.CopyFrom(check)
    return request


async def statuses(
    stream: WatchStream, wanted: Mapping[str, int]
) -> dict[str, pb.Event]:
    """Events until each instance of `wanted` has reached its status there;
    the event that put it there, by instance."""
    found: dict[str, pb.Event] = {}
    with trio.fail_after(WAIT):
        while len(found) < len(wanted):
            response = await stream.receive()
            if response.WhichOneof("kind") != "event":
                continue
            instance = response.event.instance
            if instance.status == wanted.get(instance.instance_id):
                found.setdefault(instance.instance_id, response.event)
    return found


def probe_figures(metrics: Scrape, kind: CheckKind) -> tuple[float, float, float]:
    """Probes run, probes failed, probe durations observed, of one kind."""
    return (
        metrics("registry_probes_total", kind=kind.value),
        metrics("registry_probe_failures_total", kind=kind.value),
        # A kind's histogram shows from its first probe on.
        metrics.get("registry_probe_duration_seconds_count", kind=kind.value) or 0.0,
    )


async def test_metrics_count_probes_by_kind_and_show_the_startup_hold(
    nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.probes")
    http = HttpTarget()
    [http_port] = await http.serve(nursery)
    tcp = TcpTarget()
    tcp_port = await tcp.serve(nursery)
    fast: dict[str, Any] = {
        "interval": seconds(1),
        "failure_threshold": 1,
        "success_threshold": 1,
    }

    with logged("registry.probes", "deregistration guard off") as hold_ended:
        replica = await start_replica(
            nursery,
            database_url,
            max_probes=100,
            # Deregistrations wait for the first 3 s; no failure rate ever
            # turns the guard on.
            guard_startup=3.0,
            guard_min_probes=1_000_000,
            probe_poll_interval=0.5,
        )
        assert replica.port is not None
        started = await scrape(replica)
        assert started("registry_mass_failure_guard_active") == 1
        for kind in CheckKind:
            assert probe_figures(started, kind) == (0, 0, 0), kind

        async with (
            grpc_client(replica.port) as client,
            watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream,
        ):
            http_check = pb.HealthCheck(http=pb.HttpCheck(path="/healthz"), **fast)
            tcp_check = pb.HealthCheck(tcp=pb.TcpCheck(), **fast)
            await client.call(
                "Register", probed("by-http", "http", http_port, http_check)
            )
            await client.call("Register", probed("by-tcp", "db", tcp_port, tcp_check))
            await statuses(
                stream, {"by-http": pb.STATUS_ACTIVE, "by-tcp": pb.STATUS_ACTIVE}
            )
            healthy = await scrape(replica)

            http.mode = Mode.SILENT
            down = await statuses(stream, {"by-http": pb.STATUS_INACTIVE})
            failing = await scrape(replica)

        with trio.fail_after(WAIT):
            await hold_ended.wait()
        held_no_more = await scrape(replica)

    # Each probe is counted by its kind, with its duration; none failed yet.
    http_run, http_failed, http_timed = probe_figures(healthy, CheckKind.HTTP)
    assert http_run >= 1 and http_failed == 0 and http_timed == http_run
    tcp_run, tcp_failed, tcp_timed = probe_figures(healthy, CheckKind.TCP)
    assert tcp_run >= 1 and tcp_failed == 0 and tcp_timed == tcp_run
    assert healthy("registry_probe_duration_seconds_sum", kind="http") > 0

    # The silent server's probes failed; the TCP ones went on succeeding.
    http_later, http_failed, http_timed = probe_figures(failing, CheckKind.HTTP)
    assert http_later > http_run and http_failed >= 1 and http_timed == http_later
    tcp_later, tcp_failed, tcp_timed = probe_figures(failing, CheckKind.TCP)
    assert tcp_later >= tcp_run and tcp_failed == 0 and tcp_timed == tcp_later
    for kind in (CheckKind.GRPC, CheckKind.TTL, CheckKind.KUBERNETES):
        assert probe_figures(failing, kind) == (0, 0, 0), kind
    assert failing("registry_instances", status="inactive") == 1

    # The startup hold is over: the gauge says so.
    assert held_no_more("registry_mass_failure_guard_active") == 0

    # The probe's status change is logged with its instance and revision.
    [line] = [
        r
        for r in caplog.records
        if r.getMessage().startswith("billing/by-http is inactive")
    ]
    assert vars(line)["instance"] == "billing/by-http"
    assert vars(line)["revision"] == down["by-http"].revision
    replica.stop()


async def test_metrics_of_two_replicas_in_one_process_stay_apart(
    nursery: trio.Nursery, database_url: str
) -> None:
    writer = await start_replica(nursery, database_url)
    reader = await start_replica(nursery, database_url)
    assert writer.port is not None
    async with grpc_client(writer.port) as client:
        registered = await client.call("Register", registration())
    with trio.fail_after(WAIT):
        await reader.hub.wait_for(registered.revision)
        await writer.hub.wait_for(registered.revision)

    written, read = await scrape(writer), await scrape(reader)
    assert written("grpc_server_handled_total", **rpc("Register")) == 1
    assert read("grpc_server_handled_total", **rpc("Register")) == 0
    # Every replica's notifier reads every event, whoever wrote it.
    assert written("registry_events_total", type="registered") == 1
    assert read("registry_events_total", type="registered") == 1
    writer.stop()
    reader.stop()


# --- readiness ---------------------------------------------------------------


async def test_readyz_says_not_ready_until_started_and_while_postgres_is_cut(
    nursery: trio.Nursery, database_url: str
) -> None:
    proxy = TcpProxy.to(database_url)
    await nursery.start(proxy.run)
    # Closed at first: the replica starts before Postgres answers.
    proxy.cut()
    replica = Replica(TEST_CONFIG, proxy.url(database_url))
    ready = trio.Event()

    async def run() -> None:
        await nursery.start(replica.run)
        ready.set()

    nursery.start_soon(run)
    with trio.fail_after(WAIT):
        await replica.ops_started.wait()
    assert replica.ops.port

    # Up before Postgres answers: alive, not ready, and saying why.
    alive = await get(replica.ops.port, "/healthz")
    assert (alive.status_code, alive.text) == (200, "ok\n")
    starting = await get(replica.ops.port, "/readyz")
    assert starting.status_code == 503
    assert starting.text == "not ready: waiting for the database\n"
    assert (await scrape(replica))("registry_database_up") == 0

    proxy.heal()
    with trio.fail_after(WAIT):
        await ready.wait()
    serving = await get(replica.ops.port, "/readyz")
    assert (serving.status_code, serving.text) == (200, "ready\n")

    proxy.cut()
    cut = await get(replica.ops.port, "/readyz")
    assert cut.status_code == 503
    assert cut.text.startswith("not ready: database unavailable"), cut.text
    assert (await scrape(replica))("registry_database_up") == 0
    assert (await get(replica.ops.port, "/healthz")).status_code == 200

    proxy.heal()
    back = await get(replica.ops.port, "/readyz")
    assert (back.status_code, back.text) == (200, "ready\n")
    replica.stop()


class _Waiting(logging.Handler):
    """Set `logged` once a record says its call waits for a revision."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.logged = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("waiting for revision"):
            self.logged.set()


async def test_readyz_is_not_ready_while_draining(
    nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    replica = await start_replica(nursery, database_url, drain_grace=WAIT)
    assert replica.port is not None and replica.ops.port
    caplog.set_level(logging.DEBUG, logger="registry.service")
    waiting = _Waiting()
    logging.getLogger("registry.service").addHandler(waiting)
    try:
        async with grpc_client(replica.port) as client:
            # A call in flight holds the drain open: it waits for a revision
            # that nobody writes.
            pending = client.stub.List.future(
                pb.ListRequest(min_revision=1), timeout=WAIT
            )
            with trio.fail_after(WAIT):
                await waiting.logged.wait()
            replica.stop()
            await trio.testing.wait_all_tasks_blocked()
            draining = await get(replica.ops.port, "/readyz")
            assert (draining.status_code, draining.text) == (
                503,
                "not ready: the replica is draining\n",
            )
            pending.cancel()
    finally:
        logging.getLogger("registry.service").removeHandler(waiting)


async def _never_ready() -> str | None:
    return "a test server"


async def _no_metrics(accept: str) -> tuple[bytes, str]:
    return b"", "text/plain"


async def test_ops_endpoint_answers_unknown_paths_and_methods_plainly(
    nursery: trio.Nursery,
) -> None:
    ops = OpsServer(
        host="127.0.0.1", port=0, readiness=_never_ready, metrics=_no_metrics
    )
    port = await nursery.start(ops.serve)
    missing = await get(port, "/nothing")
    assert missing.status_code == 404
    assert "/metrics" in missing.text
    async with httpx.AsyncClient(timeout=WAIT) as client:
        posted = await client.post(f"http://127.0.0.1:{port}/metrics")
    assert posted.status_code == 405
    assert posted.headers["allow"] == "GET, HEAD"
    not_ready = await get(port, "/readyz")
    assert (not_ready.status_code, not_ready.text) == (
        503,
        "not ready: a test server\n",
    )
    nursery.cancel_scope.cancel()


async def test_ops_endpoint_on_a_port_in_use_fails_with_serve_error(
    nursery: trio.Nursery,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        ops = OpsServer(
            host="127.0.0.1", port=port, readiness=_never_ready, metrics=_no_metrics
        )
        with pytest.raises(ServeError, match=f"127.0.0.1:{port} for the ops endpoint"):
            await nursery.start(ops.serve)


async def test_replica_with_the_ops_port_taken_does_not_start(
    nursery: trio.Nursery,
) -> None:
    # The ops endpoint starts before the database is reached: none is needed.
    unreachable = "postgresql://postgres@127.0.0.1:1/none"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        config = replace(TEST_CONFIG, ops_port=taken.getsockname()[1])
        with pytest.raises(BaseExceptionGroup) as raised:
            await nursery.start(Replica(config, unreachable).run)
    failed, _ = raised.value.split(ServeError)
    assert failed is not None
    # What `registry serve` prints names the setting to change.
    assert "REGISTRY_OPS_PORT" in str(_leaf(failed))


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
