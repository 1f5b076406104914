"""registry.client against real replicas: in-process ones, and `registry
serve` processes for the tests that kill one."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import grpc
import pytest
import trio
import trio_asyncio
from google.protobuf.duration_pb2 import Duration

from harness import (
    WAIT,
    grpc_client,
    registration,
    relay,
    replica_process,
    start_replica,
    start_replica_behind_proxy,
    watch_stream,
)
from registry import client as registry_client
from registry import store
from registry._client_transport import RpcError, hold_channel
from registry.app import Replica
from registry.client import (
    Client,
    ClientError,
    DeadlineExceeded,
    InvalidArgument,
    NoActiveInstance,
    NotFound,
    Resynced,
    Snapshot,
    Unauthorized,
    Unavailable,
    connect,
)
from registry.db import Database
from registry.v1 import registry_pb2 as pb
from registry.v1 import registry_pb2_grpc


def service(name: str, instance_id: str, n: int = 1, **fields: Any) -> Any:
    """A RegisterRequest of its own address, so that no two collide on a port."""
    return registration(name, instance_id, address=f"10.0.0.{n}", **fields)


def with_ttl(request: Any, seconds: int = 5) -> Any:
    """`request` with a TTL check that a single heartbeat (or a single miss)
    settles. Heartbeats go every TTL/3: one has to be late by two thirds of
    the TTL to be missed."""
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
    # TTL checks are judged (no test here registers another kind of check,
    # so nothing is sent a probe), and looked at often: a missed heartbeat
    # shows within the test.
    return await start_replica(
        nursery, database_url, max_probes=10, probe_poll_interval=0.1
    )


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


async def test_client_fails_over_when_its_replica_lost_the_database(
    nursery: trio.Nursery, database_url: str
) -> None:
    cut_off, proxy = await start_replica_behind_proxy(nursery, database_url)
    healthy = await start_replica(nursery, database_url)
    async with connect([endpoint(cut_off), endpoint(healthy)]) as client:
        await client.register(service("billing", "b-1"))
        assert client.endpoint == endpoint(cut_off)

        proxy.cut()
        resolved = await client.resolve("billing")

        assert [i.instance_id for i in resolved.instances] == ["b-1"]
        assert client.endpoint == endpoint(healthy)


async def test_client_resolve_without_an_active_instance_stays_on_its_endpoint(
    nursery: trio.Nursery, database_url: str
) -> None:
    a = await start_replica(nursery, database_url)
    b = await start_replica(nursery, database_url)
    async with connect([endpoint(a), endpoint(b)]) as client:
        # Pending until its first heartbeat, which nobody sends.
        await client.register(with_ttl(service("billing", "b-1")))
        with pytest.raises(NoActiveInstance) as none_active:
            await client.resolve("billing")
        assert str(none_active.value) == (
            "UNAVAILABLE: 'billing' has no active instance: 1 pending"
        )
        assert isinstance(none_active.value, Unavailable)
        assert none_active.value.code == "UNAVAILABLE"

        # A live replica's answer: the client neither failed over nor
        # dropped its connection.
        assert client.endpoint == endpoint(a)
        await client.list()
        assert client.endpoint == endpoint(a)


async def test_client_reads_wait_for_the_revision_of_its_own_last_write(
    client: Client,
) -> None:
    await client.register(service("billing", "b-1"))
    # As if its last write had gone to a replica that this one has not
    # caught up with: reads wait for it, however they are made.
    client._wrote("orders", 10**6)
    with trio.fail_after(WAIT):
        with pytest.raises(DeadlineExceeded):
            await client.resolve("billing", timeout=0.2)
        with pytest.raises(DeadlineExceeded):
            await client.list(name="billing", timeout=0.2)


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
    ttl = 2
    request = service("billing", "b-1")
    # Without heartbeats, INACTIVE one TTL and one interval after the first
    # (2 misses); with them, only if they stall for that long: late ones on
    # a loaded machine do not count. Their cadence is tested below, on the
    # mock clock.
    request.check.CopyFrom(
        pb.HealthCheck(
            ttl=pb.TtlCheck(ttl=Duration(seconds=ttl)),
            interval=Duration(seconds=1),
            success_threshold=1,
            failure_threshold=2,
        )
    )
    async with client.registered(request) as me:
        assert me.instance.status == pb.STATUS_PENDING
        async with client.watch(["billing"], from_revision=me.revision) as events:
            with trio.fail_after(WAIT):
                active = await anext(events)
            assert (active.type, active.instance.status) == (
                pb.EVENT_TYPE_STATUS_CHANGED,
                pb.STATUS_ACTIVE,
            )
            with trio.move_on_after(2 * ttl):
                changed = await anext(events)
                pytest.fail(f"the instance changed: {changed}")
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


async def test_registered_block_ends_when_a_newer_registration_owns_the_entry(
    client: Client, replica: Replica
) -> None:
    assert replica.port is not None
    with trio.fail_after(WAIT), pytest.raises(Unauthorized) as replaced:
        async with client.registered(with_ttl(service("billing", "b-1"))) as me:
            # Another process starts with the same instance id.
            async with grpc_client(replica.port) as official:
                newer = await official.call(
                    "Register", with_ttl(service("billing", "b-1"))
                )
            await trio.sleep_forever()
    assert replaced.value.code == "PERMISSION_DENIED"
    assert "a newer registration of the same instance id owns the entry" in str(
        replaced.value
    )

    # The newer one keeps its entry: neither registered over nor removed.
    async with grpc_client(replica.port) as official:
        (instance,) = (
            await official.call("List", pb.ListRequest(name="billing"))
        ).instances
    assert (instance.instance_id, instance.generation) == ("b-1", 2)
    assert instance.generation == newer.instance.generation
    assert me.deregistered_revision is None


async def test_registered_block_cancelled_while_registering_still_deregisters(
    replica: Replica,
) -> None:
    assert replica.port is not None
    async with (
        relay(replica.port) as proxy,
        connect(proxy.endpoint) as client,
        grpc_client(replica.port) as official,
    ):
        before = await client.register(service("orders", "o-1"))
        request = pb.WatchRequest(names=["billing"], from_revision=before.revision)
        async with watch_stream(official.stub, request) as stream:
            holding = trio.CancelScope()

            async def hold() -> None:
                with holding:
                    async with client.registered(service("billing", "b-1", 2)):
                        await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                # The replica's answer to the Register is kept back; the
                # block is cancelled once the Register has committed.
                proxy.hold()
                nursery.start_soon(hold)
                registered = await stream.receive_event()
                assert registered.type == pb.EVENT_TYPE_REGISTERED
                holding.cancel()
                proxy.release()
            assert holding.cancelled_caught

        # Its answer was still taken, and with its token the entry removed.
        assert await listed(replica, "billing") == []


async def test_registered_block_gives_up_leaving_after_its_shutdown_timeout(
    replica: Replica, caplog: pytest.LogCaptureFixture
) -> None:
    assert replica.port is not None
    async with relay(replica.port) as proxy, connect(proxy.endpoint) as client:
        with trio.fail_after(WAIT):
            async with client.registered(
                service("billing", "b-1"), shutdown_timeout=0.5
            ) as me:
                # Whatever the replica answers from now on is lost.
                proxy.hold()
                leaving = trio.current_time()
            took = trio.current_time() - leaving
    # Bounded by the shutdown timeout, well before a call's own (10 s).
    assert 0.5 <= took < client.timeout / 2
    assert me.leave_error == (
        "could not deregister billing/b-1 within 0.5s; "
        "with a TTL check the registry expires it"
    )
    assert me.deregistered_revision is None
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "registry.client" and r.levelno >= logging.WARNING
    ]
    # Drain had half the time, and then Deregister was tried with the rest.
    assert len(warnings) == 2
    assert warnings[0].startswith("could not drain billing/b-1: ")
    assert warnings[1] == me.leave_error


# --- the heartbeat cadence, on the mock clock --------------------------------


class Renewals:
    """What the heartbeat loop calls, as plain functions: each call takes
    `latency` and answers with the next of `answers` (a TTL the registry
    says, 0 for none, or an error to raise), then 0 for good. Times are
    seconds since it was made."""

    def __init__(
        self, answers: list[float | ClientError], latency: float = 0.25
    ) -> None:
        self.heartbeats: list[float] = []
        self.registrations: list[float] = []
        self._answers = answers
        self._latency = latency
        self._start = trio.current_time()

    async def heartbeat(self) -> float:
        self.heartbeats.append(trio.current_time() - self._start)
        await trio.sleep(self._latency)
        answer = self._answers.pop(0) if self._answers else 0.0
        if isinstance(answer, ClientError):
            raise answer
        return answer

    async def register_again(self) -> None:
        self.registrations.append(trio.current_time() - self._start)
        await trio.sleep(self._latency)

    async def run(self, ttl: float, *, until: float) -> None:
        with trio.move_on_after(until):
            await registry_client._heartbeat_loop(
                "billing/b-1", ttl, self.heartbeat, self.register_again
            )


def lost() -> NotFound:
    return NotFound("NOT_FOUND: no instance 'b-1' of 'billing'", code="NOT_FOUND")


async def test_heartbeats_go_every_third_of_the_ttl_the_registry_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Counted from the start of the previous one, so latency does not add
    # up; the second answer halves the TTL.
    renewals = Renewals([0.0, 4.5])
    await renewals.run(9, until=8)
    assert renewals.heartbeats == [0, 3, 4.5, 6, 7.5]
    assert renewals.registrations == []


async def test_heartbeat_loop_registers_again_at_once_then_with_a_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    renewals = Renewals([0.0, lost(), lost()])
    await renewals.run(9, until=7.5)
    # Lost at 3.25: registered again at once, renewed; lost again at 3.75:
    # registered again after a backoff (its first is 0.25-0.5 s).
    first, second = renewals.registrations
    assert renewals.heartbeats[:3] == [0, 3, 3.5]
    assert first == 3.25
    assert 4.0 <= second <= 4.25
    # Then the steady cadence, from the start of the successful round.
    assert renewals.heartbeats[3:] == pytest.approx([second + 0.25, second + 3])


async def test_heartbeat_loop_retries_a_failed_heartbeat_within_a_third_of_the_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    down = Unavailable("cannot reach 10.0.0.5:50051", code="UNAVAILABLE")
    renewals = Renewals([0.0, down, down])
    await renewals.run(9, until=6)
    _, failed, again, third, *_ = renewals.heartbeats
    assert failed == 3
    assert 0.25 <= again - (failed + 0.25) <= 0.5
    assert 0.5 <= third - (again + 0.25) <= 1.0
    assert renewals.registrations == []


async def test_heartbeat_loop_stops_when_a_newer_registration_owns_the_entry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = Unauthorized(
        "PERMISSION_DENIED: the token is of generation 1; generation 2 is current",
        code="PERMISSION_DENIED",
    )
    renewals = Renewals([0.0, refused])
    with pytest.raises(Unauthorized) as stopped:
        await renewals.run(9, until=60)
    assert trio.current_time() - renewals._start == 3.25
    assert renewals.heartbeats == [0, 3]
    assert renewals.registrations == []
    assert stopped.value.code == "PERMISSION_DENIED"
    assert str(stopped.value) == (
        "the registry refused the heartbeat of billing/b-1 (PERMISSION_DENIED: "
        "the token is of generation 1; generation 2 is current): a newer "
        "registration of the same instance id owns the entry; this one stopped "
        "sending heartbeats"
    )


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
    assert [
        r.getMessage()
        for r in caplog.records
        if r.name == "registry.client" and r.levelno >= logging.WARNING
    ] == []


@pytest.mark.parametrize(
    "start",
    [{"from_revision": 1}, {"snapshot": True}, {}],
    ids=["from-a-revision", "snapshot", "from-now"],
)
async def test_watch_of_an_unreachable_registry_fails_before_its_block(
    start: dict[str, Any],
) -> None:
    first, second = await unused_endpoint(), await unused_endpoint()
    async with connect([first, second]) as client:
        with trio.fail_after(WAIT), pytest.raises(Unavailable) as unavailable:
            async with client.watch(["billing"], **start):
                pytest.fail("the watch block began")
    assert f"cannot reach {first}" in str(unavailable.value)
    assert f"cannot reach {second}" in str(unavailable.value)


class EndsEveryWatch(registry_pb2_grpc.RegistryServicer):  # type: ignore[misc]  # generated, untyped
    """A Registry (grpcio) whose Watch streams end at once, with OK and no
    message; it sends the (Trio) time of each one to `opened`."""

    def __init__(self, opened: trio.MemorySendChannel[float]) -> None:
        self._opened = opened
        self._token = trio.lowlevel.current_trio_token()

    def Watch(self, request: Any, context: Any) -> Iterator[Any]:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(
                lambda: self._opened.send_nowait(trio.current_time()),
                trio_token=self._token,
            )
        return iter(())


async def test_watch_backs_off_when_its_streams_end_at_once() -> None:
    opened, opening = trio.open_memory_channel[float](math.inf)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    registry_pb2_grpc.add_RegistryServicer_to_server(EndsEveryWatch(opened), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        async with (
            connect(f"127.0.0.1:{port}") as client,
            client.watch(from_revision=1) as events,
            trio.open_nursery() as nursery,
        ):

            async def follow() -> None:
                async for _ in events:
                    pass

            nursery.start_soon(follow)
            with trio.fail_after(WAIT):
                times = [await opening.receive() for _ in range(5)]
            nursery.cancel_scope.cancel()
    finally:
        server.stop(None)
    # The waits are drawn from the upper half of a bound that doubles from
    # 0.1 s; a resume without one would follow at once.
    gaps = [later - earlier for earlier, later in pairwise(times)]
    assert all(gap >= 0.1 * 2**n / 2 for n, gap in enumerate(gaps)), gaps


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
