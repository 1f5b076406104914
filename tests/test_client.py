"""registry.client against real replicas: in-process ones, and `registry
serve` processes for the tests that kill one."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio_asyncio
from google.protobuf.duration_pb2 import Duration

from harness import (
    WAIT,
    grpc_client,
    registration,
    replica_process,
    start_replica,
    watch_stream,
)
from registry import client as registry_client
from registry import store
from registry._client_transport import RpcError, hold_channel
from registry.app import Replica
from registry.client import (
    Client,
    InvalidArgument,
    NotFound,
    Resynced,
    Snapshot,
    Unauthorized,
    Unavailable,
    connect,
)
from registry.db import Database
from registry.v1 import registry_pb2 as pb


def service(name: str, instance_id: str, n: int = 1, **fields: Any) -> Any:
    """A RegisterRequest of its own address, so that no two collide on a port."""
    return registration(name, instance_id, address=f"10.0.0.{n}", **fields)


def with_ttl(request: Any, seconds: int = 1) -> Any:
    """`request` with a TTL check that a single heartbeat (or a single miss)
    settles."""
    request.check.CopyFrom(
        pb.HealthCheck(
            ttl=pb.TtlCheck(ttl=Duration(seconds=seconds)),
            success_threshold=1,
            failure_threshold=1,
        )
    )
    return request


def asking_for_a_port(request: Any) -> Any:
    """`request` with its API's port left for the registry to choose."""
    request.apis[0].port = 0
    return request


async def ports_of(replica: Replica, name: str, instance_id: str) -> dict[str, int]:
    """The ports of an instance as stored, read with grpcio."""
    assert replica.port is not None
    async with grpc_client(replica.port) as official:
        response = await official.call("List", pb.ListRequest(name=name))
    (instance,) = [i for i in response.instances if i.instance_id == instance_id]
    return {api.name: api.port for api in instance.apis}


def endpoint(replica: Replica | Any) -> str:
    return f"127.0.0.1:{replica.port}"


async def unused_endpoint() -> str:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{unused.getsockname()[1]}"


@pytest.fixture
async def replica(nursery: trio.Nursery, database_url: str) -> Replica:
    # Probes of due TTL checks are looked for often: a missed heartbeat
    # would show within the test.
    return await start_replica(nursery, database_url, probe_poll_interval=0.1)


@pytest.fixture
async def client(replica: Replica) -> AsyncIterator[Client]:
    async with connect(endpoint(replica)) as client:
        yield client


async def listed(replica: Replica, name: str) -> list[tuple[str, int]]:
    """(instance id, status) of each instance of `name`, read with grpcio."""
    assert replica.port is not None
    async with grpc_client(replica.port) as official:
        response = await official.call("List", pb.ListRequest(name=name))
    return [(i.instance_id, i.status) for i in response.instances]


# --- calls -------------------------------------------------------------------


async def test_client_register_resolve_deregister_read_their_own_writes(
    client: Client,
) -> None:
    registered = await client.register(service("billing", "b-1"))
    assert client.revision == registered.revision == 1

    resolved = await client.resolve("billing")
    assert [i.instance_id for i in resolved.instances] == ["b-1"]
    assert resolved.revision >= registered.revision

    removed = await client.deregister("billing", "b-1", registered.token)
    assert client.revision == removed == 2
    assert (await client.list(name="billing")).instances == []


async def test_client_register_fills_in_an_empty_instance_id(client: Client) -> None:
    first = await client.register(service("billing", ""))
    second = await client.register(service("billing", "", n=2))
    ids = {first.instance.instance_id, second.instance.instance_id}
    assert len(ids) == 2 and "" not in ids
    listed = await client.list(name="billing", status="active")
    assert {i.instance_id for i in listed.instances} == ids


async def test_client_maps_status_codes_to_its_exceptions(client: Client) -> None:
    registered = await client.register(service("billing", "b-1"))

    with pytest.raises(NotFound) as not_found:
        await client.resolve("payments")
    assert not_found.value.code == "NOT_FOUND"
    assert str(not_found.value) == "NOT_FOUND: no instance of 'payments' is registered"

    with pytest.raises(InvalidArgument, match="name"):
        await client.resolve("Not A Name")

    with pytest.raises(Unauthorized) as wrong_token:
        await client.deregister("billing", "b-1", registered.token[:-2] + "xx")
    assert wrong_token.value.code == "PERMISSION_DENIED"

    # All of them are ClientErrors, and the entry is still there.
    with pytest.raises(registry_client.ClientError):
        await client.resolve("payments")
    assert [i.instance_id for i in (await client.resolve("billing")).instances] == [
        "b-1"
    ]


async def test_client_error_leaves_its_block_unwrapped(replica: Replica) -> None:
    with pytest.raises(NotFound):
        async with connect(endpoint(replica)) as client:
            await client.resolve("payments")


async def test_client_fails_over_past_an_unreachable_endpoint(
    replica: Replica,
) -> None:
    dead = await unused_endpoint()
    async with connect([dead, endpoint(replica)]) as client:
        await client.register(service("billing", "b-1"))
        assert client.endpoint == endpoint(replica)
        assert [i.instance_id for i in (await client.resolve("billing")).instances] == [
            "b-1"
        ]


async def test_client_without_a_reachable_endpoint_raises_unavailable() -> None:
    first, second = await unused_endpoint(), await unused_endpoint()
    async with connect(f"{first},{second}") as client:
        with pytest.raises(Unavailable) as unavailable:
            await client.list()
    assert f"cannot reach {first}" in str(unavailable.value)
    assert f"cannot reach {second}" in str(unavailable.value)


async def test_connect_rejects_a_malformed_endpoint() -> None:
    with pytest.raises(ValueError, match="'localhost' is not HOST:PORT"):
        async with connect("localhost"):
            pass


async def test_client_timeout_ends_a_call_here_and_on_the_server(
    client: Client, replica: Replica
) -> None:
    assert replica.server is not None
    with trio.fail_after(WAIT):
        with pytest.raises(registry_client.DeadlineExceeded) as exceeded:
            # A revision nobody writes: the server would wait for 30 s.
            await client.resolve("billing", min_revision=10**6, timeout=0.2)
        # The call was reset, not left to run on the server.
        await replica.server.wait_idle()
    assert str(exceeded.value) == f"no answer from {endpoint(replica)} within 0.2s"


async def test_channel_sends_the_deadline_as_grpc_timeout(
    nursery: trio.Nursery, replica: Replica
) -> None:
    assert replica.port is not None
    channel = await nursery.start(
        lambda task_status: hold_channel(
            endpoint(replica),
            "127.0.0.1",
            replica.port,
            nursery=nursery,
            connect_timeout=WAIT,
            max_message_bytes=4 * 1024 * 1024,
            task_status=task_status,
        )
    )
    try:
        call = await channel.start_call(
            "registry.v1.Registry",
            "Resolve",
            pb.ResolveRequest(name="billing", min_revision=10**6),
            pb.ResolveResponse,
            deadline_header=0.2,
        )
        # No deadline here: the answer can only come from the server's.
        with trio.fail_after(WAIT), pytest.raises(RpcError) as failed:
            await call.receive()
        call.close()
    finally:
        channel.close()
    assert failed.value.code.name == "DEADLINE_EXCEEDED"


def bulky(name: str, instance_id: str, n: int) -> Any:
    """A RegisterRequest of about 60 KiB, most of it metadata."""
    return service(
        name, instance_id, n, metadata={f"k{i}": "x" * 960 for i in range(60)}
    )


async def test_watch_reads_more_than_a_flow_control_window(replica: Replica) -> None:
    # A window is twice the message size limit: 256 KiB here, and the
    # replay below is about 600 KiB. It flows only if what is read is
    # handed back to the server.
    async with connect(endpoint(replica), max_message_bytes=128 * 1024) as client:
        for n in range(10):
            await client.register(bulky("billing", f"b-{n}", n))
        async with client.watch(["billing"], from_revision=1) as events:
            with trio.fail_after(WAIT):
                revisions = [(await anext(events)).revision for _ in range(9)]
    assert revisions == list(range(2, 11))


async def test_client_refuses_an_answer_over_its_size_limit(replica: Replica) -> None:
    async with connect(endpoint(replica), max_message_bytes=128 * 1024) as client:
        for n in range(3):
            await client.register(bulky("billing", f"b-{n}", n))
        await client.register(service("orders", "o-1", 9))
        with pytest.raises(registry_client.ResourceExhausted, match="too large"):
            await client.list(name="billing")
        # The call is over; the connection goes on.
        assert client.endpoint == endpoint(replica)
        assert [i.instance_id for i in (await client.resolve("orders")).instances] == [
            "o-1"
        ]


# --- a registration's lifetime -----------------------------------------------


async def test_registered_block_holds_the_entry_and_removes_it_on_exit(
    client: Client, replica: Replica
) -> None:
    request = asking_for_a_port(service("billing", "b-1"))
    async with client.registered(request) as me:
        assert (me.name, me.instance_id, me.generation) == ("billing", "b-1", 1)
        assert me.ports == await ports_of(replica, "billing", "b-1")
        assert me.token
        assert await listed(replica, "billing") == [("b-1", pb.STATUS_ACTIVE)]
    assert await listed(replica, "billing") == []
    assert me.deregistered_revision == client.revision
    assert me.leave_error is None


async def test_registered_block_drains_then_deregisters_when_cancelled(
    replica: Replica,
) -> None:
    assert replica.port is not None
    async with grpc_client(replica.port) as official:
        request = pb.WatchRequest(names=["billing"], from_revision=0)
        async with watch_stream(official.stub, request) as stream:
            # The whole client block is cancelled, its connections with it:
            # leaving the registration must still reach the registry.
            with trio.CancelScope() as scope:
                async with (
                    connect(endpoint(replica)) as client,
                    client.registered(service("billing", "b-1")) as me,
                ):
                    assert (await stream.receive_event()).instance.instance_id == "b-1"
                    scope.cancel()
                    await trio.sleep_forever()
            assert scope.cancelled_caught

            draining = await stream.receive_event()
            removed = await stream.receive_event()
    assert (draining.type, draining.instance.status) == (
        pb.EVENT_TYPE_STATUS_CHANGED,
        pb.STATUS_DRAINING,
    )
    assert removed.type == pb.EVENT_TYPE_DEREGISTERED
    assert me.deregistered_revision == removed.revision
    assert await listed(replica, "billing") == []


async def test_registered_heartbeats_keep_a_ttl_instance_active(
    client: Client, replica: Replica
) -> None:
    ttl = 1
    async with client.registered(with_ttl(service("billing", "b-1"), ttl)) as me:
        assert me.instance.status == pb.STATUS_PENDING
        async with client.watch(["billing"], from_revision=me.revision) as events:
            with trio.fail_after(WAIT):
                active = await anext(events)
            assert (active.type, active.instance.status) == (
                pb.EVENT_TYPE_STATUS_CHANGED,
                pb.STATUS_ACTIVE,
            )
            # Over several TTLs, not one change: the heartbeats (every TTL/3)
            # renew it before each deadline, which a miss would cross.
            with trio.move_on_after(2.5 * ttl):
                changed = await anext(events)
                pytest.fail(f"the instance changed: {changed}")
        assert me.heartbeats >= 6
        assert me.status == pb.STATUS_ACTIVE
        assert await listed(replica, "billing") == [("b-1", pb.STATUS_ACTIVE)]
    assert await listed(replica, "billing") == []


async def test_registered_registers_again_when_the_registry_lost_the_entry(
    client: Client, replica: Replica
) -> None:
    assert replica.port is not None
    request = with_ttl(asking_for_a_port(service("billing", "b-1")))
    async with client.registered(request) as me:
        first_token, first_ports = me.token, me.ports
        async with client.watch(["billing"], from_revision=me.revision) as events:
            # Removed behind its back (as by an operator, or deregister_after).
            async with grpc_client(replica.port) as official:
                await official.call(
                    "Deregister",
                    pb.DeregisterRequest(
                        name="billing", instance_id="b-1", token=first_token
                    ),
                )
            with trio.fail_after(WAIT):
                seen = []
                async for event in events:
                    seen.append(event)
                    # Active again: its heartbeat follows its new Register.
                    if seen[-2:-1] and seen[-2].type == pb.EVENT_TYPE_REGISTERED:
                        break
            # Deregistered, registered anew, and kept alive with its new token.
            deregistered, registered, active = seen[-3:]
            assert deregistered.type == pb.EVENT_TYPE_DEREGISTERED
            assert registered.type == pb.EVENT_TYPE_REGISTERED
            assert (active.type, active.instance.status) == (
                pb.EVENT_TYPE_STATUS_CHANGED,
                pb.STATUS_ACTIVE,
            )
            assert me.revision == registered.revision
        assert me.token != first_token
        # Registered again on the port it was given (its server listens there).
        assert me.ports == first_ports == await ports_of(replica, "billing", "b-1")
        assert await listed(replica, "billing") == [("b-1", pb.STATUS_ACTIVE)]
    assert await listed(replica, "billing") == []


# --- watch -------------------------------------------------------------------


class Writer:
    """Registers new instances one after another until stopped."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.revisions: list[int] = []
        self.stop = trio.Event()
        self._wrote = trio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            n = len(self.revisions)
            response = await self.client.register(service("billing", f"b-{n}", n))
            self.revisions.append(response.revision)
            self._wrote.set()
            self._wrote = trio.Event()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(WAIT):
            while len(self.revisions) < count:
                await self._wrote.wait()


@pytest.mark.slow
async def test_watch_resumes_after_replica_dies(database_url: str) -> None:
    """The iterator's output is every revision written, once, in order,
    although its replica was killed while writes went on."""
    seen: list[int] = []
    async with (
        replica_process(database_url) as a,
        replica_process(database_url) as b,
        connect(endpoint(b)) as writing,
        connect([endpoint(a), endpoint(b)]) as watching,
        watching.watch(["billing"], snapshot=True) as events,
        trio.open_nursery() as nursery,
    ):
        writer = Writer(writing)
        with trio.fail_after(WAIT):
            assert await anext(events) == Snapshot((), 0)
            nursery.start_soon(writer.run)
            while len(seen) < 10:
                seen.append((await anext(events)).revision)
        assert watching.endpoint == endpoint(a)

        a.kill()
        killed_at = len(writer.revisions)
        # Writes go on while the watcher is cut off.
        await writer.wait_for(killed_at + 5)
        with trio.fail_after(WAIT):
            while len(seen) < killed_at + 15:
                seen.append((await anext(events)).revision)
            writer.stop.set()
            last = await writing.list()
            while seen[-1] < last.revision:
                seen.append((await anext(events)).revision)
        assert watching.endpoint == endpoint(b)
        nursery.cancel_scope.cancel()

    assert seen == writer.revisions[: len(seen)]
    assert seen == list(range(1, last.revision + 1))


async def test_watch_resumes_on_another_replica_when_its_replica_drains(
    nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = await start_replica(nursery, database_url)
    b = await start_replica(nursery, database_url)
    async with (
        connect([endpoint(a), endpoint(b)]) as client,
        client.watch() as events,
    ):
        first = await client.register(service("billing", "b-1"))
        with trio.fail_after(WAIT):
            assert (await anext(events)).revision == first.revision
        assert client.endpoint == endpoint(a)

        a.stop()
        second = await client.register(service("billing", "b-2", 2))
        with trio.fail_after(WAIT):
            event = await anext(events)
        assert (event.revision, event.instance.instance_id) == (second.revision, "b-2")
        assert client.endpoint == endpoint(b)
    # A clean hand-over (GOAWAY, the stream ended OK), not a broken connection.
    assert [r.message for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_watch_from_a_compacted_revision_resyncs_from_a_snapshot(
    client: Client, database_url: str
) -> None:
    for n in range(4):
        await client.register(service("billing", f"b-{n}", n))
    async with trio_asyncio.open_loop(), Database.open(database_url) as db:
        # The newest event is always kept: revisions 1-3 go.
        assert await store.compact_events(db, 0) == 3

    async with client.watch(["billing"], from_revision=1) as events:
        with trio.fail_after(WAIT):
            resynced = await anext(events)
            assert isinstance(resynced, Resynced)
            assert resynced.revision == 4
            assert [i.instance_id for i in resynced.instances] == [
                f"b-{n}" for n in range(4)
            ]
            after = await client.register(service("billing", "b-4", 4))
            assert (await anext(events)).revision == after.revision == 5


async def test_leaving_a_watch_block_ends_the_stream_on_the_server(
    client: Client, replica: Replica
) -> None:
    assert replica.server is not None
    async with client.watch(["billing"]) as events:
        await client.register(service("billing", "b-1"))
        with trio.fail_after(WAIT):
            await anext(events)
        assert len(replica.hub) == 1
    with trio.fail_after(WAIT):
        await replica.server.wait_idle()
    assert len(replica.hub) == 0


# --- cache -------------------------------------------------------------------


async def test_cache_follows_a_registration_made_through_another_replica(
    nursery: trio.Nursery, database_url: str
) -> None:
    a = await start_replica(nursery, database_url)
    b = await start_replica(nursery, database_url)
    async with (
        connect(endpoint(a)) as on_a,
        connect(endpoint(b)) as on_b,
        on_a.cache(["billing"]) as cache,
    ):
        assert await cache.resolve("billing") == []

        registered = await on_b.register(service("billing", "b-1"))
        await cache.wait_for(registered.revision)
        assert [i.instance_id for i in await cache.resolve("billing")] == ["b-1"]

        removed = await on_b.deregister("billing", "b-1", registered.token)
        await cache.wait_for(removed)
        assert await cache.resolve("billing") == []


async def test_cache_reads_its_clients_own_writes(client: Client) -> None:
    await client.register(service("orders", "o-1"))
    async with client.cache(["billing"]) as cache:
        assert cache.revision == 1
        # No waiting here: resolve() waits for the client's own write.
        await client.register(service("billing", "b-1", 2))
        assert [i.instance_id for i in await cache.resolve("billing")] == ["b-1"]
        with pytest.raises(ValueError, match="not 'orders'"):
            await cache.resolve("orders")


async def test_cache_resolves_active_instances_only(client: Client) -> None:
    async with client.cache() as cache:
        await client.register(service("billing", "b-1"))
        pending = await client.register(with_ttl(service("billing", "b-2", 2)))
        assert pending.instance.status == pb.STATUS_PENDING
        assert [i.instance_id for i in await cache.resolve("billing")] == ["b-1"]
