import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_PENDING: _ClassVar[Status]
    STATUS_ACTIVE: _ClassVar[Status]
    STATUS_INACTIVE: _ClassVar[Status]
    STATUS_DRAINING: _ClassVar[Status]

class BrokerType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BROKER_TYPE_UNSPECIFIED: _ClassVar[BrokerType]
    BROKER_TYPE_QUEUE: _ClassVar[BrokerType]
    BROKER_TYPE_TOPIC: _ClassVar[BrokerType]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_REGISTERED: _ClassVar[EventType]
    EVENT_TYPE_UPDATED: _ClassVar[EventType]
    EVENT_TYPE_STATUS_CHANGED: _ClassVar[EventType]
    EVENT_TYPE_DEREGISTERED: _ClassVar[EventType]
STATUS_UNSPECIFIED: Status
STATUS_PENDING: Status
STATUS_ACTIVE: Status
STATUS_INACTIVE: Status
STATUS_DRAINING: Status
BROKER_TYPE_UNSPECIFIED: BrokerType
BROKER_TYPE_QUEUE: BrokerType
BROKER_TYPE_TOPIC: BrokerType
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_REGISTERED: EventType
EVENT_TYPE_UPDATED: EventType
EVENT_TYPE_STATUS_CHANGED: EventType
EVENT_TYPE_DEREGISTERED: EventType

class Api(_message.Message):
    __slots__ = ("name", "port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Broker(_message.Message):
    __slots__ = ("exchange", "routing_key", "type", "queue")
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    exchange: str
    routing_key: str
    type: BrokerType
    queue: str
    def __init__(self, exchange: _Optional[str] = ..., routing_key: _Optional[str] = ..., type: _Optional[_Union[BrokerType, str]] = ..., queue: _Optional[str] = ...) -> None: ...

class HttpCheck(_message.Message):
    __slots__ = ("path", "api", "https", "follow_redirects")
    PATH_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    HTTPS_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_REDIRECTS_FIELD_NUMBER: _ClassVar[int]
    path: str
    api: str
    https: bool
    follow_redirects: bool
    def __init__(self, path: _Optional[str] = ..., api: _Optional[str] = ..., https: _Optional[bool] = ..., follow_redirects: _Optional[bool] = ...) -> None: ...

class GrpcCheck(_message.Message):
    __slots__ = ("api", "service")
    API_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    api: str
    service: str
    def __init__(self, api: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class TcpCheck(_message.Message):
    __slots__ = ("api",)
    API_FIELD_NUMBER: _ClassVar[int]
    api: str
    def __init__(self, api: _Optional[str] = ...) -> None: ...

class TtlCheck(_message.Message):
    __slots__ = ("ttl",)
    TTL_FIELD_NUMBER: _ClassVar[int]
    ttl: _duration_pb2.Duration
    def __init__(self, ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class KubernetesCheck(_message.Message):
    __slots__ = ("namespace", "pod")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod: str
    def __init__(self, namespace: _Optional[str] = ..., pod: _Optional[str] = ...) -> None: ...

class HealthCheck(_message.Message):
    __slots__ = ("http", "grpc", "tcp", "ttl", "kubernetes", "interval", "timeout", "failure_threshold", "success_threshold", "deregister_after")
    HTTP_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    TCP_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEREGISTER_AFTER_FIELD_NUMBER: _ClassVar[int]
    http: HttpCheck
    grpc: GrpcCheck
    tcp: TcpCheck
    ttl: TtlCheck
    kubernetes: KubernetesCheck
    interval: _duration_pb2.Duration
    timeout: _duration_pb2.Duration
    failure_threshold: int
    success_threshold: int
    deregister_after: _duration_pb2.Duration
    def __init__(self, http: _Optional[_Union[HttpCheck, _Mapping]] = ..., grpc: _Optional[_Union[GrpcCheck, _Mapping]] = ..., tcp: _Optional[_Union[TcpCheck, _Mapping]] = ..., ttl: _Optional[_Union[TtlCheck, _Mapping]] = ..., kubernetes: _Optional[_Union[KubernetesCheck, _Mapping]] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., failure_threshold: _Optional[int] = ..., success_threshold: _Optional[int] = ..., deregister_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("name", "instance_id", "version", "description", "status", "address", "apis", "brokers", "metadata", "check", "registered_at", "updated_at", "revision", "generation", "follows", "events_queue")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    APIS_FIELD_NUMBER: _ClassVar[int]
    BROKERS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_QUEUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance_id: str
    version: str
    description: str
    status: Status
    address: str
    apis: _containers.RepeatedCompositeFieldContainer[Api]
    brokers: _containers.RepeatedCompositeFieldContainer[Broker]
    metadata: _containers.ScalarMap[str, str]
    check: HealthCheck
    registered_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    revision: int
    generation: int
    follows: _containers.RepeatedScalarFieldContainer[str]
    events_queue: str
    def __init__(self, name: _Optional[str] = ..., instance_id: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., address: _Optional[str] = ..., apis: _Optional[_Iterable[_Union[Api, _Mapping]]] = ..., brokers: _Optional[_Iterable[_Union[Broker, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., check: _Optional[_Union[HealthCheck, _Mapping]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ..., generation: _Optional[int] = ..., follows: _Optional[_Iterable[str]] = ..., events_queue: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "instance_id", "version", "description", "address", "apis", "brokers", "metadata", "check", "follows")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    APIS_FIELD_NUMBER: _ClassVar[int]
    BROKERS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance_id: str
    version: str
    description: str
    address: str
    apis: _containers.RepeatedCompositeFieldContainer[Api]
    brokers: _containers.RepeatedCompositeFieldContainer[Broker]
    metadata: _containers.ScalarMap[str, str]
    check: HealthCheck
    follows: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., instance_id: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., address: _Optional[str] = ..., apis: _Optional[_Iterable[_Union[Api, _Mapping]]] = ..., brokers: _Optional[_Iterable[_Union[Broker, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., check: _Optional[_Union[HealthCheck, _Mapping]] = ..., follows: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("instance", "revision", "token", "queues")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    instance: Instance
    revision: int
    token: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance: _Optional[_Union[Instance, _Mapping]] = ..., revision: _Optional[int] = ..., token: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("name", "instance_id", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance_id: str
    token: str
    def __init__(self, name: _Optional[str] = ..., instance_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("name", "instance_id", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance_id: str
    token: str
    def __init__(self, name: _Optional[str] = ..., instance_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("status", "ttl")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    status: Status
    ttl: _duration_pb2.Duration
    def __init__(self, status: _Optional[_Union[Status, str]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("name", "instance_id", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance_id: str
    token: str
    def __init__(self, name: _Optional[str] = ..., instance_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("name", "instance_id", "limit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance_id: str
    limit: int
    def __init__(self, name: _Optional[str] = ..., instance_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ProbeResult(_message.Message):
    __slots__ = ("healthy", "code", "error", "latency")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    code: int
    error: str
    latency: _duration_pb2.Duration
    def __init__(self, healthy: _Optional[bool] = ..., code: _Optional[int] = ..., error: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("name", "instance_id", "from_status", "to_status", "time", "probe", "revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STATUS_FIELD_NUMBER: _ClassVar[int]
    TO_STATUS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance_id: str
    from_status: Status
    to_status: Status
    time: _timestamp_pb2.Timestamp
    probe: ProbeResult
    revision: int
    def __init__(self, name: _Optional[str] = ..., instance_id: _Optional[str] = ..., from_status: _Optional[_Union[Status, str]] = ..., to_status: _Optional[_Union[Status, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., probe: _Optional[_Union[ProbeResult, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("transitions",)
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    transitions: _containers.RepeatedCompositeFieldContainer[Transition]
    def __init__(self, transitions: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("name", "min_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    min_revision: int
    def __init__(self, name: _Optional[str] = ..., min_revision: _Optional[int] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("instances", "revision")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    revision: int
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("name", "status", "version", "min_revision", "revision_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    REVISION_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: Status
    version: str
    min_revision: int
    revision_only: bool
    def __init__(self, name: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., version: _Optional[str] = ..., min_revision: _Optional[int] = ..., revision_only: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("instances", "revision")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    revision: int
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("names", "from_revision", "snapshot")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    FROM_REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    from_revision: int
    snapshot: bool
    def __init__(self, names: _Optional[_Iterable[str]] = ..., from_revision: _Optional[int] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("revision", "type", "instance", "time")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    revision: int
    type: EventType
    instance: Instance
    time: _timestamp_pb2.Timestamp
    def __init__(self, revision: _Optional[int] = ..., type: _Optional[_Union[EventType, str]] = ..., instance: _Optional[_Union[Instance, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SnapshotEnd(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("snapshot", "snapshot_end", "event", "progress")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_END_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    snapshot: Instance
    snapshot_end: SnapshotEnd
    event: Event
    progress: Progress
    def __init__(self, snapshot: _Optional[_Union[Instance, _Mapping]] = ..., snapshot_end: _Optional[_Union[SnapshotEnd, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...
