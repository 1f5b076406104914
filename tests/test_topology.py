"""What the registry declares and publishes on RabbitMQ, as plain values:
queue names, the bindings of a registration, and the event message."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from registry.model import (
    Api,
    Broker,
    BrokerType,
    Event,
    EventType,
    Instance,
    Registration,
    Status,
)
from registry.topology import (
    EVENT_SCHEMA,
    MAX_QUEUE_NAME_BYTES,
    Binding,
    ExchangeKind,
    broker_queue_name,
    event_message,
    plan,
)

ORDERS = Broker("orders", "orders.created", BrokerType.QUEUE)
PAYMENTS = Broker("payments", "payments.*.settled.#", BrokerType.TOPIC)


def test_plan_declares_one_durable_queue_per_broker_entry_and_an_events_queue() -> None:
    registration = Registration(
        name="billing",
        instance_id="b-1",
        address="127.0.0.1",
        brokers=(ORDERS, PAYMENTS),
        follows=("orders", "payments"),
    )

    topology = plan(registration, "registry.events")

    assert topology.bindings == (
        Binding(
            "orders",
            ExchangeKind.DIRECT,
            "billing/orders/orders.created",
            "orders.created",
        ),
        Binding(
            "payments",
            ExchangeKind.TOPIC,
            "billing/payments/payments.+.settled.#",
            "payments.*.settled.#",
        ),
        Binding(
            "registry.events", ExchangeKind.TOPIC, "billing/registry.events", "orders.*"
        ),
        Binding(
            "registry.events",
            ExchangeKind.TOPIC,
            "billing/registry.events",
            "payments.*",
        ),
    )
    assert [b.queue for b in topology.brokers] == [
        "billing/orders/orders.created",
        "billing/payments/payments.+.settled.#",
    ]
    assert topology.events_queue == "billing/registry.events"
    assert topology.queues == [
        "billing/orders/orders.created",
        "billing/payments/payments.+.settled.#",
        "billing/registry.events",
    ]


def test_plan_without_brokers_or_follows_declares_nothing() -> None:
    topology = plan(Registration("billing", "b-1", "127.0.0.1"), "registry.events")
    assert (topology.bindings, topology.queues, topology.events_queue) == ((), [], "")


def test_queue_names_of_different_bindings_never_collide() -> None:
    # The same words split differently between exchange and key.
    first = broker_queue_name("a", Broker("b.c", "d", BrokerType.QUEUE))
    second = broker_queue_name("a", Broker("b", "c.d", BrokerType.QUEUE))
    assert first != second


def test_queue_name_over_the_amqp_limit_is_cut_and_stays_unique() -> None:
    exchange = "x" * 255
    first = broker_queue_name(
        "billing", Broker(exchange, "k" * 9 + "a", BrokerType.QUEUE)
    )
    second = broker_queue_name(
        "billing", Broker(exchange, "k" * 9 + "b", BrokerType.QUEUE)
    )

    assert first != second
    for name in (first, second):
        assert len(name) == MAX_QUEUE_NAME_BYTES
        assert name.startswith("billing/xxx")
        assert re.fullmatch(r"@[0-9a-f]{16}", name[-17:])


def test_queue_name_of_a_key_with_characters_a_queue_cannot_hold_stays_unique() -> None:
    names = {
        broker_queue_name("billing", Broker("orders", key, BrokerType.QUEUE))
        for key in ("é!", "é?", "a b", "a_b")
    }
    assert len(names) == 4
    assert "billing/orders/a_b" in names
    for name in names - {"billing/orders/a_b"}:
        assert re.fullmatch(r"billing/orders/[a-z_]+@[0-9a-f]{16}", name), name


def test_topic_queue_name_writes_the_star_wildcard_as_plus() -> None:
    topic = Broker("payments", "payments.*.settled.#", BrokerType.TOPIC)
    assert (
        broker_queue_name("billing", topic) == "billing/payments/payments.+.settled.#"
    )


def test_event_message_follows_the_documented_schema() -> None:
    stamp = datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    instance = Instance(
        name="billing",
        instance_id="b-1",
        generation=3,
        status=Status.ACTIVE,
        address="127.0.0.1",
        version="1.4.2",
        description="bills",
        apis=(Api("grpc", 20001),),
        brokers=(
            Broker(
                "orders",
                "orders.created",
                BrokerType.QUEUE,
                "billing/orders/orders.created",
            ),
        ),
        metadata={"team": "money"},
        check=None,
        registered_at=stamp,
        updated_at=stamp,
        revision=42,
        follows=("orders",),
        events_queue="billing/registry.events",
    )

    message = event_message(
        Event(42, EventType.STATUS_CHANGED, "billing", "b-1", instance, stamp)
    )

    assert message.routing_key == "billing.status_changed"
    assert message.message_id == "42"
    assert message.type == "status_changed"
    assert message.timestamp == stamp
    assert json.loads(message.body) == {
        "schema": EVENT_SCHEMA,
        "revision": 42,
        "type": "status_changed",
        "time": "2025-01-02T03:04:05.600000Z",
        "instance": {
            "name": "billing",
            "instance_id": "b-1",
            "generation": 3,
            "status": "active",
            "address": "127.0.0.1",
            "version": "1.4.2",
            "description": "bills",
            "apis": [{"name": "grpc", "port": 20001}],
            "brokers": [
                {
                    "exchange": "orders",
                    "routing_key": "orders.created",
                    "type": "queue",
                    "queue": "billing/orders/orders.created",
                }
            ],
            "metadata": {"team": "money"},
            "follows": ["orders"],
            "events_queue": "billing/registry.events",
            "registered_at": "2025-01-02T03:04:05.600000Z",
            "updated_at": "2025-01-02T03:04:05.600000Z",
            "revision": 42,
        },
    }
