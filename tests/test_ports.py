"""Port assignment: the choice as plain logic (registry.ports), the check of
this host's bound ports (registry.hostports), and the whole of it through
Register, Resolve and Watch on real replicas sharing one Postgres."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import trio

from harness import (
    WAIT,
    GrpcClient,
    grpc_client,
    registration,
    start_replica,
    watch_stream,
)
from registry.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from registry.hostports import free_port_check
from registry.model import Api
from registry.ports import (
    Holder,
    PortMode,
    PortPolicy,
    PortRange,
    address_key,
    assign,
    parse_remote_ports,
)
from registry.v1 import registry_pb2 as pb

LOCAL = PortPolicy(PortMode.LOCAL, PortRange(20000, 20009))
REMOTE = PortPolicy(
    PortMode.REMOTE, PortRange(20000, 20009), {"grpc": 8090, "http": 8080}
)
BILLING = Holder("billing", "billing-1", "grpc")


def apis(*ports: tuple[str, int]) -> tuple[Api, ...]:
    return tuple(Api(name, port) for name, port in ports)


def ports_of(result: tuple[Api, ...]) -> dict[str, int]:
    return {api.name: api.port for api in result}


# --- settings ----------------------------------------------------------------


def test_port_range_parses_low_high() -> None:
    parsed = PortRange.parse(" 20000-20009 ")
    assert (parsed.low, parsed.high, len(parsed)) == (20000, 20009, 10)
    assert 20009 in parsed and 20010 not in parsed


@pytest.mark.parametrize("text", ["20000", "30000-20000", "0-10", "1-70000", "a-b", ""])
def test_port_range_rejects_what_is_not_a_range(text: str) -> None:
    with pytest.raises(ValueError, match="is not a port range; use LOW-HIGH"):
        PortRange.parse(text)


def test_remote_ports_parse_kind_port_pairs() -> None:
    assert parse_remote_ports("grpc=8090, http=8080,") == {"grpc": 8090, "http": 8080}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("grpc", "is not KIND=PORT"),
        ("grpc=x", "is not KIND=PORT"),
        ("grpc=0", "the port must be 1-65535"),
        ("grpc=1,grpc=2", "'grpc' is given twice"),
        ("grpc=1,http=1", "two kinds of API cannot share a port"),
    ],
)
def test_remote_ports_reject_bad_pairs(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_remote_ports(text)


def test_port_policy_names_the_bad_setting() -> None:
    with pytest.raises(ValueError, match=r"^REGISTRY_PORT_MODE: 'cloud'"):
        PortPolicy.parse("cloud", "1-2", "")
    with pytest.raises(ValueError, match=r"^REGISTRY_PORT_RANGE: '2-1'"):
        PortPolicy.parse("local", "2-1", "")
    with pytest.raises(ValueError, match=r"^REGISTRY_REMOTE_PORTS: 'grpc'"):
        PortPolicy.parse("remote", "1-2", "grpc")
    assert PortPolicy.parse("REMOTE", "1-2", "grpc=9").remote == {"grpc": 9}


def test_address_key_is_canonical_for_ip_addresses_and_host_names() -> None:
    assert address_key("::0:1") == address_key("::1") == "::1"
    assert address_key("Orders-7.Internal") == "orders-7.internal"
    assert address_key("orders-7.internal.") == "orders-7.internal"
    # One laptop's loopback, however a service names it.
    assert address_key("LocalHost") == address_key("billing.localhost") == "127.0.0.1"
    assert address_key("localhost.example") == "localhost.example"
    assert address_key("127.0.0.1") == "127.0.0.1"


# --- choosing ports ----------------------------------------------------------


def test_assign_keeps_named_ports_and_fills_zero_from_the_range() -> None:
    result = assign(
        apis(("grpc", 0), ("http", 8080), ("metrics", 0)),
        LOCAL,
        address="127.0.0.1",
        held={},
        previous={},
    )
    assert ports_of(result) == {"grpc": 20000, "http": 8080, "metrics": 20001}


def test_assign_starts_at_the_offset_and_wraps_around() -> None:
    result = assign(
        apis(("a", 0), ("b", 0)), LOCAL, address="h", held={}, previous={}, offset=9
    )
    assert ports_of(result) == {"a": 20009, "b": 20000}


def test_assign_skips_ports_held_by_others_and_bound_by_other_programs() -> None:
    held = {20000: BILLING, 20002: BILLING}
    asked: list[int] = []

    def is_free(port: int) -> bool:
        asked.append(port)
        return port != 20001

    result = assign(
        apis(("grpc", 0)),
        LOCAL,
        address="127.0.0.1",
        held=held,
        previous={},
        is_free=is_free,
    )
    assert ports_of(result) == {"grpc": 20003}
    # Held ports are never even tried.
    assert asked == [20001, 20003]


def test_assign_gives_an_api_its_previous_port_back_without_a_bind_check() -> None:
    def bound_everywhere(port: int) -> bool:
        return False

    result = assign(
        apis(("grpc", 0), ("http", 0)),
        LOCAL,
        address="127.0.0.1",
        held={},
        # The instance itself may still be bound to its port; http held a
        # port outside today's range, which goes back to the pool.
        previous={"grpc": 20005, "http": 30000},
        is_free=lambda port: port != 20000 and bound_everywhere(port) is False,
    )
    assert ports_of(result) == {"grpc": 20005, "http": 20001}


def test_assign_refuses_a_named_port_held_by_another_instance_naming_it() -> None:
    with pytest.raises(AlreadyExists) as refused:
        assign(
            apis(("http", 8080), ("grpc", 20000)),
            LOCAL,
            address="127.0.0.1",
            held={20000: BILLING},
            previous={},
        )
    message = str(refused.value)
    assert message.startswith("apis[1].port: port 20000 on 127.0.0.1 is held by ")
    assert "api 'grpc' of instance 'billing-1' of 'billing'" in message


def test_assign_refuses_two_apis_naming_one_port() -> None:
    with pytest.raises(InvalidArgument, match=r"^apis\[1\].port: 8080 is also"):
        assign(
            apis(("http", 8080), ("admin", 8080)),
            LOCAL,
            address="h",
            held={},
            previous={},
        )


def test_assign_exhausted_range_is_resource_exhausted_saying_so() -> None:
    tiny = PortPolicy(PortMode.LOCAL, PortRange(20000, 20002))
    with pytest.raises(ResourceExhausted) as exhausted:
        assign(
            apis(("grpc", 0)),
            tiny,
            address="127.0.0.1",
            held={20000: BILLING, 20001: BILLING},
            previous={},
            is_free=lambda port: port != 20002,
        )
    assert str(exhausted.value) == (
        "no free port left in 20000-20002 on 127.0.0.1 for api 'grpc': 2 held by "
        "registered instances, 1 bound by other programs; deregister instances, "
        "or widen REGISTRY_PORT_RANGE"
    )


def test_assign_in_remote_mode_gives_the_fixed_port_of_the_api_kind() -> None:
    result = assign(
        apis(("grpc", 0), ("http", 0), ("metrics", 9100)),
        REMOTE,
        address="10.0.0.7",
        held={},
        previous={},
    )
    assert ports_of(result) == {"grpc": 8090, "http": 8080, "metrics": 9100}


def test_assign_in_remote_mode_refuses_a_kind_without_a_fixed_port() -> None:
    with pytest.raises(InvalidArgument) as refused:
        assign(apis(("metrics", 0)), REMOTE, address="h", held={}, previous={})
    assert "add metrics=PORT to REGISTRY_REMOTE_PORTS" in str(refused.value)
    assert "known: grpc=8090, http=8080" in str(refused.value)


def test_assign_in_remote_mode_refuses_a_fixed_port_another_api_names() -> None:
    with pytest.raises(InvalidArgument) as refused:
        assign(
            apis(("grpc", 0), ("admin", 8090)),
            REMOTE,
            address="10.0.0.7",
            held={},
            previous={},
        )
    assert str(refused.value).startswith(
        "apis[0].port: 0 asks for the fixed port of api 'grpc', 8090, which "
        "apis[1] names too"
    )


def test_assign_in_remote_mode_refuses_a_fixed_port_another_instance_holds() -> None:
    with pytest.raises(AlreadyExists, match=r"port 8090 on 10\.0\.0\.7 is held by"):
        assign(
            apis(("grpc", 0)),
            REMOTE,
            address="10.0.0.7",
            held={8090: BILLING},
            previous={},
        )


# --- this host's ports -------------------------------------------------------


@contextmanager
def listening() -> Iterator[int]:
    """A port some other program listens on, on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_free_port_check_sees_a_port_another_program_listens_on() -> None:
    check = free_port_check("127.0.0.1")
    assert check is not None
    with listening() as port:
        assert not check(port)
        # The service may listen on every address: localhost is this host too.
        localhost = free_port_check("localhost")
        assert localhost is not None and not localhost(port)
    assert check(port)


def test_free_port_check_is_none_for_addresses_of_other_hosts() -> None:
    # TEST-NET-1 (RFC 5737) is nobody's address; host names are not resolved.
    assert free_port_check("192.0.2.1") is None
    assert free_port_check("orders-7.internal") is None


# --- through the API ---------------------------------------------------------


async def register(client: GrpcClient, request: Any) -> pb.RegisterResponse:
    response: pb.RegisterResponse = await client.call("Register", request)
    return response


async def refused(client: GrpcClient, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        await client.call("Register", request)
    return failed.value


def three_apis(name: str, instance_id: str, address: str = "127.0.0.1") -> Any:
    return registration(
        name,
        instance_id,
        address=address,
        apis=[pb.Api(name="http", port=0), pb.Api(name="metrics", port=0)],
    )


def held(response: pb.RegisterResponse) -> list[int]:
    return [api.port for api in response.instance.apis]


async def test_concurrent_registrations_on_one_address_never_share_a_port(
    nursery: trio.Nursery, database_url: str
) -> None:
    # Two replicas, so that nothing but the database can keep them apart.
    replicas = [
        await start_replica(nursery, database_url, port_range="21000-21999")
        for _ in range(2)
    ]
    responses: list[pb.RegisterResponse] = []
    async with (
        grpc_client(replicas[0].port or 0) as first,
        grpc_client(replicas[1].port or 0) as second,
    ):
        clients = [first, second]

        async def register_one(i: int) -> None:
            request = three_apis(f"svc-{i % 7}", f"i-{i}")
            responses.append(await register(clients[i % 2], request))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as calls:
                for i in range(100):
                    calls.start_soon(register_one, i)

        ports = [port for response in responses for port in held(response)]
        assert len(ports) == 300
        assert len(set(ports)) == 300
        assert all(21000 <= port <= 21999 for port in ports)

        # Held ports stay held: more registrations get none of them.
        later = [
            await register(first, three_apis("late", f"late-{i}")) for i in range(5)
        ]
        assert not {p for r in later for p in held(r)} & set(ports)

        # A port another instance holds is refused when named, with its holder.
        taken = responses[0].instance
        error = await refused(
            second,
            registration("intruder", "x-1", port=taken.apis[0].port),
        )
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error.details().startswith("apis[0].port: port ")
        assert f"instance {taken.instance_id!r} of {taken.name!r}" in error.details()
        listed = await first.call("List", pb.ListRequest(name="intruder"))
        assert list(listed.instances) == []

        # The same port on another address is another port.
        elsewhere = await register(
            second,
            registration(
                "intruder", "x-1", port=taken.apis[0].port, address="10.9.9.9"
            ),
        )
        assert held(elsewhere) == [taken.apis[0].port]
    for replica in replicas:
        replica.stop()


async def test_ports_are_held_until_deregistration_and_then_assigned_again(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, port_range="21100-21102")
    async with grpc_client(replica.port or 0) as client:
        first = await register(client, three_apis("billing", "b-1"))
        assert sorted(held(first)) == [21100, 21101, 21102]

        error = await refused(client, registration("orders", "o-1"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "no free port left in 21100-21102 on 127.0.0.1 for api 'grpc': 3 held "
            "by registered instances, 0 bound by other programs; deregister "
            "instances, or widen REGISTRY_PORT_RANGE"
        )

        await client.call(
            "Deregister",
            pb.DeregisterRequest(name="billing", instance_id="b-1", token=first.token),
        )
        second = await register(client, registration("orders", "o-1"))
        assert held(second)[0] in {21100, 21101, 21102}
    replica.stop()


async def test_localhost_and_127_0_0_1_share_their_ports(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, port_range="21200-21205")
    async with grpc_client(replica.port or 0) as client:
        named = await register(client, three_apis("billing", "b-1", "localhost"))
        numbered = await register(client, three_apis("orders", "o-1", "127.0.0.1"))
        assert not set(held(named)) & set(held(numbered))

        taken = registration("payments", "p-1", address="127.0.0.1")
        taken.apis[0].port = held(named)[0]
        error = await refused(client, taken)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "of instance 'b-1' of 'billing'" in error.details()
    replica.stop()


async def test_register_again_gets_the_same_ports_back(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, port_range="21200-21999")
    async with grpc_client(replica.port or 0) as client:
        first = await register(client, three_apis("billing", "b-1"))
        again = await register(client, three_apis("billing", "b-1"))
        assert again.instance.generation == 2
        assert held(again) == held(first)

        # Naming one of its own ports is no conflict either.
        named = registration("billing", "b-1", port=held(first)[0])
        assert held(await register(client, named)) == held(first)[:1]

        # Another address: the old ports are released with the old generation.
        moved = await register(client, three_apis("billing", "b-1", "10.1.2.3"))
        other = await register(
            client, registration("orders", "o-1", port=held(first)[1])
        )
        assert held(other) == [held(first)[1]]
        assert [api.name for api in moved.instance.apis] == ["grpc", "http", "metrics"]
    replica.stop()


async def test_port_bound_by_another_program_is_never_assigned(
    nursery: trio.Nursery, database_url: str
) -> None:
    with listening() as port:
        replica = await start_replica(
            nursery, database_url, port_range=f"{port}-{port}"
        )
        async with grpc_client(replica.port or 0) as client:
            error = await refused(client, registration("billing", "b-1"))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "0 held by registered instances, 1 bound by other programs" in (
                error.details()
            )
            # On another host's address the registry cannot look, and does not.
            remote = await register(
                client, registration("billing", "b-2", address="192.0.2.1")
            )
            assert held(remote) == [port]
    async with grpc_client(replica.port or 0) as client:
        assert held(await register(client, registration("billing", "b-1"))) == [port]
    replica.stop()


async def test_resolve_and_watch_carry_the_assigned_ports(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, port_range="21300-21399")
    async with grpc_client(replica.port or 0) as client:
        request = pb.WatchRequest(names=["billing"], snapshot=True)
        async with watch_stream(client.stub, request) as stream:
            assert (await stream.snapshot())[0] == []
            registered = await register(client, three_apis("billing", "b-1"))
            event = await stream.receive_event()
        resolved = await client.call("Resolve", pb.ResolveRequest(name="billing"))

    assigned = {api.name: api.port for api in registered.instance.apis}
    assert set(assigned) == {"grpc", "http", "metrics"}
    assert all(21300 <= port <= 21399 for port in assigned.values())
    assert {api.name: api.port for api in event.instance.apis} == assigned
    assert {api.name: api.port for api in resolved.instances[0].apis} == assigned
    replica.stop()


async def test_remote_mode_assigns_the_fixed_port_of_each_api_kind(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(
        nursery, database_url, port_mode="remote", remote_ports="grpc=7000,http=7001"
    )
    async with grpc_client(replica.port or 0) as client:
        first = await register(
            client,
            registration(
                "billing", "b-1", address="10.0.0.1", apis=[pb.Api(name="http")]
            ),
        )
        second = await register(
            client, registration("billing", "b-2", address="10.0.0.2")
        )
        assert held(first) == [7000, 7001]
        assert held(second) == [7000]

        error = await refused(
            client,
            registration("billing", "b-3", address="10.0.0.3", apis=[pb.Api(name="x")]),
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("apis[1].port: 0 asks for the fixed port")
    replica.stop()


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("port_range", "9-1", "REGISTRY_PORT_RANGE: '9-1' is not a port range"),
        ("port_mode", "cloud", "REGISTRY_PORT_MODE: 'cloud' is not a port mode"),
        (
            "events_exchange",
            "amq.events",
            "REGISTRY_EVENTS_EXCHANGE: 'amq.events' starts with 'amq.'",
        ),
    ],
)
async def test_bad_port_or_broker_settings_stop_the_replica_with_the_reason(
    nursery: trio.Nursery, database_url: str, setting: str, value: str, reason: str
) -> None:
    # The reason comes out of the replica's nurseries, in exception groups.
    with pytest.raises(BaseException) as failed:
        await start_replica(nursery, database_url, **{setting: value})
    assert any(str(error).startswith(reason) for error in leaves(failed.value))


def leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error
