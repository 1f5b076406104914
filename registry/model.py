"""Plain values of the registry's domain, free of I/O and of protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Status(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    INACTIVE = "inactive"
    DRAINING = "draining"


class BrokerType(enum.StrEnum):
    QUEUE = "queue"
    TOPIC = "topic"


class EventType(enum.StrEnum):
    REGISTERED = "registered"
    UPDATED = "updated"
    STATUS_CHANGED = "status_changed"
    DEREGISTERED = "deregistered"


class CheckKind(enum.StrEnum):
    HTTP = "http"
    GRPC = "grpc"
    TCP = "tcp"
    TTL = "ttl"
    KUBERNETES = "kubernetes"


@dataclass(frozen=True, slots=True)
class Api:
    name: str
    port: int


@dataclass(frozen=True, slots=True)
class Broker:
    exchange: str
    routing_key: str
    type: BrokerType
    queue: str = ""


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How the registry probes an instance. Unset timings are None."""

    kind: CheckKind
    # The HTTP path, and the gRPC health service name.
    path: str = ""
    service: str = ""
    # Name of the API whose port is probed (HTTP, GRPC, TCP).
    api: str = ""
    https: bool = False
    follow_redirects: bool = False
    # The pod whose readiness is read (KUBERNETES).
    namespace: str = ""
    pod: str = ""
    ttl_seconds: float | None = None
    interval_seconds: float | None = None
    timeout_seconds: float | None = None
    failure_threshold: int | None = None
    success_threshold: int | None = None
    # How long INACTIVE before deregistration; 0 keeps the instance forever.
    deregister_after_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Registration:
    """A validated Register request."""

    name: str
    instance_id: str
    address: str
    version: str = ""
    description: str = ""
    apis: tuple[Api, ...] = ()
    brokers: tuple[Broker, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    check: HealthCheck | None = None
    # Names whose registry events the instance wants on a queue of its own.
    follows: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Instance:
    """A stored entry."""

    name: str
    instance_id: str
    generation: int
    status: Status
    address: str
    version: str
    description: str
    apis: tuple[Api, ...]
    brokers: tuple[Broker, ...]
    metadata: dict[str, str]
    check: HealthCheck | None
    registered_at: datetime
    updated_at: datetime
    revision: int
    # Names whose registry events reach events_queue (set when follows is).
    follows: tuple[str, ...] = ()
    events_queue: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    revision: int
    type: EventType
    name: str
    instance_id: str
    instance: Instance
    time: datetime
