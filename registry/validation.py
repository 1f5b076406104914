"""Checks a Register request and turns it into a model.Registration.

Every check raises InvalidArgument at the first fault, naming the field by its
path in the request (``apis[2].port``, ``metadata['team']``). The whole
request is checked before anything is built, so a caller never sees part of a
registration. No I/O happens here.

Lengths are checked before characters, so a message never repeats a huge
value back to the caller.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping

from registry import model
from registry.errors import InvalidArgument
from registry.v1 import registry_pb2

__all__ = [
    "validate_instance_id",
    "validate_min_revision",
    "validate_name",
    "validate_registration",
    "validate_version",
]

# Service names and API names are DNS labels (RFC 1123).
MAX_NAME_LENGTH = 63
MAX_INSTANCE_ID_LENGTH = 128
MAX_HOST_NAME_LENGTH = 253
MAX_VERSION_LENGTH = 64
MAX_DESCRIPTION_LENGTH = 1024

MAX_APIS = 32
# Port 0 asks the registry to assign one.
MAX_PORT = 65535

MAX_BROKERS = 32
MAX_EXCHANGE_LENGTH = 255
RESERVED_EXCHANGE_PREFIX = "amq."
# AMQP sends routing keys as a short string: at most 255 bytes, not characters.
MAX_ROUTING_KEY_BYTES = 255

MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_LENGTH = 63
MAX_METADATA_VALUE_LENGTH = 1024

MAX_HTTP_PATH_LENGTH = 1024
MAX_GRPC_SERVICE_LENGTH = 255
MIN_INTERVAL_SECONDS = 1.0
MAX_INTERVAL_SECONDS = 3600.0
MIN_TIMEOUT_SECONDS = 0.1
MAX_TIMEOUT_SECONDS = 60.0
MIN_TTL_SECONDS = 1.0
MAX_TTL_SECONDS = 3600.0
MIN_DEREGISTER_AFTER_SECONDS = 1.0
MAX_DEREGISTER_AFTER_SECONDS = 30 * 24 * 3600.0
MAX_FOLLOWS = 64
MIN_THRESHOLD = 1
MAX_THRESHOLD = 100

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_VERSION = re.compile(r"[!-~]*")
_EXCHANGE = re.compile(r"[A-Za-z0-9_.:-]+")
_TOPIC_WORD = re.compile(r"\*|#|[A-Za-z0-9_-]+")
_METADATA_KEY = re.compile(r"[A-Za-z0-9._/-]+")
# Visible ASCII only: the path goes into an HTTP request line as it is.
_HTTP_PATH = re.compile(r"/[!-~]*")

_NAME_RULE = (
    f"use 1-{MAX_NAME_LENGTH} characters of a-z, 0-9 and '-', "
    "starting and ending with a letter or digit"
)
_CHECK_KINDS = "check.http, check.grpc, check.tcp, check.ttl or check.kubernetes"


def validate_name(field: str, value: str) -> str:
    """A DNS label (RFC 1123), as used for service names and API names."""
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"{field}: {len(value)} characters is too long; {_NAME_RULE}"
        )
    if not _DNS_LABEL.fullmatch(value):
        raise InvalidArgument(f"{field}: {value!r} is not a DNS label; {_NAME_RULE}")
    return value


def validate_instance_id(field: str, value: str) -> str:
    rule = (
        f"use 1-{MAX_INSTANCE_ID_LENGTH} characters of A-Z, a-z, 0-9, '.', '_', ':' "
        "and '-', starting with a letter or digit"
    )
    if len(value) > MAX_INSTANCE_ID_LENGTH:
        raise InvalidArgument(f"{field}: {len(value)} characters is too long; {rule}")
    if not _INSTANCE_ID.fullmatch(value):
        raise InvalidArgument(f"{field}: {value!r} is not a valid instance id; {rule}")
    return value


def validate_min_revision(field: str, value: int) -> int:
    if value < 0:
        raise InvalidArgument(
            f"{field}: {value!r} is negative; use 0 for any revision, "
            "or a revision the registry returned"
        )
    return value


def validate_registration(
    request: registry_pb2.RegisterRequest,
    *,
    new_instance_id: Callable[[], str],
) -> model.Registration:
    """Check every field of `request` and convert it.

    `new_instance_id` is called only when the request leaves instance_id empty
    and everything else is valid.
    """
    name = validate_name("name", request.name)
    instance_id = request.instance_id
    if instance_id:
        validate_instance_id("instance_id", instance_id)
    address = _validate_address("address", request.address)
    version = validate_version("version", request.version)
    description = _validate_description("description", request.description)
    apis = _validate_apis(request.apis)
    brokers = _validate_brokers(request.brokers)
    metadata = _validate_metadata(request.metadata)
    check = None
    if request.HasField("check"):
        check = _validate_check(request.check, apis)
    follows = _validate_follows(request.follows)

    # Only a request known to be good is given an id.
    if not instance_id:
        instance_id = new_instance_id()

    return model.Registration(
        name=name,
        instance_id=instance_id,
        address=address,
        version=version,
        description=description,
        apis=apis,
        brokers=brokers,
        metadata=metadata,
        check=check,
        follows=follows,
    )


def _validate_follows(given: Iterable[str]) -> tuple[str, ...]:
    names = list(given)
    if len(names) > MAX_FOLLOWS:
        raise InvalidArgument(
            f"follows: {len(names)} names is too many; "
            f"at most {MAX_FOLLOWS} are allowed"
        )
    seen: set[str] = set()
    for index, name in enumerate(names):
        validate_name(f"follows[{index}]", name)
        if name in seen:
            raise InvalidArgument(f"follows[{index}]: {name!r} is listed twice")
        seen.add(name)
    return tuple(names)


def _validate_address(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{field}: is empty; give a host name or an IP address")
    if len(value) > MAX_HOST_NAME_LENGTH:
        raise InvalidArgument(
            f"{field}: {len(value)} characters is too long for a host name; "
            f"at most {MAX_HOST_NAME_LENGTH} are allowed"
        )
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return value

    for label in value.split("."):
        if len(label) > MAX_NAME_LENGTH or not _HOST_LABEL.fullmatch(label):
            raise InvalidArgument(
                f"{field}: {value!r} is neither an IP address nor a host name; "
                f"label {label!r} must be 1-{MAX_NAME_LENGTH} letters, digits and '-', "
                "starting and ending with a letter or digit"
            )

    # RFC 1123 2.1: a host name never looks like a dotted number, so "10.0.0.256"
    # is a mistyped IP address, not a name to look up.
    if value.rsplit(".", 1)[-1].isdigit():
        raise InvalidArgument(
            f"{field}: {value!r} is neither an IP address nor a host name; "
            "a host name's last label may not be all digits"
        )
    return value


def validate_version(field: str, value: str) -> str:
    if len(value) > MAX_VERSION_LENGTH:
        raise InvalidArgument(
            f"{field}: {len(value)} characters is too long; "
            f"at most {MAX_VERSION_LENGTH} are allowed"
        )
    if not _VERSION.fullmatch(value):
        raise InvalidArgument(
            f"{field}: {value!r} is not allowed; use printable ASCII without whitespace"
        )
    return value


def _validate_description(field: str, value: str) -> str:
    if len(value) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument(
            f"{field}: {len(value)} characters is too long; "
            f"at most {MAX_DESCRIPTION_LENGTH} are allowed"
        )
    _reject_nul(field, value)
    return value


def _reject_nul(field: str, value: str) -> None:
    # Postgres text and jsonb cannot hold U+0000, though protobuf strings can.
    if "\x00" in value:
        raise InvalidArgument(
            f"{field}: {value!r} holds a NUL character, which cannot be stored; "
            "remove it"
        )


def _validate_apis(given: Iterable[registry_pb2.Api]) -> tuple[model.Api, ...]:
    apis = list(given)
    if len(apis) > MAX_APIS:
        raise InvalidArgument(
            f"apis: {len(apis)} given; at most {MAX_APIS} are allowed"
        )

    result: list[model.Api] = []
    index_by_name: dict[str, int] = {}
    for i, api in enumerate(apis):
        name = validate_name(f"apis[{i}].name", api.name)
        if name in index_by_name:
            first = index_by_name[name]
            raise InvalidArgument(
                f"apis[{i}].name: {name!r} is already used by apis[{first}]; "
                "api names must be unique within an instance"
            )
        index_by_name[name] = i
        port: int = api.port
        if port > MAX_PORT:
            raise InvalidArgument(
                f"apis[{i}].port: {port!r} is out of range; "
                f"use 1-{MAX_PORT}, or 0 to have one assigned"
            )
        result.append(model.Api(name=name, port=port))
    return tuple(result)


def _validate_brokers(
    given: Iterable[registry_pb2.Broker],
) -> tuple[model.Broker, ...]:
    brokers = list(given)
    if len(brokers) > MAX_BROKERS:
        raise InvalidArgument(
            f"brokers: {len(brokers)} given; at most {MAX_BROKERS} are allowed"
        )

    result: list[model.Broker] = []
    for i, broker in enumerate(brokers):
        exchange = _validate_exchange(f"brokers[{i}].exchange", broker.exchange)
        broker_type = _validate_broker_type(f"brokers[{i}].type", broker.type)
        routing_key = _validate_routing_key(
            f"brokers[{i}].routing_key", broker.routing_key, broker_type
        )
        # queue is output-only: the registry fills it in, whatever the caller sent.
        result.append(
            model.Broker(exchange=exchange, routing_key=routing_key, type=broker_type)
        )
    return tuple(result)


def _validate_broker_type(field: str, value: int) -> model.BrokerType:
    if value == registry_pb2.BROKER_TYPE_QUEUE:
        return model.BrokerType.QUEUE
    if value == registry_pb2.BROKER_TYPE_TOPIC:
        return model.BrokerType.TOPIC
    shown = "BROKER_TYPE_UNSPECIFIED" if value == 0 else value
    raise InvalidArgument(
        f"{field}: {shown!r} is not allowed; use BROKER_TYPE_QUEUE for a direct "
        "exchange or BROKER_TYPE_TOPIC for a topic exchange"
    )


def _validate_exchange(field: str, value: str) -> str:
    rule = (
        f"use 1-{MAX_EXCHANGE_LENGTH} characters of A-Z, a-z, 0-9, '-', '_', '.' "
        "and ':'"
    )
    if len(value) > MAX_EXCHANGE_LENGTH:
        raise InvalidArgument(f"{field}: {len(value)} characters is too long; {rule}")
    if not _EXCHANGE.fullmatch(value):
        raise InvalidArgument(f"{field}: {value!r} is not an exchange name; {rule}")
    if value.startswith(RESERVED_EXCHANGE_PREFIX):
        raise InvalidArgument(
            f"{field}: {value!r} starts with {RESERVED_EXCHANGE_PREFIX!r}, "
            "which RabbitMQ reserves; choose another name"
        )
    return value


def _validate_routing_key(field: str, value: str, broker_type: model.BrokerType) -> str:
    if not value:
        raise InvalidArgument(
            f"{field}: is empty; use 1-{MAX_ROUTING_KEY_BYTES} bytes of UTF-8"
        )
    size = len(value.encode())
    if size > MAX_ROUTING_KEY_BYTES:
        raise InvalidArgument(
            f"{field}: {size} bytes is too long; "
            f"at most {MAX_ROUTING_KEY_BYTES} bytes of UTF-8 are allowed"
        )
    _reject_nul(field, value)

    if broker_type is model.BrokerType.QUEUE:
        if "*" in value or "#" in value:
            raise InvalidArgument(
                f"{field}: {value!r} holds a wildcard; a BROKER_TYPE_QUEUE binding "
                "matches the key exactly, so '*' and '#' are not allowed "
                "(use BROKER_TYPE_TOPIC for patterns)"
            )
        return value

    for word in value.split("."):
        if not _TOPIC_WORD.fullmatch(word):
            raise InvalidArgument(
                f"{field}: word {word!r} of {value!r} is not allowed; a topic key is "
                "words separated by '.', each '*', '#', "
                "or letters, digits, '-' and '_'"
            )
    return value


def _validate_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(
            f"metadata: {len(metadata)} entries given; "
            f"at most {MAX_METADATA_ENTRIES} are allowed"
        )

    # Sorted, so that the same bad request always names the same entry.
    result: dict[str, str] = {}
    for key, value in sorted(metadata.items()):
        key_rule = (
            f"keys are 1-{MAX_METADATA_KEY_LENGTH} characters of A-Z, a-z, 0-9, "
            "'.', '_', '/' and '-'"
        )
        if len(key) > MAX_METADATA_KEY_LENGTH:
            raise InvalidArgument(
                f"metadata: the key starting {key[:20]!r} has {len(key)} characters; "
                f"{key_rule}"
            )
        if not _METADATA_KEY.fullmatch(key):
            raise InvalidArgument(
                f"metadata[{key!r}]: the key is not allowed; {key_rule}"
            )
        field = f"metadata[{key!r}]"
        if len(value) > MAX_METADATA_VALUE_LENGTH:
            raise InvalidArgument(
                f"{field}: {len(value)} characters is too long; "
                f"values are at most {MAX_METADATA_VALUE_LENGTH} characters"
            )
        _reject_nul(field, value)
        result[key] = value
    return result


def _validate_check(
    check: registry_pb2.HealthCheck, apis: tuple[model.Api, ...]
) -> model.HealthCheck | None:
    kind = check.WhichOneof("kind")
    if kind is None:
        # An empty message means "no check"; timings alone are a mistake.
        given = [descriptor.name for descriptor, _ in check.ListFields()]
        if given:
            raise InvalidArgument(
                f"check: {', '.join(given)} given without a kind; set one of "
                f"{_CHECK_KINDS}, or leave check empty for no health check"
            )
        return None

    # The fields of the chosen kind; the oneof's field names are CheckKind values.
    api_names = [api.name for api in apis]
    path = service = api = ""
    https = follow_redirects = False
    namespace = pod = ""
    ttl = None
    if kind == "http":
        path = _validate_http_path("check.http.path", check.http.path)
        api = _validate_check_api("check.http.api", check.http.api, api_names)
        https = bool(check.http.https)
        follow_redirects = bool(check.http.follow_redirects)
    elif kind == "grpc":
        api = _validate_check_api("check.grpc.api", check.grpc.api, api_names)
        service = _validate_grpc_service("check.grpc.service", check.grpc.service)
    elif kind == "tcp":
        api = _validate_check_api("check.tcp.api", check.tcp.api, api_names)
    elif kind == "kubernetes":
        namespace = validate_name(
            "check.kubernetes.namespace", check.kubernetes.namespace
        )
        pod = _validate_pod_name("check.kubernetes.pod", check.kubernetes.pod)
    else:
        ttl = _optional_seconds(
            "check.ttl.ttl", check.ttl, "ttl", MIN_TTL_SECONDS, MAX_TTL_SECONDS
        )
        if ttl is None:
            raise InvalidArgument(
                "check.ttl.ttl: is unset; a ttl check needs how often the "
                f"service will call Heartbeat, {MIN_TTL_SECONDS:g}s to "
                f"{MAX_TTL_SECONDS:g}s"
            )

    # The timings, common to every kind.
    interval = _optional_seconds(
        "check.interval", check, "interval", MIN_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS
    )
    timeout = _optional_seconds(
        "check.timeout", check, "timeout", MIN_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS
    )
    if interval is not None and timeout is not None and timeout >= interval:
        raise InvalidArgument(
            f"check.timeout: {timeout!r}s is not shorter than check.interval "
            f"{interval!r}s; a probe must end before the next one starts"
        )
    failure_threshold = _optional_threshold(
        "check.failure_threshold", check.failure_threshold
    )
    success_threshold = _optional_threshold(
        "check.success_threshold", check.success_threshold
    )
    deregister_after = None
    if check.HasField("deregister_after") and check.deregister_after.ToNanoseconds():
        deregister_after = _optional_seconds(
            "check.deregister_after",
            check,
            "deregister_after",
            MIN_DEREGISTER_AFTER_SECONDS,
            MAX_DEREGISTER_AFTER_SECONDS,
        )
    elif check.HasField("deregister_after"):
        # Set to zero: keep the instance however long it stays inactive.
        deregister_after = 0.0

    return model.HealthCheck(
        kind=model.CheckKind(kind),
        path=path,
        service=service,
        api=api,
        https=https,
        follow_redirects=follow_redirects,
        namespace=namespace,
        pod=pod,
        ttl_seconds=ttl,
        interval_seconds=interval,
        timeout_seconds=timeout,
        failure_threshold=failure_threshold,
        success_threshold=success_threshold,
        deregister_after_seconds=deregister_after,
    )


def _validate_pod_name(field: str, value: str) -> str:
    """A DNS subdomain (RFC 1123), as Kubernetes names pods."""
    if not 0 < len(value) <= MAX_HOST_NAME_LENGTH:
        raise InvalidArgument(
            f"{field}: {len(value)} characters; a pod name has 1-{MAX_HOST_NAME_LENGTH}"
        )
    if not all(_DNS_LABEL.fullmatch(label) for label in value.split(".")):
        raise InvalidArgument(
            f"{field}: {value!r} is not a pod name; use lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit"
        )
    return value


def _optional_seconds(
    field: str,
    message: registry_pb2.HealthCheck | registry_pb2.TtlCheck,
    name: str,
    low: float,
    high: float,
) -> float | None:
    """The Duration `name` of `message` in seconds, or None when unset."""
    if not message.HasField(name):
        return None
    duration = getattr(message, name)
    seconds: float = duration.seconds + duration.nanos / 1e9
    if not low <= seconds <= high:
        raise InvalidArgument(
            f"{field}: {seconds!r}s is out of range; use {low:g}s to {high:g}s"
        )
    return seconds


def _optional_threshold(field: str, value: int) -> int | None:
    # proto3 cannot tell 0 from unset, so 0 takes the registry's default.
    if value == 0:
        return None
    if not MIN_THRESHOLD <= value <= MAX_THRESHOLD:
        raise InvalidArgument(
            f"{field}: {value!r} is out of range; use {MIN_THRESHOLD}-{MAX_THRESHOLD}, "
            "or 0 for the default"
        )
    return value


def _validate_check_api(field: str, value: str, api_names: list[str]) -> str:
    # Empty leaves the choice of port to the prober.
    if not value or value in api_names:
        return value
    if not api_names:
        raise InvalidArgument(
            f"{field}: {value!r} names no api of this instance, which has none; "
            "add it to apis or leave the field empty"
        )
    choices = ", ".join(repr(name) for name in api_names)
    raise InvalidArgument(
        f"{field}: {value!r} names no api of this instance; use one of {choices}"
    )


def _validate_http_path(field: str, value: str) -> str:
    rule = (
        f"use a path of at most {MAX_HTTP_PATH_LENGTH} characters starting with '/', "
        "in printable ASCII without whitespace"
    )
    if len(value) > MAX_HTTP_PATH_LENGTH:
        raise InvalidArgument(f"{field}: {len(value)} characters is too long; {rule}")
    if not _HTTP_PATH.fullmatch(value):
        raise InvalidArgument(f"{field}: {value!r} is not allowed; {rule}")
    return value


def _validate_grpc_service(field: str, value: str) -> str:
    if len(value) > MAX_GRPC_SERVICE_LENGTH:
        raise InvalidArgument(
            f"{field}: {len(value)} characters is too long; "
            f"at most {MAX_GRPC_SERVICE_LENGTH} are allowed"
        )
    _reject_nul(field, value)
    return value
