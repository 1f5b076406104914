"""gRPC server reflection, through the official grpcio-reflection client and
through a bare stream of several questions, and the request streams it
rides on: deadlines, cancellation and size limits hold for them as for
every other call.
"""

from __future__ import annotations

import logging
import queue
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from harness import WAIT, grpc_client, in_thread, registration, start_replica
from registry._grpc import Call, GrpcServer, Method, Service
from registry.reflection import SERVICE_NAMES
from registry.v1 import registry_pb2 as pb

REGISTRY = "registry.v1.Registry"
ECHO = "/test.v1.Echo/Echo"


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]  # grpc is untyped
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Deadline(grpc.StreamStreamClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Gives every call without a deadline one of `seconds`: grpcio-reflection's
    client sets none, and a server that never answered would hang the run."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        if details.timeout is None:
            details = _CallDetails(
                details.method,
                self._seconds,
                details.metadata,
                details.credentials,
                details.wait_for_ready,
                details.compression,
            )
        return continuation(details, request_iterator)


def _reflect(target: str) -> tuple[set[str], descriptor_pool.DescriptorPool]:
    """What grpcio-reflection learns of a server: its services, and a pool
    of the descriptors it fetched. Blocking: runs in a thread."""
    with grpc.insecure_channel(target) as plain:
        channel = grpc.intercept_channel(plain, _Deadline(WAIT))
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        # Fetches the file of the service, and the files it imports.
        pool.FindServiceByName(REGISTRY)
        return services, pool


async def test_reflection_lists_the_services_and_resolves_registry_methods(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    services, pool = await in_thread(_reflect, f"127.0.0.1:{replica.port}")
    assert {REGISTRY, "grpc.health.v1.Health", *SERVICE_NAMES} <= services

    # The server's descriptors are the API's, method for method.
    reflected = pool.FindServiceByName(REGISTRY)
    compiled = pb.DESCRIPTOR.services_by_name["Registry"]
    assert [m.name for m in reflected.methods] == [m.name for m in compiled.methods]
    watch = reflected.methods_by_name["Watch"]
    assert watch.input_type.full_name == "registry.v1.WatchRequest"
    assert watch.server_streaming and not watch.client_streaming
    register = reflected.methods_by_name["Register"].input_type
    assert {"name", "instance_id", "apis"} <= set(register.fields_by_name)

    # A generic client, knowing only what reflection told it, calls the API.
    request_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("registry.v1.ListRequest")
    )
    response_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("registry.v1.ListResponse")
    )
    async with grpc_client(replica.port) as client:
        registered = await client.call("Register", registration())
        list_call = client.channel.unary_unary(
            f"/{REGISTRY}/List",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        listed = await in_thread(list_call, request_type(name="billing"), timeout=WAIT)
    assert listed.revision == registered.revision
    assert [i.instance_id for i in listed.instances] == [
        registered.instance.instance_id
    ]
    replica.stop()


class _Conversation:
    """A grpcio bidirectional call fed one request at a time, each sent only
    once the previous answer is in."""

    def __init__(self, channel: grpc.Channel, path: str) -> None:
        self._requests: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = (
            queue.Queue()
        )
        method = channel.stream_stream(
            path,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        self._call = method(self._feed(), timeout=WAIT)

    def _feed(self) -> Iterator[reflection_pb2.ServerReflectionRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    async def ask(
        self, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse:
        self._requests.put(request)
        return await in_thread(next, self._call)

    async def close(self) -> list[Any]:
        """End the requests; what the server sent after, till its status."""
        self._requests.put(None)
        return await in_thread(list, self._call)


async def test_reflection_v1_answers_one_question_after_another_on_one_stream(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        talk = _Conversation(
            client.channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        )
        listed = await talk.ask(
            reflection_pb2.ServerReflectionRequest(list_services="")
        )
        names = [s.name for s in listed.list_services_response.service]
        assert REGISTRY in names

        found = await talk.ask(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=REGISTRY)
        )
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(data)
            for data in found.file_descriptor_response.file_descriptor_proto
        ]
        # The file first, then what it imports.
        assert files[0].name == "registry/v1/registry.proto"
        assert set(files[0].dependency) <= {f.name for f in files[1:]}

        # v1 can describe itself.
        itself = await talk.ask(
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            )
        )
        [own] = itself.file_descriptor_response.file_descriptor_proto
        assert descriptor_pb2.FileDescriptorProto.FromString(own).package == (
            "grpc.reflection.v1"
        )

        unknown = await talk.ask(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")
        )
        assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "'no.Such'" in unknown.error_response.error_message
        assert unknown.original_request.file_containing_symbol == "no.Such"

        # The client ends its side; the server ends the call with OK.
        assert await talk.close() == []
    replica.stop()


# --- request streams at the gRPC edge ----------------------------------------


class _Echo:
    """A bidirectional method that answers each request with its service
    name, once `release` is set; `ended` is set when the handler ends."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.ended = trio.Event()

    def service(self) -> Service:
        return Service(
            "test.v1.Echo",
            {
                "Echo": Method(
                    health_pb2.HealthCheckRequest,
                    self.echo,
                    streaming=True,
                    request_streaming=True,
                ),
                "Ping": Method(health_pb2.HealthCheckRequest, self.ping),
            },
        )

    async def echo(
        self, requests: AsyncIterator[health_pb2.HealthCheckRequest], call: Call
    ) -> None:
        try:
            await self.release.wait()
            async for request in requests:
                await call.send(
                    health_pb2.HealthCheckResponse(status=len(request.service))
                )
        finally:
            self.ended.set()

    async def ping(
        self, request: health_pb2.HealthCheckRequest, call: Call
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse()


async def _serve_echo(nursery: trio.Nursery, echo: _Echo, max_bytes: int) -> int:
    server = GrpcServer(
        [echo.service()], host="127.0.0.1", port=0, max_message_bytes=max_bytes
    )
    port: int = await nursery.start(server.serve)
    return port


def _echo_call(channel: grpc.Channel) -> Any:
    return channel.stream_stream(
        ECHO,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def _frame(message: health_pb2.HealthCheckRequest) -> bytes:
    data = message.SerializeToString()
    return struct.pack(">?I", False, len(data)) + data


class _RawCall:
    """Calls made with h2 alone, so that the order of their frames on the
    wire is the test's: no client library schedules them."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True)
        )
        self.conn.initiate_connection()
        self.data: dict[int, bytes] = {}
        self.trailers: dict[int, dict[str, str]] = {}

    def open(self, path: str, port: int, timeout: str | None = None) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", timeout))
        self.conn.send_headers(stream_id, headers)
        return stream_id

    async def flush(self) -> None:
        await self.sock.send_all(self.conn.data_to_send())

    async def status(self, stream_id: int) -> tuple[str, str]:
        """Read until the stream's trailers: its grpc-status and message."""
        while stream_id not in self.trailers:
            data = await self.sock.receive_some(65536)
            assert data, "the server closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.data[event.stream_id] = (
                        self.data.get(event.stream_id, b"") + event.data
                    )
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(
                    event, h2.events.TrailersReceived | h2.events.ResponseReceived
                ):
                    headers = {_text(k): _text(v) for k, v in event.headers}
                    if "grpc-status" in headers:
                        self.trailers[event.stream_id] = headers
            await self.flush()
        trailers = self.trailers[stream_id]
        return trailers["grpc-status"], trailers.get("grpc-message", "")

    async def goaway(self) -> int:
        """Read until the server ends the connection; its GOAWAY's code."""
        while True:
            data = await self.sock.receive_some(65536)
            assert data, "the connection closed without a GOAWAY"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    return int(event.error_code)

    def responses(self, stream_id: int) -> int:
        """How many messages the stream received."""
        data, count = self.data.get(stream_id, b""), 0
        while data:
            _, length = struct.unpack(">?I", data[:5])
            data = data[5 + length :]
            count += 1
        return count


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_request_stream_past_the_buffer_limit_gets_resource_exhausted(
    nursery: trio.Nursery,
) -> None:
    echo = _Echo()
    port = await _serve_echo(nursery, echo, max_bytes=1024)
    async with await trio.open_tcp_stream("127.0.0.1", port) as sock:
        raw = _RawCall(sock)
        # Six requests of 300 bytes while the handler takes none: a 1 KiB
        # buffer holds three of them. (The stream's window is twice the
        # message limit, 2 KiB: all six fit in it.)
        stream_id = raw.open(ECHO, port)
        burst = _frame(health_pb2.HealthCheckRequest(service="x" * 295)) * 6
        raw.conn.send_data(stream_id, burst, end_stream=True)
        # A call after them on the same connection: once it is answered,
        # the server has read the whole burst.
        ping = raw.open("/test.v1.Echo/Ping", port)
        raw.conn.send_data(
            ping, _frame(health_pb2.HealthCheckRequest()), end_stream=True
        )
        await raw.flush()
        with trio.fail_after(WAIT):
            assert await raw.status(ping) == ("0", "")
            echo.release.set()
            code, message = await raw.status(stream_id)
    assert code == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert "more than 1024 bytes of requests are waiting" in unquote(message)
    # What was buffered was answered before the error.
    assert raw.responses(stream_id) == 3
    nursery.cancel_scope.cancel()


async def test_request_stream_message_over_the_size_limit_gets_resource_exhausted(
    nursery: trio.Nursery,
) -> None:
    echo = _Echo()
    echo.release.set()
    port = await _serve_echo(nursery, echo, max_bytes=1024)
    async with grpc_client(port) as client:
        requests = [
            health_pb2.HealthCheckRequest(service="small"),
            health_pb2.HealthCheckRequest(service="x" * 2000),
        ]
        call = _echo_call(client.channel)(iter(requests), timeout=WAIT)
        with pytest.raises(grpc.RpcError) as exc:
            await in_thread(list, call)
    assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request too large" in exc.value.details()
    nursery.cancel_scope.cancel()


async def test_request_stream_ends_at_its_grpc_timeout_without_the_client(
    nursery: trio.Nursery,
) -> None:
    echo = _Echo()
    echo.release.set()
    port = await _serve_echo(nursery, echo, max_bytes=1024)
    async with await trio.open_tcp_stream("127.0.0.1", port) as sock:
        raw = _RawCall(sock)
        # One request, and the stream left open: the handler waits for more.
        stream_id = raw.open(ECHO, port, timeout="300m")
        raw.conn.send_data(stream_id, _frame(health_pb2.HealthCheckRequest()))
        await raw.flush()
        with trio.fail_after(WAIT):
            code, _ = await raw.status(stream_id)
            await echo.ended.wait()
    assert code == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert raw.responses(stream_id) == 1
    nursery.cancel_scope.cancel()


async def test_client_cancel_ends_a_handler_waiting_for_requests(
    nursery: trio.Nursery,
) -> None:
    echo = _Echo()
    echo.release.set()
    port = await _serve_echo(nursery, echo, max_bytes=1024)
    async with grpc_client(port) as client:
        never_ending: queue.Queue[None] = queue.Queue()

        def feed() -> Iterator[health_pb2.HealthCheckRequest]:
            yield health_pb2.HealthCheckRequest(service="one")
            never_ending.get()

        call = _echo_call(client.channel)(feed(), timeout=WAIT)
        assert (await in_thread(next, call)).status == len("one")
        call.cancel()
        with trio.fail_after(WAIT):
            await echo.ended.wait()
        never_ending.put(None)
    nursery.cancel_scope.cancel()


async def test_protocol_error_closes_its_connection_and_the_server_goes_on(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    echo = _Echo()
    echo.release.set()
    port = await _serve_echo(nursery, echo, max_bytes=1024)
    async with await trio.open_tcp_stream("127.0.0.1", port) as sock:
        raw = _RawCall(sock)
        # More than the stream's 2 KiB window, sent at once with the
        # connection's first frames, while the server writes its own.
        stream_id = raw.open(ECHO, port)
        raw.conn.send_data(stream_id, b"\0" * 3000)
        await raw.flush()
        with trio.fail_after(WAIT):
            ended = await raw.goaway()
    assert ended == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR

    # Other connections are served as before.
    async with grpc_client(port) as client:
        ping = client.channel.unary_unary(
            "/test.v1.Echo/Ping",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        await in_thread(ping, health_pb2.HealthCheckRequest(), timeout=WAIT)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    nursery.cancel_scope.cancel()
