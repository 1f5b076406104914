"""Health probing through a whole replica: real servers to probe, real
Postgres, the official grpcio client for the API, Watch for the events.

Checks use the shortest interval validation allows (1 s). Unless a test is
about the deregistration guard, the guard is kept out of the way: it would
rightly hold back deregistrations in a fleet of one failing instance.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import trio
import trio_asyncio
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from trio_asyncio import aio_as_trio

from harness import (
    TEST_CONFIG,
    WAIT,
    GrpcClient,
    WatchStream,
    grpc_client,
    in_thread,
    registration,
    sample_event,
    start_replica,
    watch_stream,
)
from probe_targets import (
    NOT_SERVING,
    SERVING,
    HttpResponse,
    HttpTarget,
    KubernetesApi,
    Mode,
    TcpTarget,
    grpc_health_server,
)
from registry.app import Replica
from registry.errors import InvalidArgument
from registry.model import CheckKind, EventType, HealthCheck
from registry.probes import ProbeSettings, brings_probe_due
from registry.v1 import registry_pb2 as pb

# No startup hold, and a guard that never judges: tests of the guard set it.
NO_GUARD: dict[str, Any] = {
    "max_probes": 100,
    "guard_startup": 0.0,
    "guard_min_probes": 1_000_000,
    "probe_poll_interval": 0.5,
}


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def checked(
    instance_id: str,
    port: int,
    check: pb.HealthCheck,
    *,
    name: str = "billing",
    api: str = "http",
) -> pb.RegisterRequest:
    request: pb.RegisterRequest = registration(name, instance_id)
    del request.apis[:]
    request.apis.append(pb.Api(name=api, port=port))
    request.check.CopyFrom(check)
    return request


def http_check(**timings: Any) -> pb.HealthCheck:
    return pb.HealthCheck(
        http=pb.HttpCheck(path="/healthz"), interval=seconds(1), **timings
    )


@pytest.fixture
async def replica(nursery: trio.Nursery, database_url: str) -> Replica:
    return await start_replica(nursery, database_url, **NO_GUARD)


@pytest.fixture
async def client(replica: Replica) -> AsyncIterator[GrpcClient]:
    assert replica.port is not None
    async with grpc_client(replica.port) as opened:
        yield opened


@pytest.fixture
async def http(nursery: trio.Nursery) -> HttpTarget:
    target = HttpTarget()
    await target.serve(nursery)
    return target


async def next_event(stream: WatchStream) -> pb.Event:
    """The next event, skipping progress reports."""
    while True:
        response = await stream.receive()
        if response.WhichOneof("kind") == "event":
            return response.event


async def status_event(stream: WatchStream, instance_id: str, status: int) -> pb.Event:
    """The next event that leaves `instance_id` at `status`."""
    return (await status_events(stream, [instance_id], status))[instance_id]


async def status_events(
    stream: WatchStream, instance_ids: list[str], status: int
) -> dict[str, pb.Event]:
    """Events until each of `instance_ids` is at `status`: the event that put
    it there, by instance. Before that, an instance may only change status
    (or be registered anew)."""
    found: dict[str, pb.Event] = {}
    while len(found) < len(instance_ids):
        event = await next_event(stream)
        instance_id = event.instance.instance_id
        if instance_id not in instance_ids or instance_id in found:
            continue
        assert event.type != pb.EVENT_TYPE_DEREGISTERED, event
        if event.instance.status == status:
            found[instance_id] = event
    return found


async def call_fails(client: GrpcClient, method: str, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        await client.call(method, request)
    return failed.value


async def test_silent_instance_goes_inactive_in_time_and_active_after_m_successes(
    client: GrpcClient, http: HttpTarget
) -> None:
    check = http_check(failure_threshold=3, success_threshold=2)
    async with watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream:
        await client.call("Register", checked("b-1", http.ports[0], check))
        # PENDING until proven healthy: M = 2 good probes, a second apart.
        active = await status_event(stream, "b-1", pb.STATUS_ACTIVE)
        assert http.answered[http.ports[0]] == 2

        http.mode = Mode.SILENT
        stopped = trio.current_time()
        inactive = await status_event(stream, "b-1", pb.STATUS_INACTIVE)
        assert trio.current_time() - stopped <= 1 * 3 + 1
        silent_hits = [hit for hit in http.hits if hit.time >= stopped]
        assert len(silent_hits) == 3

        http.mode = Mode.ANSWER
        answered = http.answered[http.ports[0]]
        back = await status_event(stream, "b-1", pb.STATUS_ACTIVE)
        assert http.answered[http.ports[0]] - answered == 2

    # Each change is in the history, newest first, with the probe behind it.
    history = await client.call(
        "History", pb.HistoryRequest(name="billing", instance_id="b-1")
    )
    changes = [(t.from_status, t.to_status, t.revision) for t in history.transitions]
    assert changes == [
        (pb.STATUS_INACTIVE, pb.STATUS_ACTIVE, back.revision),
        (pb.STATUS_ACTIVE, pb.STATUS_INACTIVE, inactive.revision),
        (pb.STATUS_PENDING, pb.STATUS_ACTIVE, active.revision),
    ]
    went_back, went_down, _ = history.transitions
    assert (went_back.probe.healthy, went_back.probe.code) == (True, 200)
    assert not went_down.probe.healthy
    assert went_down.probe.error.startswith(
        f"GET http://127.0.0.1:{http.ports[0]}/healthz: "
    )
    assert went_down.probe.latency.ToNanoseconds() > 0


async def test_inactive_instance_is_deregistered_after_deregister_after(
    client: GrpcClient, http: HttpTarget
) -> None:
    http.mode = Mode.SILENT
    check = http_check(failure_threshold=1, deregister_after=seconds(1))
    async with watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream:
        await client.call("Register", checked("b-1", http.ports[0], check))
        inactive = await status_event(stream, "b-1", pb.STATUS_INACTIVE)
        gone = await next_event(stream)

    assert gone.type == pb.EVENT_TYPE_DEREGISTERED
    assert gone.instance.instance_id == "b-1"
    down_for = gone.time.ToNanoseconds() - inactive.time.ToNanoseconds()
    # Not before deregister_after; and at the probe that falls due then,
    # within a probe interval, which leaves room for a loaded machine (0.5 s
    # of room was once too little).
    assert 1.0e9 <= down_for < 2.0e9
    listed = await client.call("List", pb.ListRequest(name="billing"))
    assert list(listed.instances) == []


async def test_draining_instance_leaves_resolve_at_once_and_probes_never_move_it(
    client: GrpcClient, http: HttpTarget, nursery: trio.Nursery
) -> None:
    [other_port] = await http.serve(nursery)
    async with watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream:
        first = await client.call(
            "Register", checked("b-1", http.ports[0], http_check())
        )
        await client.call("Register", checked("b-2", other_port, http_check()))
        await status_events(stream, ["b-1", "b-2"], pb.STATUS_ACTIVE)

        drained = await client.call(
            "Drain",
            pb.DrainRequest(name="billing", instance_id="b-1", token=first.token),
        )
        resolved = await client.call("Resolve", pb.ResolveRequest(name="billing"))
        assert [i.instance_id for i in resolved.instances] == ["b-2"]
        assert resolved.revision == drained.revision
        event = await status_event(stream, "b-1", pb.STATUS_DRAINING)
        assert event.revision == drained.revision

        # Healthy probes go on and change nothing.
        await http.wait_for_hits(len(http.hits) + 4)
    listed = await client.call("List", pb.ListRequest(name="billing"))
    assert [(i.instance_id, i.status) for i in listed.instances] == [
        ("b-1", pb.STATUS_DRAINING),
        ("b-2", pb.STATUS_ACTIVE),
    ]
    history = await client.call(
        "History", pb.HistoryRequest(name="billing", instance_id="b-1", limit=1)
    )
    [transition] = history.transitions
    assert (transition.from_status, transition.to_status) == (
        pb.STATUS_ACTIVE,
        pb.STATUS_DRAINING,
    )
    assert not transition.HasField("probe")


async def test_drain_and_heartbeat_need_the_instances_token(
    client: GrpcClient,
) -> None:
    ttl = pb.HealthCheck(ttl=pb.TtlCheck(ttl=seconds(30)))
    old = await client.call("Register", checked("b-1", 8090, ttl))
    new = await client.call("Register", checked("b-1", 8090, ttl))
    tcp = await client.call(
        "Register", checked("b-2", 8091, pb.HealthCheck(tcp=pb.TcpCheck()))
    )

    for method, request_type in (
        ("Drain", pb.DrainRequest),
        ("Heartbeat", pb.HeartbeatRequest),
    ):
        missing = await call_fails(
            client, method, request_type(name="billing", instance_id="b-1")
        )
        stale = await call_fails(
            client,
            method,
            request_type(name="billing", instance_id="b-1", token=old.token),
        )
        unknown = await call_fails(
            client,
            method,
            request_type(name="billing", instance_id="b-9", token=new.token),
        )
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED, method
        assert stale.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert "registered again" in stale.details()
        assert unknown.code() == grpc.StatusCode.NOT_FOUND, method

    not_ttl = await call_fails(
        client,
        "Heartbeat",
        pb.HeartbeatRequest(name="billing", instance_id="b-2", token=tcp.token),
    )
    assert not_ttl.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has a tcp health check" in not_ttl.details()
    listed = await client.call("List", pb.ListRequest(name="billing"))
    assert [i.status for i in listed.instances] == [pb.STATUS_PENDING] * 2


async def test_heartbeats_keep_a_ttl_instance_active_and_missing_ones_make_it_inactive(
    client: GrpcClient,
) -> None:
    check = pb.HealthCheck(
        ttl=pb.TtlCheck(ttl=seconds(1)), interval=seconds(1), failure_threshold=1
    )
    async with watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream:
        registered = await client.call("Register", checked("b-1", 8090, check))
        beat = pb.HeartbeatRequest(
            name="billing", instance_id="b-1", token=registered.token
        )

        answer = await client.call("Heartbeat", beat)
        assert answer.status == pb.STATUS_ACTIVE
        assert answer.ttl.ToNanoseconds() == 1_000_000_000
        await status_event(stream, "b-1", pb.STATUS_ACTIVE)

        # Beating well within the TTL, for longer than the TTL.
        started = trio.current_time()
        while trio.current_time() - started < 1.5:
            assert (await client.call("Heartbeat", beat)).status == pb.STATUS_ACTIVE
            last_beat = trio.current_time()
            await trio.sleep(0.3)

        inactive = await status_event(stream, "b-1", pb.STATUS_INACTIVE)
        # The deadline is set a moment before the heartbeat returns.
        assert 0.95 <= trio.current_time() - last_beat <= 1.0 + 1.0
        assert (await client.call("Heartbeat", beat)).status == pb.STATUS_ACTIVE
        await status_event(stream, "b-1", pb.STATUS_ACTIVE)

    history = await client.call(
        "History", pb.HistoryRequest(name="billing", instance_id="b-1")
    )
    went_down = history.transitions[1]
    assert went_down.revision == inactive.revision
    assert went_down.probe.error.startswith("no heartbeat for ")


async def test_each_check_kind_drives_its_instance_status(
    nursery: trio.Nursery, database_url: str, tmp_path: Path
) -> None:
    kubernetes = KubernetesApi()
    await kubernetes.serve(nursery)
    kubernetes.pods[("shop", "web-0")] = True
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubernetes.kubeconfig())
    replica = await start_replica(
        nursery, database_url, kubeconfig=str(kubeconfig), **NO_GUARD
    )
    assert replica.port is not None
    tcp = TcpTarget()
    tcp_port = await tcp.serve(nursery)
    fast = {"interval": seconds(1), "failure_threshold": 1}

    with grpc_health_server() as (servicer, grpc_port):
        servicer.set("billing.v1.Billing", SERVING)
        requests = {
            "by-grpc": checked(
                "by-grpc",
                grpc_port,
                pb.HealthCheck(grpc=pb.GrpcCheck(service="billing.v1.Billing"), **fast),
                api="grpc",
            ),
            "by-tcp": checked(
                "by-tcp", tcp_port, pb.HealthCheck(tcp=pb.TcpCheck(), **fast), api="db"
            ),
            "by-pod": checked(
                "by-pod",
                8080,
                pb.HealthCheck(
                    kubernetes=pb.KubernetesCheck(namespace="shop", pod="web-0"), **fast
                ),
            ),
        }
        async with (
            grpc_client(replica.port) as client,
            watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream,
        ):
            for request in requests.values():
                await client.call("Register", request)
            await status_events(stream, list(requests), pb.STATUS_ACTIVE)

            servicer.set("billing.v1.Billing", NOT_SERVING)
            await tcp.close()
            kubernetes.pods[("shop", "web-0")] = False
            down = await status_events(stream, list(requests), pb.STATUS_INACTIVE)

            history = await client.call("History", pb.HistoryRequest(name="billing"))

    assert all(event.instance.status == pb.STATUS_INACTIVE for event in down.values())
    reasons = {
        t.instance_id: (t.probe.code, t.probe.error)
        for t in history.transitions
        if t.to_status == pb.STATUS_INACTIVE
    }
    assert reasons["by-grpc"] == (NOT_SERVING, "Health/Check: NOT_SERVING")
    assert reasons["by-tcp"][1].startswith(f"connect to 127.0.0.1:{tcp_port}: ")
    assert reasons["by-pod"] == (
        200,
        "pod shop/web-0 is not ready: ContainersNotReady: "
        "containers with unready status: [web]",
    )


async def test_replica_runs_at_most_max_probes_at_once(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(
        nursery, database_url, **{**NO_GUARD, "max_probes": 3}
    )
    assert replica.port is not None
    # Targets that never answer: each probe holds its slot for its timeout.
    target = HttpTarget()
    target.mode = Mode.HANG
    ports = await target.serve(nursery, count=8)
    async with grpc_client(replica.port) as client:
        for n, port in enumerate(ports):
            check = http_check(timeout=seconds(0.5))
            await client.call("Register", checked(f"b-{n}", port, check))

        # Every target probed, some of them twice: several rounds of slots.
        await target.wait_for_hits(len(ports) + 3)
    assert target.most_hanging == 3
    assert {hit.port for hit in target.hits} == set(ports)


async def test_registering_again_restarts_probing_from_pending(
    client: GrpcClient, http: HttpTarget
) -> None:
    check = http_check(success_threshold=2)
    async with watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream:
        await client.call("Register", checked("b-1", http.ports[0], check))
        await status_event(stream, "b-1", pb.STATUS_ACTIVE)
        again = await client.call("Register", checked("b-1", http.ports[0], check))
        assert again.instance.status == pb.STATUS_PENDING
        active = await status_event(stream, "b-1", pb.STATUS_ACTIVE)

    # Only probes of the new generation count, and it needed two of them.
    assert active.instance.generation == 2
    history = await client.call(
        "History", pb.HistoryRequest(name="billing", instance_id="b-1", limit=1)
    )
    [proved] = history.transitions
    assert (proved.from_status, proved.revision) == (pb.STATUS_PENDING, active.revision)
    assert proved.time.ToNanoseconds() - again.instance.updated_at.ToNanoseconds() > (
        0.9e9
    )


async def test_new_registration_is_probed_at_once_while_the_scheduler_sleeps(
    nursery: trio.Nursery, database_url: str
) -> None:
    # Polling would take ten minutes, and so would the first instance's
    # claim to lapse (the scheduler also looks again when a lease expires):
    # only the second registration itself can wake the scheduler in time.
    replica = await start_replica(
        nursery,
        database_url,
        **(NO_GUARD | {"probe_poll_interval": 600.0, "probe_lease": 600.0}),
    )
    assert replica.port is not None
    http = HttpTarget()
    first, second = await http.serve(nursery, count=2)
    slow = pb.HealthCheck(http=pb.HttpCheck(path="/healthz"), interval=seconds(60))
    async with (
        grpc_client(replica.port) as client,
        watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream,
    ):
        await client.call("Register", checked("b-1", first, slow))
        await status_event(stream, "b-1", pb.STATUS_ACTIVE)
        await client.call("Register", checked("b-2", second, slow))
        await status_event(stream, "b-2", pb.STATUS_ACTIVE)


def test_only_a_new_generation_with_a_check_brings_a_probe_due() -> None:
    ttl = HealthCheck(CheckKind.TTL, ttl_seconds=5)

    def brings(kind: EventType, check: HealthCheck | None) -> bool:
        return brings_probe_due(sample_event(1, kind=kind, check=check))

    assert brings(EventType.REGISTERED, ttl)
    assert brings(EventType.UPDATED, ttl)
    assert not brings(EventType.STATUS_CHANGED, ttl)
    assert not brings(EventType.DEREGISTERED, ttl)
    assert not brings(EventType.REGISTERED, None)
    assert not brings(EventType.UPDATED, None)


@asynccontextmanager
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection, as a SQL consumer would hold."""
    async with trio_asyncio.open_loop():
        connection = await aio_as_trio(asyncpg.connect)(database_url)
        try:
            yield connection
        finally:
            await aio_as_trio(connection.close)()


async def test_transitions_are_queryable_in_sql(
    client: GrpcClient, http: HttpTarget, database_url: str
) -> None:
    http.respond = lambda port, path: HttpResponse(503, b"overloaded")
    check = http_check(failure_threshold=1)
    async with watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream:
        await client.call("Register", checked("b-1", http.ports[0], check))
        event = await status_event(stream, "b-1", pb.STATUS_INACTIVE)

    async with sql(database_url) as connection:
        rows = await aio_as_trio(connection.fetch)(
            "SELECT from_status, to_status, revision, probe_healthy, probe_code,"
            " probe_error FROM registry.transitions WHERE name = 'billing'"
        )
        probe = await aio_as_trio(connection.fetchrow)(
            "SELECT failures, last_code, down_since IS NOT NULL AS down"
            " FROM registry.probes WHERE name = 'billing'"
        )
    assert [tuple(row) for row in rows] == [
        ("pending", "inactive", event.revision, False, 503, "HTTP 503: overloaded")
    ]
    assert probe is not None
    assert (probe["failures"] >= 1, probe["last_code"], probe["down"]) == (
        True,
        503,
        True,
    )


async def test_deregistration_guard_holds_when_all_targets_fail_at_once(
    nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.probes")
    replica = await start_replica(
        nursery,
        database_url,
        max_probes=100,
        guard_startup=0.0,
        guard_window=3.0,
        guard_fraction=0.5,
        guard_min_probes=5,
        guard_max_hold=4.0,
        probe_backoff_max=1.0,
        probe_poll_interval=0.5,
    )
    assert replica.port is not None
    http = HttpTarget()
    ports = await http.serve(nursery, count=6)
    check = http_check(failure_threshold=1, deregister_after=seconds(1))
    ids = [f"b-{n}" for n in range(len(ports))]

    async with (
        grpc_client(replica.port) as client,
        watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream,
    ):
        for instance_id, port in zip(ids, ports, strict=True):
            await client.call("Register", checked(instance_id, port, check))
        await status_events(stream, ids, pb.STATUS_ACTIVE)

        # Everything fails at once, as when the registry's own network breaks.
        http.mode = Mode.SILENT
        stopped = trio.current_time()
        await status_events(stream, ids, pb.STATUS_INACTIVE)
        # Three failed probes each: the deregistration of every one fell due
        # a second ago, and the guard held it.
        for port in ports:
            before = [h for h in http.hits if h.port == port and h.time < stopped]
            await http.wait_for_hits(len(before) + 3, port)
        assert replica.deregistration_guard_active
        listed = await client.call("List", pb.ListRequest(name="billing"))
        assert [i.status for i in listed.instances] == [pb.STATUS_INACTIVE] * 6
        # The replica itself is fine, and says so.
        health = health_pb2_grpc.HealthStub(client.channel)
        answer = await in_thread(
            health.Check, health_pb2.HealthCheckRequest(), timeout=WAIT
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

        # The guard is time-boxed: once it ends, deregistration goes ahead.
        gone = set()
        while len(gone) < len(ids):
            event = await next_event(stream)
            assert event.type == pb.EVENT_TYPE_DEREGISTERED, event
            gone.add(event.instance.instance_id)
        assert trio.current_time() - stopped >= 4.0
        assert not replica.deregistration_guard_active

    on = [r for r in caplog.records if "deregistration guard on" in r.getMessage()]
    off = [r for r in caplog.records if "deregistration guard off" in r.getMessage()]
    assert len(on) == 1
    assert on[0].levelno == logging.WARNING
    assert "most probes are failing" in on[0].getMessage()
    assert len(off) == 1


async def test_deregistration_guard_holds_right_after_the_replica_starts(
    nursery: trio.Nursery,
    database_url: str,
    http: HttpTarget,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registry.probes")
    started = trio.current_time()
    replica = await start_replica(
        nursery,
        database_url,
        max_probes=100,
        guard_startup=2.0,
        guard_min_probes=1_000_000,
        probe_backoff_max=1.0,
        probe_poll_interval=0.5,
    )
    assert replica.port is not None
    assert replica.deregistration_guard_active
    http.mode = Mode.SILENT
    check = http_check(failure_threshold=1, deregister_after=seconds(1))

    async with (
        grpc_client(replica.port) as client,
        watch_stream(client.stub, pb.WatchRequest(names=["billing"])) as stream,
    ):
        await client.call("Register", checked("b-1", http.ports[0], check))
        await status_event(stream, "b-1", pb.STATUS_INACTIVE)
        gone = await next_event(stream)

    assert gone.type == pb.EVENT_TYPE_DEREGISTERED
    # Due a second after it went down, but held until the startup hold ended.
    assert trio.current_time() - started >= 2.0
    assert len(http.hits) >= 3
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("deregistration guard")
    ]
    assert len(lines) == 2
    assert lines[0] == (
        "deregistration guard on: the replica started recently; deregistrations wait 2s"
    )
    assert lines[1].startswith("deregistration guard off after 2.")


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("guard_fraction", 1.5, "REGISTRY_GUARD_FRACTION=1.5: use a share"),
        ("probe_interval", 0.0, "REGISTRY_PROBE_INTERVAL=0.0: use more than 0"),
        ("failure_threshold", 0, "REGISTRY_FAILURE_THRESHOLD=0: use 1 or more"),
        ("deregister_after", -1.0, "REGISTRY_DEREGISTER_AFTER=-1.0: use 0 or more"),
    ],
)
def test_a_bad_probe_setting_is_refused_naming_its_variable(
    setting: str, value: float, message: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ProbeSettings.from_config(replace(TEST_CONFIG, **{setting: value}))

    assert str(refused.value).startswith(message)


async def test_replica_with_a_bad_probe_setting_refuses_to_start(
    nursery: trio.Nursery, database_url: str
) -> None:
    with pytest.raises(BaseExceptionGroup) as failed:
        await start_replica(nursery, database_url, guard_fraction=0.0)

    matched, _ = failed.value.split(InvalidArgument)
    assert matched is not None
    [error] = _leaves(matched)
    assert str(error).startswith("REGISTRY_GUARD_FRACTION=0.0")


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found += _leaves(exc)
        else:
            found.append(exc)
    return found
