"""Tests of the Registry API through two real gRPC clients: the official grpcio
client and purerpc's, each against an in-process replica on real Postgres.

Both clients sit behind one small adapter (`Client`), so most tests run once
per client; a failed call becomes CallFailed(code, message) either way.
"""

from __future__ import annotations

import asyncio
import secrets
import string
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
)
from datetime import timedelta
from typing import Any, Protocol, cast

import asyncpg
import grpc
import purerpc
import pytest
import trio
import trio_asyncio
from conftest import with_database
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from purerpc.wrappers import (
    extract_message_from_singleton_stream,
    send_single_message_client,
)
from trio_asyncio import aio_as_trio

from harness import (
    WAIT,
    GrpcClient,
    grpc_client,
    logged,
    registration,
    start_replica,
)
from registry.app import Replica
from registry.v1 import registry_pb2 as pb
from registry.v1.registry_grpc import RegistryStub

SERVICE = "registry.v1.Registry"

_RESPONSE_TYPES: dict[str, type[Message]] = {
    "Register": pb.RegisterResponse,
    "Deregister": pb.DeregisterResponse,
    "Resolve": pb.ResolveResponse,
    "List": pb.ListResponse,
    "Watch": pb.WatchResponse,
}


# --- the two clients behind one interface ------------------------------------


class CallFailed(Exception):
    """A call ended with a status other than OK."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class WatchStream(Protocol):
    async def receive(self) -> pb.WatchResponse | None:
        """The next message; None once the server ended the stream with OK."""


class Client(Protocol):
    name: str

    async def call(
        self, method: str, request: Message, *, deadline: float | None = None
    ) -> Any:
        """A unary call; `deadline` in seconds goes to the server as grpc-timeout."""

    def watch(
        self, request: pb.WatchRequest
    ) -> AbstractAsyncContextManager[WatchStream]: ...


class GrpcioClient:
    name = "grpcio"

    def __init__(self, client: GrpcClient) -> None:
        self._client = client

    async def call(
        self, method: str, request: Message, *, deadline: float | None = None
    ) -> Any:
        try:
            return await self._client.call(
                method, request, WAIT if deadline is None else deadline
            )
        except grpc.RpcError as exc:
            raise CallFailed(exc.code().name, exc.details()) from None

    @asynccontextmanager
    async def watch(self, request: pb.WatchRequest) -> AsyncIterator[WatchStream]:
        responses = self._client.stub.Watch(request, timeout=WAIT)
        try:
            yield _GrpcioWatch(responses)
        finally:
            responses.cancel()


class _GrpcioWatch:
    def __init__(self, responses: Any) -> None:
        self._responses = responses

    async def receive(self) -> pb.WatchResponse | None:
        try:
            # Abandoned on cancel: cancelling the call ends the thread's wait.
            message: pb.WatchResponse | None = await trio.to_thread.run_sync(
                next, self._responses, None, abandon_on_cancel=True
            )
        except grpc.RpcError as exc:
            raise CallFailed(exc.code().name, exc.details()) from None
        return message


class PurerpcClient:
    name = "purerpc"

    def __init__(self, channel: Any, port: int) -> None:
        self._channel = channel
        self._stub = RegistryStub(channel)
        self._authority = f"127.0.0.1:{port}"

    async def call(
        self, method: str, request: Message, *, deadline: float | None = None
    ) -> Any:
        try:
            # purerpc enforces no deadline itself: this one only stops a hang.
            with trio.fail_after(WAIT):
                if deadline is None:
                    return await getattr(self._stub, method)(request)
                return await self._call_with_deadline(method, request, deadline)
        except purerpc.RpcFailedError as exc:
            raise CallFailed(
                exc.status.status_code.name, exc.status.status_message
            ) from None

    async def _call_with_deadline(
        self, method: str, request: Message, deadline: float
    ) -> Any:
        stream = await self._start(method, request, deadline)
        return await extract_message_from_singleton_stream(stream)

    async def _start(
        self, method: str, request: Message, deadline: float | None
    ) -> Any:
        """Open a call as the generated stub does, and send its request.

        With a deadline, which the stub cannot send: purerpc refuses custom
        metadata starting with "grpc-", grpc-timeout included.
        """
        stream = await self._channel._grpc_socket.start_request(
            "http",
            SERVICE,
            method,
            request.DESCRIPTOR.full_name,
            self._authority,
            timeout=None if deadline is None else timedelta(seconds=deadline),
        )
        stream.expect_message_type(_RESPONSE_TYPES[method])
        await send_single_message_client(stream, request)
        return stream

    @asynccontextmanager
    async def watch(self, request: pb.WatchRequest) -> AsyncIterator[WatchStream]:
        # Not through the stub: its async generator wraps another one that it
        # never closes, and Trio warns when that one is collected.
        yield _PurerpcWatch(await self._start("Watch", request, None))


class _PurerpcWatch:
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def receive(self) -> pb.WatchResponse | None:
        with trio.fail_after(WAIT):
            message: pb.WatchResponse | None = await self._stream.receive_message()
        if message is None:
            status = self._stream.end_stream_event.status
            if status.status_code is not purerpc.StatusCode.OK:
                raise CallFailed(status.status_code.name, status.status_message)
        return message


@asynccontextmanager
async def purerpc_client(port: int) -> AsyncIterator[PurerpcClient]:
    """purerpc's client on a channel of its own.

    purerpc 0.8.0 (pinned) never closes the socket of a channel, nor the
    memory streams of its calls; anyio warns when those are collected, at any
    later moment. Record every stream the channel opens and close all of it
    on the way out.
    """
    channel = purerpc.insecure_channel("127.0.0.1", port)
    opened: list[Any] = []
    try:
        async with channel:
            connection = channel._grpc_socket
            make_stream = connection._stream_ctor

            def recording(stream_id: int) -> Any:
                stream = make_stream(stream_id)
                opened.append(stream)
                return stream

            connection._stream_ctor = recording
            yield PurerpcClient(channel, port)
    finally:
        for stream in opened:
            for end in stream._incoming_events:
                end.close()
        if channel._grpc_socket is not None:
            await channel._grpc_socket._socket._stream.aclose()


@asynccontextmanager
async def both_clients(port: int) -> AsyncIterator[list[Client]]:
    async with grpc_client(port) as official, purerpc_client(port) as pure:
        yield [GrpcioClient(official), pure]


# --- fixtures and helpers ----------------------------------------------------


@pytest.fixture
async def replica(nursery: trio.Nursery, database_url: str) -> Replica:
    return await start_replica(nursery, database_url)


@pytest.fixture(params=["grpcio", "purerpc"])
async def client(
    request: pytest.FixtureRequest, replica: Replica
) -> AsyncIterator[Client]:
    """Each client in turn."""
    assert replica.port is not None
    if request.param == "grpcio":
        async with grpc_client(replica.port) as official:
            yield GrpcioClient(official)
    else:
        async with purerpc_client(replica.port) as pure:
            yield pure


@pytest.fixture
async def clients(replica: Replica) -> AsyncIterator[list[Client]]:
    """Both clients in one test, for checks too cheap to run twice over."""
    assert replica.port is not None
    async with both_clients(replica.port) as both:
        yield both


@pytest.fixture
async def official(replica: Replica) -> AsyncIterator[Client]:
    """The grpcio client alone."""
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        yield GrpcioClient(client)


class Sql:
    """A plain asyncpg connection to the replica's database, used from Trio."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await aio_as_trio(self._connection.fetch)(
            query, *args
        )
        return rows

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await aio_as_trio(self._connection.fetchval)(query, *args)

    async def execute(self, script: str) -> None:
        await aio_as_trio(self._connection.execute)(script)


@asynccontextmanager
async def open_sql(database_url: str) -> AsyncIterator[Sql]:
    async with trio_asyncio.open_loop():
        connection = await aio_as_trio(asyncpg.connect)(database_url)
        try:
            yield Sql(connection)
        finally:
            await aio_as_trio(connection.close)()


@pytest.fixture
async def sql(replica: Replica) -> AsyncIterator[Sql]:
    async with open_sql(replica.database_url) as connection:
        yield connection


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


TCP_CHECK = pb.HealthCheck(tcp=pb.TcpCheck(api="grpc"))


def checked(check: pb.HealthCheck, *args: Any, **fields: Any) -> pb.RegisterRequest:
    """harness.registration(...) with a health check."""
    request: pb.RegisterRequest = registration(*args, **fields)
    request.check.CopyFrom(check)
    return request


def full_registration() -> pb.RegisterRequest:
    """A request that sets every field a caller can set without a broker."""
    return pb.RegisterRequest(
        name="orders",
        instance_id="orders-7",
        version="2.0.1-rc.1",
        description="takes orders; ünïcode is fine here",
        address="orders-7.eu-west.internal",
        apis=[pb.Api(name="grpc", port=50051), pb.Api(name="http", port=8080)],
        # No brokers nor follows: these replicas run without a broker, and so
        # refuse them (tests/test_broker.py registers both, against one).
        metadata={"team": "checkout", "zone": "eu-west-1a", "build/sha": "0a1b2c"},
        check=pb.HealthCheck(
            http=pb.HttpCheck(path="/healthz?deep=1", api="http", https=True),
            interval=seconds(15),
            timeout=seconds(2.5),
            failure_threshold=4,
            success_threshold=2,
        ),
    )


async def deregister(client: Client, name: str, instance_id: str, token: str) -> Any:
    return await client.call(
        "Deregister",
        pb.DeregisterRequest(name=name, instance_id=instance_id, token=token),
    )


async def listed(client: Client, **filters: Any) -> list[tuple[str, str]]:
    response = await client.call("List", pb.ListRequest(**filters))
    return [(i.name, i.instance_id) for i in response.instances]


async def next_change(stream: WatchStream) -> pb.WatchResponse:
    """The next message that is not a progress report."""
    while True:
        message = await stream.receive()
        assert message is not None, "the watch stream ended"
        if message.WhichOneof("kind") != "progress":
            return message


# --- Register ----------------------------------------------------------------


async def test_register_returns_the_stored_entry(client: Client) -> None:
    request = full_registration()

    registered = await client.call("Register", request)

    instance = registered.instance
    assert (instance.name, instance.instance_id) == ("orders", "orders-7")
    assert instance.version == request.version
    assert instance.description == request.description
    assert instance.address == request.address
    assert list(instance.apis) == list(request.apis)
    assert [(b.exchange, b.routing_key, b.type) for b in instance.brokers] == [
        (b.exchange, b.routing_key, b.type) for b in request.brokers
    ]
    assert dict(instance.metadata) == dict(request.metadata)
    assert instance.check == request.check
    assert instance.status == pb.STATUS_PENDING
    assert instance.generation == 1
    assert instance.revision == registered.revision == 1
    assert instance.registered_at.seconds > 0
    assert instance.updated_at == instance.registered_at
    assert registered.token.startswith("1.")

    # What List reads back from Postgres is what Register answered.
    read = await client.call("List", pb.ListRequest(name="orders"))
    assert list(read.instances) == [instance]


async def test_register_again_starts_a_new_generation(client: Client) -> None:
    first = await client.call("Register", registration(instance_id="billing-1"))
    second = await client.call(
        "Register", registration(instance_id="billing-1", version="1.5.0")
    )

    assert (first.instance.generation, second.instance.generation) == (1, 2)
    assert second.revision == first.revision + 1
    assert second.instance.version == "1.5.0"
    assert second.token.startswith("2.")
    assert second.token.split(".", 1)[1] != first.token.split(".", 1)[1]
    assert second.instance.registered_at == first.instance.registered_at
    assert await listed(client) == [("billing", "billing-1")]


async def test_register_without_instance_id_gets_a_generated_one(
    clients: list[Client],
) -> None:
    registered = [
        await client.call("Register", registration(instance_id=""))
        for client in clients
    ]

    ids = {r.instance.instance_id for r in registered}
    assert len(ids) == 2
    assert all(i and set(i) <= set(string.ascii_letters + string.digits) for i in ids)
    assert [r.instance.generation for r in registered] == [1, 1]
    assert {i for _, i in await listed(clients[0], name="billing")} == ids


async def test_register_status_is_pending_only_with_a_check(
    clients: list[Client],
) -> None:
    cases: list[tuple[str, pb.HealthCheck | None, int]] = [
        ("no-check", None, pb.STATUS_ACTIVE),
        # An empty check message means no check.
        ("empty-check", pb.HealthCheck(), pb.STATUS_ACTIVE),
        ("tcp-check", TCP_CHECK, pb.STATUS_PENDING),
        (
            "ttl-check",
            pb.HealthCheck(ttl=pb.TtlCheck(ttl=seconds(10))),
            pb.STATUS_PENDING,
        ),
    ]
    for client in clients:
        for instance_id, check, status in cases:
            request = registration(instance_id=instance_id)
            if check is not None:
                request.check.CopyFrom(check)
            registered = await client.call("Register", request)
            assert registered.instance.status == status, (client.name, instance_id)
            assert registered.instance.HasField("check") == (
                status == pb.STATUS_PENDING
            )


async def test_register_with_bad_input_leaves_the_existing_entry_untouched(
    official: Client, sql: Sql
) -> None:
    registered = await official.call("Register", registration(instance_id="billing-1"))

    bad = registration(instance_id="billing-1", version="9.9.9")
    bad.apis.add(name="http", port=70000)
    with pytest.raises(CallFailed) as failed:
        await official.call("Register", bad)

    assert failed.value.code == "INVALID_ARGUMENT"
    read = await official.call("List", pb.ListRequest(name="billing"))
    assert list(read.instances) == [registered.instance]
    assert read.revision == registered.revision
    assert await sql.fetchval("SELECT count(*) FROM registry.events") == 1
    # The token of the untouched generation still works.
    await deregister(official, "billing", "billing-1", registered.token)


# --- Deregister ----------------------------------------------------------------


async def test_deregister_without_token_is_unauthenticated(
    clients: list[Client],
) -> None:
    await clients[0].call("Register", registration(instance_id="billing-1"))

    for client in clients:
        with pytest.raises(CallFailed) as failed:
            await deregister(client, "billing", "billing-1", "")
        assert failed.value.code == "UNAUTHENTICATED", client.name
        assert "needs the instance token" in failed.value.message

    assert await listed(clients[0]) == [("billing", "billing-1")]


async def test_deregister_with_malformed_token_is_unauthenticated(
    clients: list[Client],
) -> None:
    await clients[0].call("Register", registration(instance_id="billing-1"))
    # "²" passes str.isdigit() but not int().
    malformed = ["no-dot", "1.", ".secret", "x.secret", "-1.secret", "².secret"]

    for client in clients:
        for token in malformed:
            with pytest.raises(CallFailed) as failed:
                await deregister(client, "billing", "billing-1", token)
            assert failed.value.code == "UNAUTHENTICATED", (client.name, token)
            assert "malformed" in failed.value.message

    assert await listed(clients[0]) == [("billing", "billing-1")]


async def test_deregister_with_token_of_older_generation_is_denied(
    client: Client,
) -> None:
    first = await client.call("Register", registration(instance_id="billing-1"))
    second = await client.call("Register", registration(instance_id="billing-1"))

    with pytest.raises(CallFailed) as failed:
        await deregister(client, "billing", "billing-1", first.token)

    assert failed.value.code == "PERMISSION_DENIED"
    assert "generation 1" in failed.value.message
    assert "generation 2" in failed.value.message
    read = await client.call("List", pb.ListRequest(name="billing"))
    assert list(read.instances) == [second.instance]
    assert read.revision == second.revision


async def test_deregister_with_wrong_token_is_denied(clients: list[Client]) -> None:
    registered = await clients[0].call(
        "Register", registration(instance_id="billing-1")
    )
    generation, secret = registered.token.split(".", 1)
    wrong = {
        "secret": f"{generation}.{secret[::-1]}",
        "generation": f"{int(generation) + 1}.{secret}",
        "other-instance": (
            await clients[0].call("Register", registration(instance_id="billing-2"))
        ).token,
    }

    for client in clients:
        for kind, token in wrong.items():
            with pytest.raises(CallFailed) as failed:
                await deregister(client, "billing", "billing-1", token)
            assert failed.value.code == "PERMISSION_DENIED", (client.name, kind)
            assert "does not match" in failed.value.message

    read = await clients[0].call("List", pb.ListRequest(name="billing"))
    assert read.instances[0] == registered.instance


async def test_deregister_unknown_instance_is_not_found(
    clients: list[Client],
) -> None:
    registered = await clients[0].call(
        "Register", registration(instance_id="billing-1")
    )

    for client in clients:
        for name, instance_id in [("billing", "billing-2"), ("orders", "billing-1")]:
            with pytest.raises(CallFailed) as failed:
                await deregister(client, name, instance_id, registered.token)
            assert failed.value.code == "NOT_FOUND", client.name
            assert repr(instance_id) in failed.value.message
            assert repr(name) in failed.value.message


async def test_deregister_with_current_token_removes_the_entry(
    client: Client, sql: Sql
) -> None:
    await client.call("Register", registration(instance_id="billing-1"))
    current = await client.call("Register", registration(instance_id="billing-1"))
    other = await client.call("Register", registration(instance_id="billing-2"))

    gone = await deregister(client, "billing", "billing-1", current.token)

    assert gone.revision == other.revision + 1
    assert await listed(client) == [("billing", "billing-2")]
    last = await sql.fetch(
        "SELECT revision, type, instance_id, generation FROM registry.events"
        " ORDER BY revision DESC LIMIT 1"
    )
    assert [tuple(row) for row in last] == [
        (gone.revision, "deregistered", "billing-1", 2)
    ]
    # The same token cannot remove it twice.
    with pytest.raises(CallFailed) as failed:
        await deregister(client, "billing", "billing-1", current.token)
    assert failed.value.code == "NOT_FOUND"


# --- Resolve -----------------------------------------------------------------


async def test_resolve_returns_active_instances_only(client: Client) -> None:
    active = [
        await client.call("Register", registration(instance_id=f"billing-{n}"))
        for n in (1, 2)
    ]
    pending = await client.call("Register", checked(TCP_CHECK, instance_id="billing-3"))
    await client.call("Register", registration("orders", instance_id="orders-1"))

    resolved = await client.call("Resolve", pb.ResolveRequest(name="billing"))

    assert pending.instance.status == pb.STATUS_PENDING
    assert list(resolved.instances) == [r.instance for r in active]
    assert resolved.revision == 4


async def test_resolve_unknown_name_is_not_found(clients: list[Client]) -> None:
    await clients[0].call("Register", registration("orders"))

    for client in clients:
        with pytest.raises(CallFailed) as failed:
            await client.call("Resolve", pb.ResolveRequest(name="billing"))
        assert failed.value.code == "NOT_FOUND", client.name
        assert "'billing'" in failed.value.message


async def test_resolve_without_active_instance_is_unavailable(
    client: Client, sql: Sql
) -> None:
    for n in (1, 2, 3):
        await client.call("Register", checked(TCP_CHECK, instance_id=f"billing-{n}"))
    await client.call("Register", registration("orders"))

    # As the prober would: a plain write, through the trigger.
    revision = await sql.fetchval(
        "UPDATE registry.instances SET status = 'inactive'"
        " WHERE name = 'billing' AND instance_id = 'billing-3' RETURNING revision"
    )
    with pytest.raises(CallFailed) as failed:
        await client.call(
            "Resolve", pb.ResolveRequest(name="billing", min_revision=revision)
        )

    assert revision == 5
    assert failed.value.code == "UNAVAILABLE"
    assert "'billing'" in failed.value.message
    assert "1 inactive, 2 pending" in failed.value.message
    event = await sql.fetch(
        "SELECT type, instance_id, status FROM registry.events WHERE revision = $1",
        revision,
    )
    assert [tuple(row) for row in event] == [
        ("status_changed", "billing-3", "inactive")
    ]


# --- List --------------------------------------------------------------------


async def test_list_filters_by_name_status_and_version(
    client: Client, sql: Sql
) -> None:
    await client.call("Register", registration("billing", "b1", version="1.0"))
    await client.call("Register", checked(TCP_CHECK, "billing", "b2", version="2.0"))
    await client.call("Register", registration("orders", "o1", version="1.0"))
    await client.call("Register", registration("orders", "o2", version="2.0"))
    head = await sql.fetchval(
        "UPDATE registry.instances SET status = 'inactive'"
        " WHERE instance_id = 'o2' RETURNING revision"
    )
    active, pending, inactive = pb.STATUS_ACTIVE, pb.STATUS_PENDING, pb.STATUS_INACTIVE

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({}, ["b1", "b2", "o1", "o2"]),
        ({"name": "billing"}, ["b1", "b2"]),
        ({"status": active}, ["b1", "o1"]),
        ({"status": pending}, ["b2"]),
        ({"status": inactive}, ["o2"]),
        ({"status": pb.STATUS_DRAINING}, []),
        ({"version": "2.0"}, ["b2", "o2"]),
        ({"name": "orders", "status": active}, ["o1"]),
        ({"name": "billing", "version": "1.0"}, ["b1"]),
        ({"status": active, "version": "2.0"}, []),
        ({"name": "orders", "status": inactive, "version": "2.0"}, ["o2"]),
        ({"name": "payments"}, []),
        ({"version": "3.0"}, []),
    ]
    for filters, expected in cases:
        response = await client.call("List", pb.ListRequest(**filters))
        assert [i.instance_id for i in response.instances] == expected, filters
        assert response.revision == head, filters


async def test_list_revision_only_answers_the_head_without_instances(
    client: Client, sql: Sql
) -> None:
    await client.call("Register", registration("billing", "b1"))
    # A write the replica's notifier may not have seen yet.
    head = await sql.fetchval(
        "UPDATE registry.instances SET status = 'inactive'"
        " WHERE instance_id = 'b1' RETURNING revision"
    )

    response = await client.call(
        "List", pb.ListRequest(revision_only=True, min_revision=head)
    )

    assert (list(response.instances), response.revision) == ([], head)


# --- reads with min_revision -------------------------------------------------

READS = [("Resolve", pb.ResolveRequest), ("List", pb.ListRequest)]


async def test_read_with_seen_min_revision_answers_at_once(client: Client) -> None:
    registered = await client.call("Register", registration(instance_id="billing-1"))

    for method, request_type in READS:
        with logged("registry.service", "waiting for revision") as waited:
            response = await client.call(
                method, request_type(name="billing", min_revision=registered.revision)
            )
        assert not waited.is_set(), method
        assert list(response.instances) == [registered.instance], method
        assert response.revision == registered.revision, method


async def test_read_with_future_min_revision_waits_for_that_write(
    client: Client,
) -> None:
    for n, (method, request_type) in enumerate(READS):
        wanted = n + 1
        answers: list[Any] = []

        async def read() -> None:
            request = request_type(name="billing", min_revision=wanted)  # noqa: B023
            answers.append(await client.call(method, request))  # noqa: B023

        with logged("registry.service", f"waiting for revision {wanted};") as waiting:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                with trio.fail_after(WAIT):
                    await waiting.wait()
                assert answers == [], f"{method} answered before the write"
                written = await client.call(
                    "Register", registration(instance_id=f"billing-{wanted}")
                )

        assert written.revision == wanted
        [answer] = answers
        assert answer.revision >= wanted, method
        assert [i.instance_id for i in answer.instances][-1] == f"billing-{wanted}"


async def test_read_with_min_revision_never_reached_ends_at_the_deadline(
    client: Client,
) -> None:
    registered = await client.call("Register", registration(instance_id="billing-1"))
    deadline = 0.5

    for method, request_type in READS:
        started = trio.current_time()
        with pytest.raises(CallFailed) as failed:
            await client.call(
                method,
                request_type(name="billing", min_revision=registered.revision + 1),
                deadline=deadline,
            )
        elapsed = trio.current_time() - started

        assert failed.value.code == "DEADLINE_EXCEEDED", method
        # grpcio's clock and Trio's differ by a hair.
        assert deadline * 0.9 <= elapsed < deadline + 5, method
        # The replica is fine, and still serves what it has.
        response = await client.call(method, request_type(name="billing"))
        assert response.revision == registered.revision


# --- Watch -------------------------------------------------------------------


async def test_watch_sends_snapshot_then_live_events(client: Client) -> None:
    first = await client.call("Register", registration(instance_id="billing-1"))
    await client.call("Register", registration("orders", instance_id="orders-1"))

    async with client.watch(
        pb.WatchRequest(names=["billing"], snapshot=True)
    ) as stream:
        snapshot = await next_change(stream)
        end = await next_change(stream)
        second = await client.call("Register", registration(instance_id="billing-2"))
        # Not followed: never sent.
        await client.call("Register", registration("orders", instance_id="orders-2"))
        gone = await deregister(client, "billing", "billing-1", first.token)
        events = [(await next_change(stream)).event for _ in range(2)]

    assert snapshot.snapshot == first.instance
    assert end.snapshot_end.revision == 2
    assert [(e.revision, e.type, e.instance.instance_id) for e in events] == [
        (second.revision, pb.EVENT_TYPE_REGISTERED, "billing-2"),
        (gone.revision, pb.EVENT_TYPE_DEREGISTERED, "billing-1"),
    ]
    assert events[0].instance == second.instance


async def test_watch_from_revision_replays_the_events_after_it(
    client: Client,
) -> None:
    first = await client.call("Register", registration(instance_id="billing-1"))
    second = await client.call("Register", registration(instance_id="billing-1"))
    gone = await deregister(client, "billing", "billing-1", second.token)

    async with client.watch(pb.WatchRequest(from_revision=first.revision)) as stream:
        events = [(await next_change(stream)).event for _ in range(2)]

    assert [(e.revision, e.type, e.instance.generation) for e in events] == [
        (second.revision, pb.EVENT_TYPE_UPDATED, 2),
        (gone.revision, pb.EVENT_TYPE_DEREGISTERED, 2),
    ]


# --- bad input ---------------------------------------------------------------


def _bad(**fields: Any) -> pb.RegisterRequest:
    request: pb.RegisterRequest = registration(instance_id="billing-1", **fields)
    return request


def _bad_check(check: pb.HealthCheck) -> pb.RegisterRequest:
    return checked(check, instance_id="billing-1")


def _with(change: Callable[[pb.RegisterRequest], object]) -> pb.RegisterRequest:
    request: pb.RegisterRequest = registration(instance_id="billing-1")
    change(request)
    return request


def _broker(routing_key: str, broker_type: Any, exchange: str = "events") -> Any:
    # broker_type is Any: some cases pass numbers no BrokerType has.
    return [pb.Broker(exchange=exchange, routing_key=routing_key, type=broker_type)]


_QUEUE, _TOPIC = pb.BROKER_TYPE_QUEUE, pb.BROKER_TYPE_TOPIC

# (id, request, field named in the message, value shown in the message)
BAD_REGISTRATIONS: list[tuple[str, pb.RegisterRequest, str, str]] = [
    ("name-upper", registration("Billing"), "name", "'Billing'"),
    ("name-empty", registration(""), "name", "''"),
    ("name-dash", registration("-billing"), "name", "'-billing'"),
    ("name-long", registration("b" * 64), "name", "64 characters"),
    ("instance-id", registration(instance_id="a b"), "instance_id", "'a b'"),
    (
        "instance-id-long",
        registration(instance_id="i" * 129),
        "instance_id",
        "129 characters",
    ),
    ("version", _bad(version="1.0 beta"), "version", "'1.0 beta'"),
    ("address-empty", _bad(address=""), "address", "is empty"),
    ("address-bad-host", _bad(address="bad host"), "address", "'bad host'"),
    ("address-bad-ip", _bad(address="10.0.0.256"), "address", "'10.0.0.256'"),
    (
        "port",
        _with(lambda r: r.apis.add(name="http", port=70000)),
        "apis[1].port",
        "70000",
    ),
    (
        "api-name",
        _with(lambda r: r.apis.add(name="HTTP", port=8080)),
        "apis[1].name",
        "'HTTP'",
    ),
    (
        "api-duplicate",
        _with(lambda r: r.apis.add(name="grpc", port=8091)),
        "apis[1].name",
        "'grpc'",
    ),
    (
        "apis-too-many",
        _bad(apis=[pb.Api(name=f"api-{n}", port=9000 + n) for n in range(32)]),
        "apis",
        "33",
    ),
    (
        "exchange-reserved",
        _bad(brokers=_broker("orders", _QUEUE, exchange="amq.direct")),
        "brokers[0].exchange",
        "'amq.direct'",
    ),
    (
        "exchange-chars",
        _bad(brokers=_broker("orders", _QUEUE, exchange="my exchange")),
        "brokers[0].exchange",
        "'my exchange'",
    ),
    (
        "routing-key-queue-wildcard",
        _bad(brokers=_broker("orders.*", _QUEUE)),
        "brokers[0].routing_key",
        "'orders.*'",
    ),
    (
        "routing-key-queue-empty",
        _bad(brokers=_broker("", _QUEUE)),
        "brokers[0].routing_key",
        "is empty",
    ),
    (
        "routing-key-topic-word",
        _bad(brokers=_broker("orders..created", _TOPIC)),
        "brokers[0].routing_key",
        "'orders..created'",
    ),
    (
        "routing-key-topic-partial-wildcard",
        _bad(brokers=_broker("orders.cre*", _TOPIC)),
        "brokers[0].routing_key",
        "'cre*'",
    ),
    (
        "routing-key-too-long",
        _bad(brokers=_broker("é" * 128, _TOPIC)),
        "brokers[0].routing_key",
        "256 bytes",
    ),
    (
        "broker-type-unspecified",
        _bad(brokers=_broker("orders", pb.BROKER_TYPE_UNSPECIFIED)),
        "brokers[0].type",
        "BROKER_TYPE_UNSPECIFIED",
    ),
    (
        "broker-type-unknown",
        _bad(brokers=_broker("orders", 7)),
        "brokers[0].type",
        "7",
    ),
    (
        "description-long",
        _bad(description="d" * 1025),
        "description",
        "1025 characters",
    ),
    ("description-nul", _bad(description="a\x00b"), "description", "'a\\x00b'"),
    (
        "metadata-key",
        _bad(metadata={"bad key": "x"}),
        "metadata['bad key']",
        "'bad key'",
    ),
    (
        "metadata-value-long",
        _bad(metadata={"team": "t" * 1025}),
        "metadata['team']",
        "1025 characters",
    ),
    (
        "check-interval-short",
        _bad_check(pb.HealthCheck(tcp=pb.TcpCheck(), interval=seconds(0.5))),
        "check.interval",
        "0.5",
    ),
    (
        "check-timeout-long",
        _bad_check(pb.HealthCheck(tcp=pb.TcpCheck(), timeout=seconds(61))),
        "check.timeout",
        "61",
    ),
    (
        "check-timeout-not-below-interval",
        _bad_check(
            pb.HealthCheck(tcp=pb.TcpCheck(), interval=seconds(5), timeout=seconds(5))
        ),
        "check.timeout",
        "5.0",
    ),
    (
        "check-threshold",
        _bad_check(pb.HealthCheck(tcp=pb.TcpCheck(), failure_threshold=101)),
        "check.failure_threshold",
        "101",
    ),
    (
        "check-ttl-unset",
        _bad_check(pb.HealthCheck(ttl=pb.TtlCheck())),
        "check.ttl.ttl",
        "unset",
    ),
    (
        "check-http-path",
        _bad_check(pb.HealthCheck(http=pb.HttpCheck(path="healthz"))),
        "check.http.path",
        "'healthz'",
    ),
    (
        "check-api-unknown",
        _bad_check(pb.HealthCheck(tcp=pb.TcpCheck(api="admin"))),
        "check.tcp.api",
        "'admin'",
    ),
    (
        "check-without-kind",
        _bad_check(pb.HealthCheck(interval=seconds(10))),
        "check",
        "interval",
    ),
]


def _admin(postgres_url: str, statement: str) -> None:
    async def execute() -> None:
        connection = await asyncpg.connect(postgres_url, timeout=WAIT)
        try:
            await connection.execute(statement, timeout=WAIT)
        finally:
            await connection.close(timeout=WAIT)

    asyncio.run(execute())


@pytest.fixture(scope="module")
def shared_database_url(postgres_url: str) -> Iterator[str]:
    """One database for every bad registration: none may leave a trace in it.

    A database of their own each would make them the slowest tests here.
    """
    name = f"registry_test_bad_input_{secrets.token_hex(4)}"
    _admin(postgres_url, f'CREATE DATABASE "{name}"')
    yield with_database(postgres_url, name)
    _admin(postgres_url, f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    ("request_", "field", "value"),
    [pytest.param(r, f, v, id=i) for i, r, f, v in BAD_REGISTRATIONS],
)
async def test_register_with_bad_input_stores_nothing(
    nursery: trio.Nursery,
    shared_database_url: str,
    request_: pb.RegisterRequest,
    field: str,
    value: str,
) -> None:
    replica = await start_replica(nursery, shared_database_url)
    assert replica.port is not None
    async with open_sql(shared_database_url) as sql:
        try:
            async with both_clients(replica.port) as clients:
                for client in clients:
                    with pytest.raises(CallFailed) as failed:
                        await client.call("Register", request_)
                    assert failed.value.code == "INVALID_ARGUMENT", client.name
                    message = failed.value.message
                    assert message.startswith(f"{field}:"), message
                    assert value in message, message

            assert await sql.fetchval("SELECT count(*) FROM registry.instances") == 0
            assert await sql.fetchval("SELECT count(*) FROM registry.events") == 0
            assert await sql.fetchval("SELECT revision FROM registry.revision") == 0
        finally:
            # Should a case store something, the next ones start clean anyway.
            await sql.execute(
                "TRUNCATE registry.instances, registry.events CASCADE;"
                " UPDATE registry.revision SET revision = 0, compacted = 0"
            )
    replica.stop()


BAD_CALLS: list[tuple[str, Message, str]] = [
    ("Resolve", pb.ResolveRequest(name="Billing"), "name: 'Billing'"),
    ("Resolve", pb.ResolveRequest(), "name: ''"),
    ("Resolve", pb.ResolveRequest(name="billing", min_revision=-1), "min_revision: -1"),
    ("List", pb.ListRequest(name="bill ing"), "name: 'bill ing'"),
    ("List", pb.ListRequest(min_revision=-5), "min_revision: -5"),
    # No Status has the number 9.
    ("List", pb.ListRequest(status=cast(Any, 9)), "status: 9"),
    ("List", pb.ListRequest(version="1.0\x00"), "version: '1.0\\x00'"),
    ("Watch", pb.WatchRequest(names=["billing", "Orders"]), "names[1]: 'Orders'"),
    ("Watch", pb.WatchRequest(names=["x" * 64]), "names[0]: 64 characters"),
    ("Watch", pb.WatchRequest(from_revision=-1), "from_revision: -1"),
    (
        "Deregister",
        pb.DeregisterRequest(name="Billing", instance_id="b1", token="1.x"),
        "name: 'Billing'",
    ),
    (
        "Deregister",
        pb.DeregisterRequest(name="billing", instance_id="b/1", token="1.x"),
        "instance_id: 'b/1'",
    ),
]


async def test_calls_with_bad_input_are_invalid_argument(
    clients: list[Client], sql: Sql
) -> None:
    for client in clients:
        for method, request, expected in BAD_CALLS:
            with pytest.raises(CallFailed) as failed:
                if isinstance(request, pb.WatchRequest):
                    async with client.watch(request) as stream:
                        await stream.receive()
                else:
                    await client.call(method, request)
            case = (client.name, method, expected)
            assert failed.value.code == "INVALID_ARGUMENT", case
            assert failed.value.message.startswith(expected), failed.value.message

    assert await sql.fetchval("SELECT revision FROM registry.revision") == 0
