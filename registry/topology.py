"""What the registry declares and publishes on RabbitMQ, as plain values.

Queue names (each durable, shared by every instance of a service):

- a broker entry's queue is ``<service>/<exchange>/<routing key>``: service
  names and exchange names hold no '/', so two different entries never
  share a queue. A topic key's '*' is written '+' (aio-pika's codec refuses
  '*' in a queue name); the keys of one exchange are all topic keys or all
  direct keys, and topic keys hold no '+', so this never merges two keys;
- the events queue of a service that follows others is
  ``<service>/<events exchange>`` (``orders/registry.events``), bound with
  ``<name>.*`` for each name followed.

A name longer than AMQP's 255 bytes, or with characters a queue name may
not hold (a direct key may hold almost any), has each such character
written '_', is cut to fit, and ends in '@' and 16 hex digits of the
SHA-256 of the name it stands for: it stays unique.

Registry events are published to the events exchange with the routing key
``<service>.<event type>``, and a JSON body described in the README
("Event messages").
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .model import Broker, BrokerType, Event, Instance, Registration

__all__ = [
    "EVENT_SCHEMA",
    "Binding",
    "EventMessage",
    "ExchangeKind",
    "Topology",
    "broker_queue_name",
    "event_message",
    "events_queue_name",
    "plan",
]

MAX_QUEUE_NAME_BYTES = 255
_DIGEST_CHARS = 16
# Characters a queue name does not hold as they are: besides what AMQP's
# grammar allows, pamqp (aio-pika's codec) takes '@#,/+ ', of which '@'
# marks a digest here and ' ' would be a trap.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:#,/+-]")
EVENT_SCHEMA = "registry.event/1"


class ExchangeKind(enum.StrEnum):
    DIRECT = "direct"
    TOPIC = "topic"


_EXCHANGE_KINDS = {
    BrokerType.QUEUE: ExchangeKind.DIRECT,
    BrokerType.TOPIC: ExchangeKind.TOPIC,
}


@dataclass(frozen=True, slots=True)
class Binding:
    """One exchange, one durable queue and the binding between them."""

    exchange: str
    kind: ExchangeKind
    queue: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything one registration needs declared."""

    bindings: tuple[Binding, ...]
    # The registration's broker entries, each with its queue filled in.
    brokers: tuple[Broker, ...]
    # "" when the registration follows no names.
    events_queue: str

    @property
    def queues(self) -> list[str]:
        """RegisterResponse.queues: one per broker entry, then the events queue."""
        names = [broker.queue for broker in self.brokers]
        if self.events_queue:
            names.append(self.events_queue)
        return names


def _queue_name(readable: str) -> str:
    name = readable.replace("*", "+")
    safe = _UNSAFE.sub("_", name)
    if safe == name and len(name) <= MAX_QUEUE_NAME_BYTES:
        return name
    digest = hashlib.sha256(readable.encode()).hexdigest()[:_DIGEST_CHARS]
    return safe[: MAX_QUEUE_NAME_BYTES - _DIGEST_CHARS - 1] + "@" + digest


def broker_queue_name(service: str, broker: Broker) -> str:
    return _queue_name(f"{service}/{broker.exchange}/{broker.routing_key}")


def events_queue_name(service: str, events_exchange: str) -> str:
    return _queue_name(f"{service}/{events_exchange}")


def plan(registration: Registration, events_exchange: str) -> Topology:
    bindings: list[Binding] = []
    brokers: list[Broker] = []
    for broker in registration.brokers:
        queue = broker_queue_name(registration.name, broker)
        brokers.append(replace(broker, queue=queue))
        kind = _EXCHANGE_KINDS[broker.type]
        bindings.append(Binding(broker.exchange, kind, queue, broker.routing_key))
    events_queue = ""
    if registration.follows:
        events_queue = events_queue_name(registration.name, events_exchange)
        bindings.extend(
            Binding(events_exchange, ExchangeKind.TOPIC, events_queue, f"{name}.*")
            for name in registration.follows
        )
    return Topology(tuple(bindings), tuple(brokers), events_queue)


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One registry event, ready to publish."""

    routing_key: str
    # The revision: consumers drop a message whose id they have seen.
    message_id: str
    type: str
    timestamp: datetime
    body: bytes


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _instance_json(instance: Instance) -> dict[str, Any]:
    return {
        "name": instance.name,
        "instance_id": instance.instance_id,
        "generation": instance.generation,
        "status": instance.status.value,
        "address": instance.address,
        "version": instance.version,
        "description": instance.description,
        "apis": [{"name": api.name, "port": api.port} for api in instance.apis],
        "brokers": [
            {
                "exchange": broker.exchange,
                "routing_key": broker.routing_key,
                "type": broker.type.value,
                "queue": broker.queue,
            }
            for broker in instance.brokers
        ],
        "metadata": dict(instance.metadata),
        "follows": list(instance.follows),
        "events_queue": instance.events_queue,
        "registered_at": _time(instance.registered_at),
        "updated_at": _time(instance.updated_at),
        "revision": instance.revision,
    }


def event_message(event: Event) -> EventMessage:
    body = {
        "schema": EVENT_SCHEMA,
        "revision": event.revision,
        "type": event.type.value,
        "time": _time(event.time),
        "instance": _instance_json(event.instance),
    }
    return EventMessage(
        routing_key=f"{event.name}.{event.type.value}",
        message_id=str(event.revision),
        type=event.type.value,
        timestamp=event.time,
        body=json.dumps(body, separators=(",", ":"), sort_keys=True).encode(),
    )
