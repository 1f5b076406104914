"""Tests of registry.validation: one rule at a time, on an otherwise valid request."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import duration_pb2

from registry import model
from registry.errors import InvalidArgument
from registry.v1 import registry_pb2 as pb
from registry.validation import (
    validate_instance_id,
    validate_min_revision,
    validate_name,
    validate_registration,
)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _request(**fields: Any) -> pb.RegisterRequest:
    """A valid request with two apis, with `fields` replacing the defaults."""
    defaults: dict[str, Any] = {
        "name": "orders",
        "instance_id": "orders-1",
        "address": "10.0.0.5",
        "apis": [pb.Api(name="grpc", port=50051), pb.Api(name="http", port=8080)],
    }
    return pb.RegisterRequest(**(defaults | fields))


def _check(**fields: Any) -> pb.RegisterRequest:
    return _request(check=pb.HealthCheck(**fields))


def _broker(routing_key: str = "orders.created", **fields: Any) -> pb.RegisterRequest:
    defaults: dict[str, Any] = {
        "exchange": "events",
        "routing_key": routing_key,
        "type": pb.BROKER_TYPE_TOPIC,
    }
    return _request(brokers=[pb.Broker(**(defaults | fields))])


def _register(request: pb.RegisterRequest) -> model.Registration:
    return validate_registration(request, new_instance_id=lambda: "generated-1")


def _assert_rejected(request: pb.RegisterRequest, field: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        _register(request)
    message = str(info.value)
    assert message.startswith(f"{field}: "), message
    return message


# The whole request


def test_register_converts_full_request() -> None:
    request = pb.RegisterRequest(
        name="orders",
        instance_id="orders-7f3a",
        version="1.4.2+build.9",
        description="Takes and tracks orders.",
        address="orders.internal.example.com",
        apis=[pb.Api(name="grpc", port=50051), pb.Api(name="metrics", port=0)],
        brokers=[
            pb.Broker(
                exchange="orders",
                routing_key="order.created",
                type=pb.BROKER_TYPE_QUEUE,
                queue="ignored-by-the-registry",
            ),
            pb.Broker(
                exchange="audit.v1",
                routing_key="orders.*.#",
                type=pb.BROKER_TYPE_TOPIC,
            ),
        ],
        metadata={"team": "checkout", "region/zone": "eu-1a"},
        check=pb.HealthCheck(
            http=pb.HttpCheck(path="/healthz", api="grpc", https=True),
            interval=_duration(10),
            timeout=_duration(0.5),
            failure_threshold=3,
            success_threshold=2,
        ),
    )

    registration = _register(request)

    assert registration == model.Registration(
        name="orders",
        instance_id="orders-7f3a",
        address="orders.internal.example.com",
        version="1.4.2+build.9",
        description="Takes and tracks orders.",
        apis=(model.Api("grpc", 50051), model.Api("metrics", 0)),
        brokers=(
            model.Broker("orders", "order.created", model.BrokerType.QUEUE, queue=""),
            model.Broker("audit.v1", "orders.*.#", model.BrokerType.TOPIC),
        ),
        metadata={"region/zone": "eu-1a", "team": "checkout"},
        check=model.HealthCheck(
            kind=model.CheckKind.HTTP,
            path="/healthz",
            api="grpc",
            https=True,
            interval_seconds=10.0,
            timeout_seconds=0.5,
            failure_threshold=3,
            success_threshold=2,
        ),
    )


def test_register_converts_minimal_request() -> None:
    request = pb.RegisterRequest(name="a", instance_id="a", address="::1")

    assert _register(request) == model.Registration(
        name="a", instance_id="a", address="::1"
    )


def test_register_assigns_instance_id_when_empty() -> None:
    calls: list[None] = []

    def new_instance_id() -> str:
        calls.append(None)
        return "generated-1"

    registration = validate_registration(
        _request(instance_id=""), new_instance_id=new_instance_id
    )

    assert registration.instance_id == "generated-1"
    assert len(calls) == 1


def test_register_keeps_given_instance_id() -> None:
    def new_instance_id() -> str:
        raise AssertionError("must not be called when instance_id is given")

    registration = validate_registration(
        _request(instance_id="orders-1"), new_instance_id=new_instance_id
    )

    assert registration.instance_id == "orders-1"


def test_register_assigns_no_instance_id_to_invalid_request() -> None:
    def new_instance_id() -> str:
        raise AssertionError("must not be called for an invalid request")

    with pytest.raises(InvalidArgument):
        validate_registration(
            _request(instance_id="", address=""), new_instance_id=new_instance_id
        )


# Names and ids, also used directly by Resolve, List and Watch


@pytest.mark.parametrize(
    "value", ["a", "orders", "orders-v2", "0", "9lives", "a" * 63, "a-b-c"]
)
def test_validate_name_accepts_dns_label(value: str) -> None:
    assert validate_name("name", value) == value


@pytest.mark.parametrize(
    "value",
    ["", "Orders", "-orders", "orders-", "or_ders", "or.ders", "a" * 64, "ordérs"],
)
def test_validate_name_rejects_non_dns_label(value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^names\[2\]: "):
        validate_name("names[2]", value)


def test_register_rejects_invalid_name() -> None:
    message = _assert_rejected(_request(name="Orders"), "name")
    assert "'Orders'" in message


@pytest.mark.parametrize(
    "value", ["a", "A", "9", "orders-1", "host.example:8080_x", "a" * 128]
)
def test_validate_instance_id_accepts_valid_id(value: str) -> None:
    assert validate_instance_id("instance_id", value) == value


@pytest.mark.parametrize("value", ["", "-a", ".a", "_a", "a b", "a/b", "a" * 129])
def test_validate_instance_id_rejects_invalid_id(value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^instance_id: "):
        validate_instance_id("instance_id", value)


def test_register_rejects_invalid_instance_id() -> None:
    _assert_rejected(_request(instance_id="not valid"), "instance_id")


@pytest.mark.parametrize("value", [0, 1, 2**62])
def test_validate_min_revision_accepts_non_negative(value: int) -> None:
    assert validate_min_revision("min_revision", value) == value


def test_validate_min_revision_rejects_negative() -> None:
    with pytest.raises(InvalidArgument, match=r"^min_revision: -1 is negative"):
        validate_min_revision("min_revision", -1)


# Scalar fields


@pytest.mark.parametrize(
    "value",
    [
        "10.0.0.5",
        "::1",
        "2001:db8::1",
        "fe80::1%eth0",
        "localhost",
        "Orders.Internal",
        "a-1.example.com",
        "1password.com",
        ".".join(["a" * 63] * 3) + "." + "b" * 61,
    ],
)
def test_register_accepts_address(value: str) -> None:
    assert _register(_request(address=value)).address == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "10.0.0.256",
        "10.0.0",
        "[::1]",
        "host_name",
        "-host.example.com",
        "host-.example.com",
        "example..com",
        "example.com.",
        "10.0.0.5:8080",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),
    ],
)
def test_register_rejects_address(value: str) -> None:
    _assert_rejected(_request(address=value), "address")


@pytest.mark.parametrize("value", ["", "1.2.3", "v2-rc.1+build.7", "x" * 64])
def test_register_accepts_version(value: str) -> None:
    assert _register(_request(version=value)).version == value


@pytest.mark.parametrize("value", ["1.2 beta", "1.2\t", "1.2\n", "vé", "x" * 65])
def test_register_rejects_version(value: str) -> None:
    _assert_rejected(_request(version=value), "version")


@pytest.mark.parametrize("value", ["", "Takes orders.\nSecond line.", "d" * 1024])
def test_register_accepts_description(value: str) -> None:
    assert _register(_request(description=value)).description == value


@pytest.mark.parametrize("value", ["d" * 1025, "nul\x00inside"])
def test_register_rejects_description(value: str) -> None:
    message = _assert_rejected(_request(description=value), "description")
    assert len(message) < 200, "the message must not repeat a huge value"


# APIs


def test_register_accepts_most_apis() -> None:
    apis = [pb.Api(name=f"api{i}", port=i) for i in range(32)]
    assert len(_register(_request(apis=apis)).apis) == 32


def test_register_rejects_too_many_apis() -> None:
    apis = [pb.Api(name=f"api{i}", port=i) for i in range(33)]
    message = _assert_rejected(_request(apis=apis), "apis")
    assert "33" in message


@pytest.mark.parametrize("value", ["", "GRPC", "-http", "http_2", "a" * 64])
def test_register_rejects_invalid_api_name(value: str) -> None:
    apis = [pb.Api(name="grpc", port=1), pb.Api(name=value, port=2)]
    _assert_rejected(_request(apis=apis), "apis[1].name")


def test_register_rejects_duplicate_api_name() -> None:
    apis = [
        pb.Api(name="grpc", port=1),
        pb.Api(name="http", port=2),
        pb.Api(name="grpc", port=3),
    ]
    message = _assert_rejected(_request(apis=apis), "apis[2].name")
    assert "apis[0]" in message


@pytest.mark.parametrize("port", [0, 1, 8080, 65535])
def test_register_accepts_port_or_zero_for_assignment(port: int) -> None:
    registration = _register(_request(apis=[pb.Api(name="grpc", port=port)]))
    assert registration.apis == (model.Api("grpc", port),)


@pytest.mark.parametrize("port", [65536, 70000, 2**32 - 1])
def test_register_rejects_port_out_of_range(port: int) -> None:
    apis = [pb.Api(name="grpc", port=1), pb.Api(name="http", port=port)]
    message = _assert_rejected(_request(apis=apis), "apis[1].port")
    assert message == (
        f"apis[1].port: {port} is out of range; use 1-65535, or 0 to have one assigned"
    )


# Brokers


def test_register_accepts_most_brokers() -> None:
    brokers = [
        pb.Broker(exchange="events", routing_key=f"k{i}", type=pb.BROKER_TYPE_QUEUE)
        for i in range(32)
    ]
    assert len(_register(_request(brokers=brokers)).brokers) == 32


def test_register_rejects_too_many_brokers() -> None:
    brokers = [
        pb.Broker(exchange="events", routing_key=f"k{i}", type=pb.BROKER_TYPE_QUEUE)
        for i in range(33)
    ]
    _assert_rejected(_request(brokers=brokers), "brokers")


@pytest.mark.parametrize(
    ("proto_type", "expected"),
    [
        (pb.BROKER_TYPE_QUEUE, model.BrokerType.QUEUE),
        (pb.BROKER_TYPE_TOPIC, model.BrokerType.TOPIC),
    ],
)
def test_register_converts_broker_type(
    proto_type: int, expected: model.BrokerType
) -> None:
    registration = _register(_broker("orders", type=proto_type))
    assert registration.brokers[0].type is expected


@pytest.mark.parametrize("proto_type", [pb.BROKER_TYPE_UNSPECIFIED, 7])
def test_register_rejects_unspecified_or_unknown_broker_type(proto_type: int) -> None:
    message = _assert_rejected(_broker(type=proto_type), "brokers[0].type")
    assert "BROKER_TYPE_QUEUE" in message


def test_register_ignores_broker_queue() -> None:
    registration = _register(_broker(queue="chosen-by-caller"))
    assert registration.brokers[0].queue == ""


@pytest.mark.parametrize(
    "value", ["events", "orders.v1", "my-app_events:v2", "AMQ.mine", "x" * 255]
)
def test_register_accepts_exchange(value: str) -> None:
    assert _register(_broker(exchange=value)).brokers[0].exchange == value


@pytest.mark.parametrize(
    "value", ["", "amq.topic", "amq.", "has space", "slash/name", "é", "x" * 256]
)
def test_register_rejects_exchange(value: str) -> None:
    _assert_rejected(_broker(exchange=value), "brokers[0].exchange")


@pytest.mark.parametrize("value", ["k", "order.created", "ключ", "k" * 255])
def test_register_accepts_queue_routing_key(value: str) -> None:
    registration = _register(_broker(value, type=pb.BROKER_TYPE_QUEUE))
    assert registration.brokers[0].routing_key == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "order.*",
        "order.#",
        "k" * 256,
        # 128 two-byte characters: 256 bytes on the wire.
        "й" * 128,
        "nul\x00",
    ],
)
def test_register_rejects_queue_routing_key(value: str) -> None:
    _assert_rejected(
        _broker(value, type=pb.BROKER_TYPE_QUEUE), "brokers[0].routing_key"
    )


@pytest.mark.parametrize(
    "value", ["orders", "orders.created", "*.created", "orders.#", "#", "a-b.c_d.*"]
)
def test_register_accepts_topic_routing_key(value: str) -> None:
    registration = _register(_broker(value, type=pb.BROKER_TYPE_TOPIC))
    assert registration.brokers[0].routing_key == value


@pytest.mark.parametrize(
    "value",
    ["", "orders.", ".orders", "orders..created", "order*", "a.b#", "a b", "a:b"],
)
def test_register_rejects_topic_routing_key(value: str) -> None:
    _assert_rejected(
        _broker(value, type=pb.BROKER_TYPE_TOPIC), "brokers[0].routing_key"
    )


# Metadata


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"team": ""},
        {"k" * 63: "v" * 1024},
        {"app.kubernetes.io/name": "orders", "A_b-c": "x"},
        {f"k{i}": "v" for i in range(64)},
    ],
)
def test_register_accepts_metadata(metadata: dict[str, str]) -> None:
    assert _register(_request(metadata=metadata)).metadata == metadata


def test_register_rejects_too_many_metadata_entries() -> None:
    metadata = {f"k{i}": "v" for i in range(65)}
    _assert_rejected(_request(metadata=metadata), "metadata")


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("", "metadata['']"),
        ("has space", "metadata['has space']"),
        ("colon:key", "metadata['colon:key']"),
        ("k" * 64, "metadata"),
    ],
)
def test_register_rejects_metadata_key(key: str, field: str) -> None:
    _assert_rejected(_request(metadata={key: "v"}), field)


@pytest.mark.parametrize("value", ["v" * 1025, "nul\x00"])
def test_register_rejects_metadata_value(value: str) -> None:
    _assert_rejected(_request(metadata={"team": value}), "metadata['team']")


# Health checks


def test_register_treats_missing_check_as_none() -> None:
    assert _register(_request()).check is None


def test_register_treats_empty_check_as_none() -> None:
    assert _register(_check()).check is None


def test_register_rejects_check_timings_without_kind() -> None:
    message = _assert_rejected(_check(interval=_duration(5)), "check")
    assert "interval" in message


def test_register_converts_grpc_check() -> None:
    request = _check(grpc=pb.GrpcCheck(api="grpc", service="orders.v1.Orders"))

    assert _register(request).check == model.HealthCheck(
        kind=model.CheckKind.GRPC, api="grpc", service="orders.v1.Orders"
    )


def test_register_converts_tcp_check() -> None:
    request = _check(tcp=pb.TcpCheck(api="http"))

    assert _register(request).check == model.HealthCheck(
        kind=model.CheckKind.TCP, api="http"
    )


def test_register_converts_ttl_check() -> None:
    request = _check(ttl=pb.TtlCheck(ttl=_duration(30)))

    assert _register(request).check == model.HealthCheck(
        kind=model.CheckKind.TTL, ttl_seconds=30.0
    )


@pytest.mark.parametrize("path", ["/", "/healthz", "/health?full=1", "/a/b%20c"])
def test_register_accepts_http_check_path(path: str) -> None:
    check = _register(_check(http=pb.HttpCheck(path=path))).check
    assert check is not None
    assert check.path == path


@pytest.mark.parametrize("path", ["", "healthz", "/health z", "/health\n", "/é"])
def test_register_rejects_http_check_path(path: str) -> None:
    _assert_rejected(_check(http=pb.HttpCheck(path=path)), "check.http.path")


def test_register_rejects_grpc_check_service_too_long() -> None:
    request = _check(grpc=pb.GrpcCheck(service="s" * 256))
    _assert_rejected(request, "check.grpc.service")


@pytest.mark.parametrize(
    ("kind", "message_type", "extra"),
    [
        ("http", pb.HttpCheck, {"path": "/"}),
        ("grpc", pb.GrpcCheck, {}),
        ("tcp", pb.TcpCheck, {}),
    ],
)
@pytest.mark.parametrize("api", ["", "grpc", "http"])
def test_register_accepts_check_api_of_instance(
    kind: str, message_type: Any, extra: dict[str, str], api: str
) -> None:
    check = _register(_check(**{kind: message_type(api=api, **extra)})).check
    assert check is not None
    assert check.api == api


@pytest.mark.parametrize(
    ("kind", "message_type", "extra"),
    [
        ("http", pb.HttpCheck, {"path": "/"}),
        ("grpc", pb.GrpcCheck, {}),
        ("tcp", pb.TcpCheck, {}),
    ],
)
def test_register_rejects_check_api_not_of_instance(
    kind: str, message_type: Any, extra: dict[str, str]
) -> None:
    request = _check(**{kind: message_type(api="metrics", **extra)})
    message = _assert_rejected(request, f"check.{kind}.api")
    assert "'grpc', 'http'" in message


def test_register_rejects_check_api_when_instance_has_no_apis() -> None:
    request = _request(apis=[], check=pb.HealthCheck(tcp=pb.TcpCheck(api="grpc")))
    _assert_rejected(request, "check.tcp.api")


@pytest.mark.parametrize("seconds", [1, 30, 3600])
def test_register_accepts_ttl(seconds: float) -> None:
    check = _register(_check(ttl=pb.TtlCheck(ttl=_duration(seconds)))).check
    assert check is not None
    assert check.ttl_seconds == seconds


@pytest.mark.parametrize("seconds", [0, 0.999, 3600.001, -5])
def test_register_rejects_ttl_out_of_range(seconds: float) -> None:
    request = _check(ttl=pb.TtlCheck(ttl=_duration(seconds)))
    _assert_rejected(request, "check.ttl.ttl")


def test_register_rejects_ttl_check_without_ttl() -> None:
    _assert_rejected(_check(ttl=pb.TtlCheck()), "check.ttl.ttl")


@pytest.mark.parametrize("seconds", [1, 15, 3600])
def test_register_accepts_interval(seconds: float) -> None:
    request = _check(tcp=pb.TcpCheck(), interval=_duration(seconds))
    check = _register(request).check
    assert check is not None
    assert check.interval_seconds == seconds
    assert check.timeout_seconds is None


@pytest.mark.parametrize("seconds", [0, 0.5, 3601, -1])
def test_register_rejects_interval_out_of_range(seconds: float) -> None:
    request = _check(tcp=pb.TcpCheck(), interval=_duration(seconds))
    _assert_rejected(request, "check.interval")


@pytest.mark.parametrize("seconds", [0.1, 2, 60])
def test_register_accepts_timeout(seconds: float) -> None:
    request = _check(tcp=pb.TcpCheck(), timeout=_duration(seconds))
    check = _register(request).check
    assert check is not None
    assert check.timeout_seconds == seconds
    assert check.interval_seconds is None


@pytest.mark.parametrize("seconds", [0, 0.099, 60.5])
def test_register_rejects_timeout_out_of_range(seconds: float) -> None:
    request = _check(tcp=pb.TcpCheck(), timeout=_duration(seconds))
    _assert_rejected(request, "check.timeout")


@pytest.mark.parametrize(("interval", "timeout"), [(5, 5), (5, 10), (1, 1)])
def test_register_rejects_timeout_not_shorter_than_interval(
    interval: float, timeout: float
) -> None:
    request = _check(
        tcp=pb.TcpCheck(), interval=_duration(interval), timeout=_duration(timeout)
    )
    message = _assert_rejected(request, "check.timeout")
    assert "check.interval" in message


@pytest.mark.parametrize("field", ["failure_threshold", "success_threshold"])
@pytest.mark.parametrize(("value", "expected"), [(0, None), (1, 1), (100, 100)])
def test_register_accepts_threshold_or_zero_for_default(
    field: str, value: int, expected: int | None
) -> None:
    check = _register(_check(tcp=pb.TcpCheck(), **{field: value})).check
    assert check is not None
    assert getattr(check, field) == expected


@pytest.mark.parametrize("field", ["failure_threshold", "success_threshold"])
@pytest.mark.parametrize("value", [101, 2**32 - 1])
def test_register_rejects_threshold_out_of_range(field: str, value: int) -> None:
    request = _check(tcp=pb.TcpCheck(), **{field: value})
    _assert_rejected(request, f"check.{field}")


def test_register_converts_kubernetes_check() -> None:
    check = pb.KubernetesCheck(namespace="shop", pod="orders-7d9f-x2k.v1")
    registration = _register(_check(kubernetes=check))
    assert registration.check == model.HealthCheck(
        kind=model.CheckKind.KUBERNETES, namespace="shop", pod="orders-7d9f-x2k.v1"
    )


@pytest.mark.parametrize(
    ("check", "field"),
    [
        (pb.KubernetesCheck(namespace="Shop", pod="p"), "check.kubernetes.namespace"),
        (pb.KubernetesCheck(namespace="shop", pod=""), "check.kubernetes.pod"),
        (pb.KubernetesCheck(namespace="shop", pod="Pod_1"), "check.kubernetes.pod"),
    ],
)
def test_register_rejects_invalid_kubernetes_check(
    check: pb.KubernetesCheck, field: str
) -> None:
    _assert_rejected(_check(kubernetes=check), field)


def test_register_keeps_http_redirect_choice() -> None:
    http = pb.HttpCheck(path="/healthz", follow_redirects=True)
    registration = _register(_check(http=http))
    assert registration.check is not None
    assert registration.check.follow_redirects


@pytest.mark.parametrize(
    ("given", "expected"), [(None, None), (0.0, 0.0), (600.0, 600.0)]
)
def test_register_reads_deregister_after(
    given: float | None, expected: float | None
) -> None:
    fields: dict[str, Any] = {"tcp": pb.TcpCheck(api="grpc")}
    if given is not None:
        fields["deregister_after"] = _duration(given)
    registration = _register(_check(**fields))
    assert registration.check is not None
    assert registration.check.deregister_after_seconds == expected


def test_register_rejects_deregister_after_out_of_range() -> None:
    request = _check(tcp=pb.TcpCheck(api="grpc"), deregister_after=_duration(0.5))
    _assert_rejected(request, "check.deregister_after")


def test_register_keeps_follows() -> None:
    registration = _register(_request(follows=["billing", "orders"]))
    assert registration.follows == ("billing", "orders")


@pytest.mark.parametrize(
    ("follows", "field"),
    [
        (["Billing"], "follows[0]"),
        (["billing", "billing"], "follows[1]"),
        ([f"n{i}" for i in range(65)], "follows"),
    ],
)
def test_register_rejects_invalid_follows(follows: list[str], field: str) -> None:
    _assert_rejected(_request(follows=follows), field)
