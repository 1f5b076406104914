"""The outbox: registry events to RabbitMQ, once each, in revision order,
from any number of replicas, across a cut connection; and the janitor that
must not compact what the outbox has not published."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import grpc
import pytest
import trio
import trio_asyncio

from brokers import Amqp, Subscription
from harness import (
    WAIT,
    GrpcClient,
    TcpProxy,
    grpc_client,
    logged,
    registration,
    replica_process,
    start_replica,
)
from registry import store
from registry.app import Replica
from registry.db import Database
from registry.model import Registration, Status

REGISTRATIONS = 500


async def message_ids_until(events: Subscription, last: int) -> list[int]:
    """The message ids received, in order, up to and including `last`."""
    ids: list[int] = []
    while last not in ids:
        ids.append(int((await events.receive()).message_id))
    return ids


async def behind_a_broker_proxy(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> tuple[Replica, TcpProxy, str]:
    """A replica whose broker connection goes through a TcpProxy, publishing
    to an events exchange of the test's own (also returned)."""
    exchange = amqp.name("registry.events")
    proxy = TcpProxy.to(amqp_url)
    await nursery.start(proxy.run)
    replica = await start_replica(
        nursery, database_url, amqp_url=proxy.url(amqp_url), events_exchange=exchange
    )
    return replica, proxy, exchange


async def register_all(clients: list[GrpcClient], requests: list[Any]) -> list[int]:
    """Every request, concurrently over the clients; their revisions."""
    revisions: list[int] = []
    # grpcio calls block a thread each: as many at once as trio lends threads.
    limit = trio.CapacityLimiter(32)

    async def register(index: int, request: Any) -> None:
        async with limit:
            response = await clients[index % len(clients)].call("Register", request)
        revisions.append(response.revision)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as calls:
            for index, request in enumerate(requests):
                calls.start_soon(register, index, request)
    return revisions


@pytest.mark.slow
async def test_two_replica_processes_publish_every_event_once_in_revision_order(
    database_url: str, amqp: Amqp, amqp_url: str
) -> None:
    exchange = amqp.name("registry.events")
    env = {
        "REGISTRY_AMQP_URL": amqp_url,
        "REGISTRY_EVENTS_EXCHANGE": exchange,
        # The suite shares one Postgres server: a few connections each.
        "REGISTRY_POOL_SIZE": "4",
    }
    # Each on an address of its own: the registrations do not take turns
    # choosing ports, and so race each other's revisions all the harder.
    requests = [
        registration(f"svc-{i % 25}", f"i-{i}", address=f"10.1.{i // 250}.{i % 250}")
        for i in range(REGISTRATIONS)
    ]

    async with AsyncExitStack() as stack:
        events = await stack.enter_async_context(amqp.subscribe(exchange))
        replicas = [
            await stack.enter_async_context(replica_process(database_url, **env))
            for _ in range(2)
        ]
        clients = [
            GrpcClient(f"127.0.0.1:{replica.port}")
            for replica in replicas
            for _ in "ab"
        ]
        stack.callback(lambda: [client.close() for client in clients])

        revisions = await register_all(clients, requests)
        assert sorted(revisions) == list(range(1, REGISTRATIONS + 1))
        ids = await message_ids_until(events, REGISTRATIONS)

        # One more event: whatever copy of an earlier one either replica
        # could still publish would come before it, in the queue's order.
        [last] = await register_all(clients, [registration("late", "late-1")])
        ids += await message_ids_until(events, last)

    assert ids == list(range(1, REGISTRATIONS + 2))


async def test_outbox_holds_events_while_the_broker_is_cut_and_delivers_them_after(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> None:
    replica, proxy, exchange = await behind_a_broker_proxy(
        nursery, database_url, amqp, amqp_url
    )
    samples = replica.metrics.registry.get_sample_value
    assert samples("registry_outbox_published_total") == 0

    async with (
        amqp.subscribe(exchange) as events,
        grpc_client(replica.port or 0) as client,
    ):
        before = await register_all(
            [client], [registration("billing", f"b-{i}") for i in range(10)]
        )
        ids = await message_ids_until(events, max(before))
        assert ids == sorted(before)

        with (
            logged("registry.broker", "lost the broker") as lost,
            logged("registry.outbox", "events wait in the outbox") as waiting,
        ):
            proxy.cut()
            with trio.fail_after(WAIT):
                await lost.wait()

            # What needs no broker goes on; what needs it is refused.
            during = await register_all(
                [client], [registration("orders", f"o-{i}") for i in range(15)]
            )
            with pytest.raises(grpc.RpcError) as refused:
                await client.call(
                    "Register", registration("orders", follows=["billing"])
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            with trio.fail_after(WAIT):
                await waiting.wait()

        # The backlog shows, in SQL and as a metric.
        async with Database.open(database_url, max_size=1) as db:
            backlog = await store.outbox_backlog(db)
        assert backlog >= len(during)
        gauge = samples("registry_outbox_backlog")
        assert gauge is not None and gauge > 0

        with logged("registry.outbox", "the outbox caught up") as caught_up:
            proxy.heal()
            ids += await message_ids_until(events, max(during))
            with trio.fail_after(WAIT):
                await caught_up.wait()

        # Every event was confirmed by the broker, and counted; a publish
        # whose confirm the cut swallowed may count again once confirmed.
        published = samples("registry_outbox_published_total")
        assert published is not None and published >= len(before + during)
        assert samples("registry_outbox_backlog") == 0

    # Every event arrives, in revision order. A message whose confirm the cut
    # swallowed may come twice (at least once); consumers drop the repeat.
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == sorted(before + during)
    replica.stop()


async def test_compaction_keeps_the_events_the_outbox_has_not_published(
    database_url: str,
) -> None:
    async with trio_asyncio.open_loop(), Database.open(database_url) as db:
        await db.apply_schema()
        for i in range(4):
            await store.put_instance(
                db, Registration("billing", f"b-{i}", "10.0.0.1"), Status.ACTIVE, b"h"
            )
        # A registry that never had a broker: nothing waits for the outbox,
        # all but the newest go.
        assert await store.compact_events(db, 0) == 3

        for i in range(4, 8):
            await store.put_instance(
                db, Registration("billing", f"b-{i}", "10.0.0.1"), Status.ACTIVE, b"h"
            )
        # Published up to 6, as a replica with a broker does.
        await db.fetchval(
            "UPDATE registry.outbox SET published = 6, published_at = now()"
        )

        # With a broker configured: up to what is published (4 to 6), not
        # beyond.
        assert await store.compact_events(db, 0, keep_unpublished=True) == 3
        assert await store.compact_events(db, 0, keep_unpublished=True) == 0
        assert await store.outbox_backlog(db) == 2
        # So too on a replica without one: another replica still publishes.
        assert await store.compact_events(db, 0) == 0
        # Until nothing has been published for a while: the broker is gone.
        await db.fetchval(
            "UPDATE registry.outbox SET published_at = now() - interval '2 days'"
        )
        assert await store.compact_events(db, 0, publisher_gone_after=86400) == 1


async def test_outbox_cut_in_the_middle_of_a_publish_loses_no_event(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> None:
    replica, proxy, exchange = await behind_a_broker_proxy(
        nursery, database_url, amqp, amqp_url
    )
    async with (
        amqp.subscribe(exchange) as events,
        grpc_client(replica.port or 0) as client,
    ):
        before = await register_all(
            [client], [registration("billing", f"b-{i}") for i in range(5)]
        )
        ids = await message_ids_until(events, max(before))

        # A silent partition while a batch goes out: the publishes leave the
        # registry, and neither they nor their confirms get through. Then the
        # connection drops with the batch unconfirmed.
        proxy.pause()
        burst = await register_all(
            [client], [registration("orders", f"o-{i}") for i in range(50)]
        )
        await proxy.wait_held()
        with logged("registry.outbox", "cannot publish events") as failed:
            proxy.cut()
            with trio.fail_after(WAIT):
                await failed.wait()
        assert replica.outbox is not None and replica.outbox.backlog >= 1

        proxy.resume()
        proxy.heal()
        ids += await message_ids_until(events, max(burst))

    # Not one event lost, every one in revision order; a repeat is allowed.
    assert list(dict.fromkeys(ids)) == sorted(before + burst)
    replica.stop()
