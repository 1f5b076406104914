"""Tests of the revision log in Postgres: gap-free, commit-ordered revisions
under concurrent writes, one event per change, and the `registry_events`
notifications a SQL consumer gets with a plain `LISTEN`.

Writes go through real replicas over gRPC (grpcio, several channels at once)
or straight to the table with SQL, as the prober does; reads use asyncpg on
a trio-asyncio loop opened by the test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import grpc
import pytest
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from harness import WAIT, GrpcClient, grpc_client, registration, start_replica
from registry.db import Database
from registry.v1 import registry_pb2 as pb

CHANNEL = "registry_events"


@asynccontextmanager
async def connect(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection; the caller has opened a trio-asyncio loop."""
    connection = await aio_as_trio(asyncpg.connect)(database_url, timeout=WAIT)
    try:
        yield connection
    finally:
        await aio_as_trio(connection.close)()


async def sql(connection: asyncpg.Connection, query: str, *args: Any) -> Any:
    return await aio_as_trio(connection.fetch)(query, *args)


@asynccontextmanager
async def channels(port: int, count: int) -> AsyncIterator[list[GrpcClient]]:
    """`count` grpcio clients, each on its own channel (its own connection)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(grpc_client(port)) for _ in range(count)]


async def register_all(
    clients: list[GrpcClient], requests: list[pb.RegisterRequest]
) -> list[pb.RegisterResponse]:
    """Send every request at once, spread over the clients; the responses in
    the order of the requests."""
    responses: list[pb.RegisterResponse | None] = [None] * len(requests)
    # One thread per call, so that all are in flight together.
    threads = trio.CapacityLimiter(len(requests))

    async def register(index: int) -> None:
        stub = clients[index % len(clients)].stub
        request = requests[index]
        responses[index] = await trio.to_thread.run_sync(
            lambda: stub.Register(request, timeout=WAIT), limiter=threads
        )

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for index in range(len(requests)):
                nursery.start_soon(register, index)
    assert all(r is not None for r in responses)
    return [r for r in responses if r is not None]


async def test_concurrent_registrations_take_contiguous_revisions(
    nursery: trio.Nursery, database_url: str
) -> None:
    # Two replicas, and an address per registration: nothing but the
    # revision counter orders these writes.
    a = await start_replica(nursery, database_url, pool_size=10)
    b = await start_replica(nursery, database_url, pool_size=10)
    assert a.port is not None and b.port is not None
    count = 50

    async with channels(a.port, 3) as on_a, channels(b.port, 3) as on_b:
        clients = [client for pair in zip(on_a, on_b, strict=True) for client in pair]
        [first] = await register_all(clients, [registration(instance_id="first")])
        base = first.revision
        requests = [
            registration(instance_id=f"billing-{n}", address=f"10.0.{n}.1")
            for n in range(count)
        ]
        responses = await register_all(clients, requests)

    revisions = [r.revision for r in responses]
    assert sorted(revisions) == list(range(base + 1, base + count + 1))
    assert all(r.instance.revision == r.revision for r in responses)
    assert all(r.instance.generation == 1 for r in responses)

    async with trio_asyncio.open_loop(), connect(database_url) as connection:
        events = await sql(
            connection,
            "SELECT revision, type, name, instance_id, generation,"
            " (entry->>'revision')::bigint AS entry_revision"
            " FROM registry.events WHERE revision > $1 ORDER BY revision",
            base,
        )
        head = await sql(connection, "SELECT revision FROM registry.revision")
    by_revision = sorted(responses, key=lambda r: r.revision)
    assert [tuple(e) for e in events] == [
        (r.revision, "registered", "billing", r.instance.instance_id, 1, r.revision)
        for r in by_revision
    ]
    assert head[0]["revision"] == base + count


async def test_concurrent_registrations_of_one_instance_take_distinct_generations(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, pool_size=10)
    assert replica.port is not None
    count = 20

    # All at once from the start, so that several race to insert the first
    # generation as well as to replace it.
    async with channels(replica.port, 4) as clients:
        responses = await register_all(
            clients, [registration(instance_id="billing-1") for _ in range(count)]
        )
        by_revision = sorted(responses, key=lambda r: r.revision)

        # Only the newest generation's token removes the entry.
        stale = pb.DeregisterRequest(
            name="billing", instance_id="billing-1", token=by_revision[-2].token
        )
        current = pb.DeregisterRequest(
            name="billing", instance_id="billing-1", token=by_revision[-1].token
        )
        with pytest.raises(grpc.RpcError) as denied:
            await clients[0].call("Deregister", stale)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        gone = await clients[0].call("Deregister", current)

    # Generations follow revisions: each Register waits for the one before.
    assert [r.revision for r in by_revision] == list(range(1, count + 1))
    assert [r.instance.generation for r in by_revision] == list(range(1, count + 1))
    assert len({r.token for r in responses}) == count

    async with trio_asyncio.open_loop(), connect(database_url) as connection:
        events = await sql(
            connection,
            "SELECT revision, type, generation FROM registry.events ORDER BY revision",
        )
    assert [tuple(e) for e in events] == [
        (1, "registered", 1),
        *[(n, "updated", n) for n in range(2, count + 1)],
        (gone.revision, "deregistered", count),
    ]
    assert gone.revision == count + 1


async def test_racing_first_registrations_of_one_instance_insert_once(
    database_url: str,
) -> None:
    put = (
        "SELECT generation, revision FROM registry.put_instance("
        "'billing', 'billing-1', 'active', '127.0.0.1', '1.0', '', '[]', '[]',"
        " '{}', NULL, $1)"
    )
    async with trio_asyncio.open_loop():
        async with Database.open(database_url, max_size=1) as db:
            await db.apply_schema()
        async with (
            connect(database_url) as first,
            connect(database_url) as second,
            connect(database_url) as observer,
        ):
            # The first registration inserts, and holds its transaction open.
            transaction = first.transaction()
            await aio_as_trio(transaction.start)()
            [inserted] = await sql(first, put, b"first")

            # The second finds no row to update (the insert is not committed),
            # so it inserts too, and waits in the trigger for the counter.
            racing: list[Any] = []

            async def register_second() -> None:
                racing.extend(await sql(second, put, b"second"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(register_second)
                second_pid = second.get_server_pid()
                # Postgres signals no lock wait: ask it, a round trip each time.
                with trio.fail_after(WAIT):
                    while not (
                        await sql(
                            observer,
                            "SELECT wait_event_type = 'Lock' AS waiting"
                            " FROM pg_stat_activity WHERE pid = $1",
                            second_pid,
                        )
                    )[0]["waiting"]:
                        pass
                await aio_as_trio(transaction.commit)()

            events = await sql(
                observer,
                "SELECT revision, type, generation FROM registry.events"
                " ORDER BY revision",
            )
            [head] = await sql(observer, "SELECT revision FROM registry.revision")

    # Its insert failed on the key, and it updated the first one's row instead:
    # the failed insert's revision and event went back with it.
    assert tuple(inserted) == (1, 1)
    assert [tuple(r) for r in racing] == [(2, 2)]
    assert [tuple(e) for e in events] == [(1, "registered", 1), (2, "updated", 2)]
    assert head["revision"] == 2


@asynccontextmanager
async def listening(
    database_url: str,
) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
    """The payloads of `registry_events`, through a plain asyncpg LISTEN."""
    payloads_in, payloads = trio.open_memory_channel[dict[str, Any]](100)

    def on_notify(_: object, __: int, channel: str, payload: str) -> None:
        # Called on the asyncio side, in this thread: no await allowed.
        assert channel == CHANNEL
        payloads_in.send_nowait(json.loads(payload))

    async with connect(database_url) as listener:
        await aio_as_trio(listener.add_listener)(CHANNEL, on_notify)
        yield payloads
        await aio_as_trio(listener.remove_listener)(CHANNEL, on_notify)


async def next_payload(
    payloads: trio.MemoryReceiveChannel[dict[str, Any]],
) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        return await payloads.receive()


async def test_listen_receives_the_documented_payloads(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None

    async with (
        trio_asyncio.open_loop(),
        listening(database_url) as payloads,
        connect(database_url) as writer,
        grpc_client(replica.port) as client,
    ):
        registered = await client.call(
            "Register", registration(instance_id="billing-1")
        )
        on_register = await next_payload(payloads)

        # As the prober records a status change: a plain UPDATE.
        [changed] = await sql(
            writer,
            "UPDATE registry.instances SET status = 'inactive'"
            " WHERE name = 'billing' AND instance_id = 'billing-1' RETURNING revision",
        )
        on_status = await next_payload(payloads)

        gone = await client.call(
            "Deregister",
            pb.DeregisterRequest(
                name="billing", instance_id="billing-1", token=registered.token
            ),
        )
        on_deregister = await next_payload(payloads)

    identity = {"name": "billing", "instance_id": "billing-1"}
    assert on_register == {
        "revision": registered.revision,
        "type": "registered",
        "status": "active",
        **identity,
    }
    assert on_status == {
        "revision": changed["revision"],
        "type": "status_changed",
        "status": "inactive",
        **identity,
    }
    # A deregistration carries the entry as it was.
    assert on_deregister == {
        "revision": gone.revision,
        "type": "deregistered",
        "status": "inactive",
        **identity,
    }
    assert [p["revision"] for p in (on_register, on_status, on_deregister)] == [
        1,
        2,
        3,
    ]


async def test_rolled_back_write_notifies_nothing_and_takes_no_revision(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None

    async with (
        trio_asyncio.open_loop(),
        connect(database_url) as writer,
        grpc_client(replica.port) as client,
    ):
        first = await client.call("Register", registration(instance_id="billing-1"))

        async with listening(database_url) as payloads:
            # The trigger runs and takes the next revision, inside the
            # transaction only.
            transaction = writer.transaction()
            await aio_as_trio(transaction.start)()
            [taken] = await sql(
                writer,
                "UPDATE registry.instances SET status = 'inactive'"
                " WHERE instance_id = 'billing-1' RETURNING revision",
            )
            inside = await sql(writer, "SELECT count(*) AS n FROM registry.events")
            await aio_as_trio(transaction.rollback)()

            second = await client.call(
                "Register", registration(instance_id="billing-2")
            )
            # Notifications arrive in commit order: had the rolled-back write
            # sent one, it would come first.
            payload = await next_payload(payloads)

        events = await sql(
            writer,
            "SELECT revision, type, instance_id, status FROM registry.events"
            " ORDER BY revision",
        )
        [head] = await sql(writer, "SELECT revision FROM registry.revision")
        listed = await client.call("List", pb.ListRequest(name="billing"))

    assert taken["revision"] == first.revision + 1
    assert inside[0]["n"] == 2
    assert second.revision == first.revision + 1
    assert payload == {
        "revision": second.revision,
        "type": "registered",
        "name": "billing",
        "instance_id": "billing-2",
        "status": "active",
    }
    assert [tuple(e) for e in events] == [
        (first.revision, "registered", "billing-1", "active"),
        (second.revision, "registered", "billing-2", "active"),
    ]
    assert head["revision"] == second.revision
    assert [i.status for i in listed.instances] == [pb.STATUS_ACTIVE] * 2
