"""Domain values to protobuf messages, for the API edge."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from .model import (
    BrokerType,
    CheckKind,
    Event,
    EventType,
    HealthCheck,
    Instance,
    Status,
)
from .v1 import registry_pb2 as pb

STATUS_TO_PB = {
    Status.PENDING: pb.STATUS_PENDING,
    Status.ACTIVE: pb.STATUS_ACTIVE,
    Status.INACTIVE: pb.STATUS_INACTIVE,
    Status.DRAINING: pb.STATUS_DRAINING,
}
STATUS_FROM_PB = {value: key for key, value in STATUS_TO_PB.items()}

_BROKER_TYPE_TO_PB = {
    BrokerType.QUEUE: pb.BROKER_TYPE_QUEUE,
    BrokerType.TOPIC: pb.BROKER_TYPE_TOPIC,
}

_EVENT_TYPE_TO_PB = {
    EventType.REGISTERED: pb.EVENT_TYPE_REGISTERED,
    EventType.UPDATED: pb.EVENT_TYPE_UPDATED,
    EventType.STATUS_CHANGED: pb.EVENT_TYPE_STATUS_CHANGED,
    EventType.DEREGISTERED: pb.EVENT_TYPE_DEREGISTERED,
}


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _duration(seconds: float | None) -> Duration | None:
    if seconds is None:
        return None
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def check_to_pb(check: HealthCheck) -> pb.HealthCheck:
    message = pb.HealthCheck(
        interval=_duration(check.interval_seconds),
        timeout=_duration(check.timeout_seconds),
        failure_threshold=check.failure_threshold or 0,
        success_threshold=check.success_threshold or 0,
        deregister_after=_duration(check.deregister_after_seconds),
    )
    if check.kind is CheckKind.HTTP:
        message.http.CopyFrom(
            pb.HttpCheck(
                path=check.path,
                api=check.api,
                https=check.https,
                follow_redirects=check.follow_redirects,
            )
        )
    elif check.kind is CheckKind.GRPC:
        message.grpc.CopyFrom(pb.GrpcCheck(api=check.api, service=check.service))
    elif check.kind is CheckKind.TCP:
        message.tcp.CopyFrom(pb.TcpCheck(api=check.api))
    elif check.kind is CheckKind.KUBERNETES:
        message.kubernetes.CopyFrom(
            pb.KubernetesCheck(namespace=check.namespace, pod=check.pod)
        )
    else:
        message.ttl.CopyFrom(pb.TtlCheck(ttl=_duration(check.ttl_seconds)))
    return message


def instance_to_pb(instance: Instance) -> pb.Instance:
    return pb.Instance(
        name=instance.name,
        instance_id=instance.instance_id,
        version=instance.version,
        description=instance.description,
        status=STATUS_TO_PB[instance.status],
        address=instance.address,
        apis=[pb.Api(name=api.name, port=api.port) for api in instance.apis],
        brokers=[
            pb.Broker(
                exchange=broker.exchange,
                routing_key=broker.routing_key,
                type=_BROKER_TYPE_TO_PB[broker.type],
                queue=broker.queue,
            )
            for broker in instance.brokers
        ],
        metadata=instance.metadata,
        check=None if instance.check is None else check_to_pb(instance.check),
        registered_at=_timestamp(instance.registered_at),
        updated_at=_timestamp(instance.updated_at),
        revision=instance.revision,
        generation=instance.generation,
        follows=instance.follows,
        events_queue=instance.events_queue,
    )


def event_to_pb(event: Event) -> pb.Event:
    return pb.Event(
        revision=event.revision,
        type=_EVENT_TYPE_TO_PB[event.type],
        instance=instance_to_pb(event.instance),
        time=_timestamp(event.time),
    )
