"""RabbitMQ topology through Register: what the registry declares, checked on
the broker itself (tests/brokers.py), and how Register fails when it cannot.

Tests that take the `amqp` fixture need the test broker and skip without it
(fail with REGISTRY_REQUIRE_BROKER=1); the others cut the broker off through
a proxy, or configure none.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
import pytest
import trio

from brokers import Amqp
from harness import GrpcClient, TcpProxy, grpc_client, registration, start_replica
from registry.app import Replica
from registry.v1 import registry_pb2 as pb


def broker(exchange: str, routing_key: str, kind: Any) -> pb.Broker:
    return pb.Broker(exchange=exchange, routing_key=routing_key, type=kind)


async def start_with_broker(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> Replica:
    return await start_replica(
        nursery,
        database_url,
        amqp_url=amqp_url,
        events_exchange=amqp.name("registry.events"),
    )


async def refused(client: GrpcClient, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        await client.call("Register", request)
    return failed.value


async def nothing_stored(client: GrpcClient) -> None:
    listed = await client.call("List", pb.ListRequest())
    assert (list(listed.instances), listed.revision) == ([], 0)


async def test_register_declares_exchanges_queues_and_bindings_on_the_broker(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> None:
    orders, payments = amqp.name("orders"), amqp.name("payments")
    replica = await start_with_broker(nursery, database_url, amqp, amqp_url)
    request = registration(
        "billing",
        "b-1",
        brokers=[
            broker(orders, "orders.created", pb.BROKER_TYPE_QUEUE),
            broker(payments, "payments.*.settled.#", pb.BROKER_TYPE_TOPIC),
        ],
    )

    async with grpc_client(replica.port or 0) as client:
        registered = await client.call("Register", request)
        amqp.track(*registered.queues)
        listed = await client.call("List", pb.ListRequest(name="billing"))

    direct_queue = f"billing/{orders}/orders.created"
    topic_queue = f"billing/{payments}/payments.+.settled.#"
    assert list(registered.queues) == [direct_queue, topic_queue]
    assert [b.queue for b in registered.instance.brokers] == [direct_queue, topic_queue]
    assert list(listed.instances) == [registered.instance]

    # The broker has them: exchanges of the asked types, durable empty queues.
    assert await amqp.exchange_is(orders, "direct")
    assert await amqp.exchange_is(payments, "topic")
    assert await amqp.queue_messages(direct_queue) == 0
    assert await amqp.queue_messages(topic_queue) == 0

    # And the bindings route: a message published to each exchange reaches
    # the queue Register returned for it.
    await amqp.publish(orders, "orders.created", b"order 1")
    await amqp.publish(payments, "payments.eu.settled.card.visa", b"payment 1")
    async with amqp.consume(direct_queue) as direct:
        assert (await direct.receive()).body == b"order 1"
    async with amqp.consume(topic_queue) as topic:
        assert (await topic.receive()).body == b"payment 1"
    replica.stop()


async def test_register_again_declares_nothing_new_and_queues_outlive_deregistration(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> None:
    orders = amqp.name("orders")
    replica = await start_with_broker(nursery, database_url, amqp, amqp_url)
    request = registration(
        "billing",
        "b-1",
        brokers=[broker(orders, "orders.created", pb.BROKER_TYPE_QUEUE)],
    )
    async with grpc_client(replica.port or 0) as client:
        first = await client.call("Register", request)
        amqp.track(*first.queues)
        await amqp.publish(orders, "orders.created", b"while it restarts")
        again = await client.call("Register", request)
        assert list(again.queues) == list(first.queues)
        # Declaring again kept the queue and what waits in it.
        assert await amqp.queue_messages(first.queues[0]) == 1

        await client.call(
            "Deregister",
            pb.DeregisterRequest(name="billing", instance_id="b-1", token=again.token),
        )
    assert await amqp.queue_messages(first.queues[0]) == 1
    replica.stop()


async def test_register_on_an_exchange_of_another_type_fails_and_breaks_nothing(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> None:
    orders, invoices = amqp.name("orders"), amqp.name("invoices")
    await amqp.declare_exchange(orders, "topic")
    replica = await start_with_broker(nursery, database_url, amqp, amqp_url)
    clashing = registration(
        "billing",
        "b-1",
        brokers=[broker(orders, "orders.created", pb.BROKER_TYPE_QUEUE)],
    )

    async with grpc_client(replica.port or 0) as client:
        error = await refused(client, clashing)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"the broker refused exchange {orders!r} (direct exchange)" in (
            error.details()
        )
        assert "received 'direct' but current is 'topic'" in error.details()
        await nothing_stored(client)

        # The refusal closed only its own channel: the next Register declares.
        fine = registration(
            "billing",
            "b-1",
            brokers=[broker(invoices, "invoices.paid", pb.BROKER_TYPE_QUEUE)],
        )
        registered = await client.call("Register", fine)
        amqp.track(*registered.queues)
    assert await amqp.queue_messages(registered.queues[0]) == 0
    # The existing exchange was left as it was.
    assert await amqp.exchange_is(orders, "topic")
    replica.stop()


async def test_follows_gets_an_events_queue_with_the_followed_names_events(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> None:
    replica = await start_with_broker(nursery, database_url, amqp, amqp_url)
    events_exchange = replica.config.events_exchange
    async with grpc_client(replica.port or 0) as client:
        follower = await client.call(
            "Register", registration("orders", "o-1", follows=["billing"])
        )
        amqp.track(*follower.queues)
        events_queue = f"orders/{events_exchange}"
        assert list(follower.queues) == [events_queue]
        assert follower.instance.events_queue == events_queue
        assert list(follower.instance.follows) == ["billing"]

        async with amqp.consume(events_queue) as events:
            # Not followed: never reaches the queue.
            await client.call("Register", registration("payments", "p-1"))
            billing = await client.call("Register", registration("billing", "b-1"))
            gone = await client.call(
                "Deregister",
                pb.DeregisterRequest(
                    name="billing", instance_id="b-1", token=billing.token
                ),
            )
            # Events are published in revision order: the payments event
            # would have come first.
            first, second = await events.receive(), await events.receive()

    assert (first.routing_key, first.message_id) == (
        "billing.registered",
        str(billing.revision),
    )
    assert (second.routing_key, second.message_id) == (
        "billing.deregistered",
        str(gone.revision),
    )
    assert first.content_type == "application/json"
    assert first.delivery_mode == 2  # persistent
    body = json.loads(first.body)
    assert (body["schema"], body["revision"], body["type"]) == (
        "registry.event/1",
        billing.revision,
        "registered",
    )
    assert body["instance"]["instance_id"] == "b-1"
    assert body["instance"]["apis"] == [
        {"name": "grpc", "port": billing.instance.apis[0].port}
    ]
    replica.stop()


async def test_register_needing_an_unreachable_broker_is_unavailable_and_stores_nothing(
    nursery: trio.Nursery, database_url: str
) -> None:
    # A proxy cut from the start: no broker answers through it.
    proxy = TcpProxy("127.0.0.1", 1)
    proxy.cut()
    await nursery.start(proxy.run)
    replica = await start_replica(
        nursery, database_url, amqp_url=proxy.url("amqp://guest:guest@localhost/")
    )
    async with grpc_client(replica.port or 0) as client:
        for request in (
            registration(
                "billing", brokers=[broker("orders", "o", pb.BROKER_TYPE_QUEUE)]
            ),
            registration("billing", follows=["orders"]),
        ):
            error = await refused(client, request)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "is unreachable; retry shortly" in error.details()
        await nothing_stored(client)

        # What needs no broker goes on.
        registered = await client.call("Register", registration("billing", "b-1"))
        assert registered.revision == 1
    replica.stop()


async def test_register_without_a_broker_configured_says_broker_features_are_off(
    nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.app")
    replica = await start_replica(nursery, database_url)
    said = [
        r.getMessage()
        for r in caplog.records
        if "no broker configured" in r.getMessage()
    ]
    assert len(said) == 1
    assert "broker features are off" in said[0]

    async with grpc_client(replica.port or 0) as client:
        for request, field in (
            (
                registration(brokers=[broker("orders", "o", pb.BROKER_TYPE_QUEUE)]),
                "brokers",
            ),
            (registration(follows=["orders"]), "follows"),
        ):
            error = await refused(client, request)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error.details().startswith(
                f"{field}: this registry runs without a broker "
                "(REGISTRY_AMQP_URL is unset)"
            )
        await nothing_stored(client)
        registered = await client.call("Register", registration("billing", "b-1"))
        assert list(registered.queues) == []
    replica.stop()
