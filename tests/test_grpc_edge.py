"""The gRPC edge, as a standard client sees it: deadlines, cancellation,
errors, message size, a port in use, draining, grpc.health.v1.

Calls go through the official grpcio client against real replicas on
loopback. Where grpcio would do the server's job for it (it enforces its own
deadline and resets the stream when it gives up), a bare HTTP/2 client
(RawConnection) sends the same call with nothing on the client side, so that what
ends the call is the server's own doing.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import (
    TEST_CONFIG,
    WAIT,
    grpc_client,
    in_thread,
    registration,
    replica_process,
    start_replica,
    start_replica_behind_proxy,
)
from registry import errors
from registry._grpc import (
    INTERNAL_MESSAGE,
    Call,
    GrpcServer,
    Method,
    ServeError,
    Service,
)
from registry.app import Replica
from registry.service import SERVICE_NAME
from registry.v1 import registry_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# How soon a handler must end once its client is gone.
HANDLER_END = 1.0


def server_of(replica: Replica) -> GrpcServer:
    assert replica.server is not None
    return replica.server


async def watch_until_live(client_stub: Any, request: pb.WatchRequest) -> Any:
    """A grpcio Watch call, once its handler is past the snapshot and
    waiting for live events."""
    call = client_stub.Watch(request, timeout=WAIT)
    first = await in_thread(next, call)
    assert first.WhichOneof("kind") == "snapshot_end"
    return call


def rpc_error(exc: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    error = exc.value
    return error.code(), error.details()


# --- a bare HTTP/2 client ----------------------------------------------------


class _H2Client(h2.connection.H2Connection):  # type: ignore[misc]  # h2 is untyped
    """h2 3 takes every GOAWAY for the end of the connection; a graceful one
    (RFC 9113, section 6.8) lets the streams already open finish."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        return [], [event]


@dataclass
class RawStream:
    messages: list[bytes] = field(default_factory=list)
    status: int | None = None
    ended: bool = False
    # The HTTP/2 error code of a RST_STREAM from the server.
    reset: int | None = None
    buffer: bytes = b""


@dataclass
class RawConnection:
    """gRPC calls over one HTTP/2 connection made with h2 alone: no deadline
    of its own, no reset when it stops reading, no GOAWAY on close."""

    port: int
    sock: trio.SocketStream
    conn: _H2Client
    streams: dict[int, RawStream] = field(default_factory=dict)
    # The last_stream_id of a GOAWAY from the server.
    go_away: int | None = None

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        conn = _H2Client(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        await sock.send_all(conn.data_to_send())
        return cls(port, sock, conn)

    def queue_call(
        self, path: str, request: Message, *, grpc_timeout: str | None = None
    ) -> int:
        """Open a call in h2's buffer; the next send puts it on the wire."""
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if grpc_timeout is not None:
            headers.append(("grpc-timeout", grpc_timeout))
        self.conn.send_headers(stream_id, headers)
        data = request.SerializeToString()
        self.conn.send_data(
            stream_id, struct.pack(">?I", False, len(data)) + data, end_stream=True
        )
        self.streams[stream_id] = RawStream()
        return stream_id

    async def start_call(
        self, path: str, request: Message, *, grpc_timeout: str | None = None
    ) -> int:
        stream_id = self.queue_call(path, request, grpc_timeout=grpc_timeout)
        await self.sock.send_all(self.conn.data_to_send())
        return stream_id

    async def next_message(self, stream_id: int) -> bytes:
        stream = self.streams[stream_id]
        while not stream.messages:
            assert not stream.ended, f"the stream ended: {stream}"
            await self._read()
        return stream.messages.pop(0)

    async def wait_end(self, stream_id: int) -> RawStream:
        stream = self.streams[stream_id]
        while not stream.ended:
            await self._read()
        return stream

    async def wait_status(self, stream_id: int) -> int:
        stream = await self.wait_end(stream_id)
        assert stream.status is not None, f"the stream ended without a status: {stream}"
        return stream.status

    async def wait_go_away(self) -> int:
        while self.go_away is None:
            await self._read()
        return self.go_away

    async def aclose(self) -> None:
        await self.sock.aclose()

    async def _read(self) -> None:
        data = await self.sock.receive_some(65536)
        assert data, "the server closed the connection"
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                self.go_away = event.last_stream_id
                continue
            stream = self.streams.get(getattr(event, "stream_id", 0))
            if stream is None:
                continue
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                stream.buffer += event.data
            elif isinstance(
                event, h2.events.ResponseReceived | h2.events.TrailersReceived
            ):
                status = dict(event.headers).get(b"grpc-status")
                if status is not None:
                    stream.status = int(status)
            elif isinstance(event, h2.events.StreamEnded):
                stream.ended = True
            elif isinstance(event, h2.events.StreamReset):
                stream.ended = True
                stream.reset = event.error_code
            while len(stream.buffer) >= 5:
                _, length = struct.unpack(">?I", stream.buffer[:5])
                if len(stream.buffer) < 5 + length:
                    break
                stream.messages.append(stream.buffer[5 : 5 + length])
                stream.buffer = stream.buffer[5 + length :]
        await self.sock.send_all(self.conn.data_to_send())


# --- deadlines ---------------------------------------------------------------


async def test_resolve_waiting_past_its_deadline_ends_with_deadline_exceeded(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        # A revision far ahead: the handler waits for it until the deadline.
        with pytest.raises(grpc.RpcError) as exc:
            await client.call(
                "Resolve",
                pb.ResolveRequest(name="billing", min_revision=10**9),
                deadline=0.5,
            )
        assert rpc_error(exc)[0] is grpc.StatusCode.DEADLINE_EXCEEDED

        with trio.fail_after(HANDLER_END):
            await server_of(replica).wait_idle()
    replica.stop()


async def test_server_ends_a_call_at_its_grpc_timeout_without_the_client(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    raw = await RawConnection.open(replica.port)
    try:
        started = trio.current_time()
        resolve = await raw.start_call(
            "/registry.v1.Registry/Resolve",
            pb.ResolveRequest(name="billing", min_revision=10**9),
            grpc_timeout="300m",
        )
        # The bare client neither gives up nor resets: the answer is the
        # server's, at the deadline and not before.
        with trio.fail_after(WAIT):
            status = await raw.wait_status(resolve)
        assert status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert trio.current_time() - started >= 0.3
        with trio.fail_after(HANDLER_END):
            await server_of(replica).wait_idle()
    finally:
        await raw.aclose()
    replica.stop()


# --- a client that goes away -------------------------------------------------


async def test_client_cancel_ends_an_idle_watch_handler_within_a_second(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        watch = await watch_until_live(client.stub, pb.WatchRequest(snapshot=True))
        assert server_of(replica).active_calls == 1
        assert len(replica.hub) == 1

        watch.cancel()
        with trio.fail_after(HANDLER_END):
            await server_of(replica).wait_idle()
        assert len(replica.hub) == 0
    replica.stop()


async def test_closing_the_channel_ends_an_idle_watch_handler_within_a_second(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        await watch_until_live(client.stub, pb.WatchRequest(snapshot=True))
        assert server_of(replica).active_calls == 1

        client.close()
        with trio.fail_after(HANDLER_END):
            await server_of(replica).wait_idle()
        assert len(replica.hub) == 0
    replica.stop()


async def test_tcp_disconnect_ends_an_idle_watch_handler_within_a_second(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    raw = await RawConnection.open(replica.port)
    try:
        watch = await raw.start_call(
            "/registry.v1.Registry/Watch", pb.WatchRequest(snapshot=True)
        )
        with trio.fail_after(WAIT):
            first = pb.WatchResponse.FromString(await raw.next_message(watch))
        assert first.WhichOneof("kind") == "snapshot_end"
        assert server_of(replica).active_calls == 1
    finally:
        # No RST_STREAM, no GOAWAY: the socket just closes.
        await raw.aclose()
    with trio.fail_after(HANDLER_END):
        await server_of(replica).wait_idle()
    assert len(replica.hub) == 0
    replica.stop()


# --- unhandled errors --------------------------------------------------------


async def _divide_by_zero(request: health_pb2.HealthCheckRequest, call: Call) -> Any:
    return 1 // 0


async def _send_then_fail(request: health_pb2.HealthCheckRequest, call: Call) -> None:
    await call.send(health_pb2.HealthCheckResponse(status=SERVING))
    raise KeyError("secret-internal-key")


async def _serve_broken(nursery: trio.Nursery) -> int:
    """A GrpcServer whose handlers fail by mistake: the registry's own have
    no bug to provoke on purpose, and the edge is what is tested."""
    broken = Service(
        "test.v1.Broken",
        {
            "Divide": Method(health_pb2.HealthCheckRequest, _divide_by_zero),
            "Stream": Method(
                health_pb2.HealthCheckRequest, _send_then_fail, streaming=True
            ),
        },
    )
    server = GrpcServer([broken], host="127.0.0.1", port=0)
    port: int = await nursery.start(server.serve)
    return port


def _logged_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "registry.grpc" and r.levelno == logging.ERROR
    ]


async def test_unhandled_error_reaches_the_client_as_internal_and_is_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    port = await _serve_broken(nursery)
    caplog.set_level(logging.ERROR, logger="registry.grpc")

    async with grpc_client(port) as client:
        divide = client.channel.unary_unary(
            "/test.v1.Broken/Divide",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as exc:
            await in_thread(divide, health_pb2.HealthCheckRequest(), timeout=WAIT)
    code, details = rpc_error(exc)
    assert code is grpc.StatusCode.INTERNAL
    assert details == INTERNAL_MESSAGE

    [logged] = _logged_errors(caplog)
    assert "/test.v1.Broken/Divide" in logged.getMessage()
    assert logged.exc_info is not None
    assert logged.exc_info[0] is ZeroDivisionError
    nursery.cancel_scope.cancel()


async def test_unhandled_error_midway_through_a_stream_ends_it_with_internal(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    port = await _serve_broken(nursery)
    caplog.set_level(logging.ERROR, logger="registry.grpc")

    async with grpc_client(port) as client:
        stream = client.channel.unary_stream(
            "/test.v1.Broken/Stream",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        call = stream(health_pb2.HealthCheckRequest(), timeout=WAIT)
        with trio.fail_after(WAIT):
            assert (await in_thread(next, call)).status == SERVING
            with pytest.raises(grpc.RpcError) as exc:
                await in_thread(next, call)
    code, details = rpc_error(exc)
    assert code is grpc.StatusCode.INTERNAL
    assert details == INTERNAL_MESSAGE

    [logged] = _logged_errors(caplog)
    assert logged.exc_info is not None
    assert logged.exc_info[0] is KeyError
    nursery.cancel_scope.cancel()


# --- large responses and flow control ----------------------------------------

# Bytes whose slices tell where they were cut.
PATTERN = bytes(range(256)) * 1200


@dataclass
class _SizesServer:
    port: int
    # Set by GiveUp once it has cancelled its send midway.
    gave_up: trio.Event = field(default_factory=trio.Event)


async def _serve_sizes(nursery: trio.Nursery) -> _SizesServer:
    """Send: messages of the sizes listed in the request's `service` field,
    cut from PATTERN. GiveUp: a message of 100,000 bytes, given up as soon
    as it is stuck on a client that does not read."""

    async def send(request: Any, call: Call) -> None:
        for size in request.service.split(","):
            await call.send(PATTERN[: int(size)])

    async def give_up(request: Any, call: Call) -> None:
        async with trio.open_nursery() as senders:
            senders.start_soon(call.send, PATTERN[:100_000])
            await trio.testing.wait_all_tasks_blocked()
            senders.cancel_scope.cancel()
        server.gave_up.set()

    service = Service(
        "test.v1.Sizes",
        {
            "Send": Method(health_pb2.HealthCheckRequest, send, streaming=True),
            "GiveUp": Method(health_pb2.HealthCheckRequest, give_up, streaming=True),
        },
    )
    grpc_server = GrpcServer([service], host="127.0.0.1", port=0)
    server = _SizesServer(await nursery.start(grpc_server.serve))
    return server


def _sizes(*sizes: int) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=",".join(map(str, sizes)))


# A small message first, so that the window is no longer whole, then one
# that would just have fitted a whole window; messages beyond a frame
# (16 KiB), on both sides of half a window (32,767 bytes with the 5 of the
# prefix), and beyond a window (64 KiB).
SIZES = (10, 65_525, 20_000, 30_000, 40_000, 32_762, 32_763, len(PATTERN), 1)


async def test_responses_beyond_a_frame_and_the_window_reach_an_h2_client(
    nursery: trio.Nursery,
) -> None:
    """A client with h2's defaults: 16 KiB frames, and a 64 KiB window that
    it opens again only once it has read half of it."""
    server = await _serve_sizes(nursery)
    raw = await RawConnection.open(server.port)
    with trio.fail_after(WAIT):
        stream_id = await raw.start_call("/test.v1.Sizes/Send", _sizes(*SIZES))
        received = [await raw.next_message(stream_id) for _ in SIZES]
        status = await raw.wait_status(stream_id)
    await raw.aclose()
    assert received == [PATTERN[:size] for size in SIZES]
    assert status == grpc.StatusCode.OK.value[0]
    nursery.cancel_scope.cancel()


async def test_responses_beyond_a_frame_and_the_window_reach_grpcio(
    nursery: trio.Nursery,
) -> None:
    server = await _serve_sizes(nursery)
    async with grpc_client(server.port) as client:
        send = client.channel.unary_stream(
            "/test.v1.Sizes/Send",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=bytes,
        )
        received = await in_thread(lambda: list(send(_sizes(*SIZES), timeout=WAIT)))
    assert received == [PATTERN[:size] for size in SIZES]
    nursery.cancel_scope.cancel()


async def test_a_message_waiting_for_the_window_goes_when_the_client_shrinks_it(
    nursery: trio.Nursery,
) -> None:
    """A message that waits to go whole, and whose client then lowers its
    initial window below the message, goes in pieces instead of waiting for
    a window that will never be large enough."""
    server = await _serve_sizes(nursery)
    raw = await RawConnection.open(server.port)
    with trio.fail_after(WAIT):
        # The first call takes the connection's whole window, and the client
        # reads it without giving the window back yet.
        first = await raw.start_call("/test.v1.Sizes/Send", _sizes(65_530))
        unacknowledged = 0
        while unacknowledged < 65_535:
            for event in raw.conn.receive_data(await raw.sock.receive_some(65536)):
                if isinstance(event, h2.events.DataReceived):
                    unacknowledged += event.flow_controlled_length
        # The second call's message (30,005 bytes with its prefix) waits to
        # go whole, and its handler is waiting when the settings change.
        second = await raw.start_call("/test.v1.Sizes/Send", _sizes(30_000))
        await trio.testing.wait_all_tasks_blocked()

        raw.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 20_000})
        await raw.sock.send_all(raw.conn.data_to_send())
        raw.conn.acknowledge_received_data(unacknowledged, first)
        await raw.sock.send_all(raw.conn.data_to_send())

        assert await raw.next_message(second) == PATTERN[:30_000]
        assert await raw.wait_status(second) == grpc.StatusCode.OK.value[0]
    await raw.aclose()
    nursery.cancel_scope.cancel()


async def test_a_message_cut_midway_ends_its_stream_with_a_reset(
    nursery: trio.Nursery,
) -> None:
    """Nothing may follow half a message: not the rest of the stream, nor a
    status the client would read as part of it."""
    server = await _serve_sizes(nursery)
    raw = await RawConnection.open(server.port)
    with trio.fail_after(WAIT):
        stream_id = await raw.start_call("/test.v1.Sizes/GiveUp", _sizes())
        await server.gave_up.wait()
        stream = await raw.wait_end(stream_id)
    await raw.aclose()
    assert stream.reset == h2.errors.ErrorCodes.CANCEL
    assert stream.status is None
    assert stream.messages == []
    assert 0 < len(stream.buffer) < 100_005
    nursery.cancel_scope.cancel()


async def test_an_error_message_reaches_the_client_as_written(
    nursery: trio.Nursery,
) -> None:
    """Spaces at its ends, a line break, non-ASCII text."""
    message = "  the instance ünïcode/1\nis held  "

    async def fail(request: Any, call: Call) -> Any:
        raise errors.FailedPrecondition(message)

    service = Service(
        "test.v1.Fail", {"Fail": Method(health_pb2.HealthCheckRequest, fail)}
    )
    server = GrpcServer([service], host="127.0.0.1", port=0)
    port: int = await nursery.start(server.serve)
    async with grpc_client(port) as client:
        call = client.channel.unary_unary(
            "/test.v1.Fail/Fail",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=bytes,
        )
        with pytest.raises(grpc.RpcError) as exc:
            await in_thread(call, health_pb2.HealthCheckRequest(), timeout=WAIT)
    assert rpc_error(exc) == (grpc.StatusCode.FAILED_PRECONDITION, message)
    nursery.cancel_scope.cancel()


async def test_request_bodies_of_calls_answered_early_give_their_window_back(
    nursery: trio.Nursery,
) -> None:
    """A body that arrives after its call was answered (an unknown method
    answers at once, and grpcio may then reset the stream halfway through
    the message) must still be acknowledged, or every such call shrinks the
    connection's flow-control window until, a GiB later, the connection
    stalls. Too slow to show that way, so this reads h2's accounting."""
    server = GrpcServer([], host="127.0.0.1", port=0)
    port = await nursery.start(server.serve)
    async with grpc_client(port) as client:
        unknown = client.channel.unary_unary("/test.v1.Nothing/Nothing")
        for _ in range(4):
            with pytest.raises(grpc.RpcError) as exc:
                # Many TCP reads long: most of it comes after the answer.
                await in_thread(unknown, b"x" * (1 << 20), timeout=WAIT)
            assert rpc_error(exc)[0] is grpc.StatusCode.UNIMPLEMENTED

        [connection] = server._connections
        window = connection._protocol.h2_connection._inbound_flow_control_window_manager
        # Every byte received is either still in the window or acknowledged.
        assert window.current_window_size + window._bytes_processed == (
            window.max_window_size
        )
    nursery.cancel_scope.cancel()


# --- bad requests ------------------------------------------------------------


async def test_oversized_request_gets_resource_exhausted_and_the_connection_goes_on(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, max_message_bytes=64 * 1024)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        # A stream on the same connection, open while the large request
        # comes in.
        watch = await watch_until_live(client.stub, pb.WatchRequest(snapshot=True))

        # Far above the limit: were it read, validation would answer
        # INVALID_ARGUMENT instead.
        too_large = registration(description="x" * (200 * 1024))
        with pytest.raises(grpc.RpcError) as exc:
            await client.call("Register", too_large)
        code, details = rpc_error(exc)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details

        registered = await client.call("Register", registration())
        with trio.fail_after(WAIT):
            event = (await in_thread(next, watch)).event
        assert event.revision == registered.revision
        assert event.instance.instance_id == registered.instance.instance_id
        watch.cancel()
    replica.stop()


async def test_malformed_request_gets_invalid_argument_and_the_connection_goes_on(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        raw_register = client.channel.unary_unary("/registry.v1.Registry/Register")
        # Field 31, wire type 7: no protobuf message starts like this.
        with pytest.raises(grpc.RpcError) as exc:
            await in_thread(raw_register, b"\xff\xff\xff\xff", timeout=WAIT)
        code, details = rpc_error(exc)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "registry.v1.RegisterRequest" in details

        registered = await client.call("Register", registration())
        assert registered.revision == 1
    replica.stop()


# --- a port in use -----------------------------------------------------------


def _listening_socket() -> socket.socket:
    """A listener on a free loopback port, bound the way purerpc binds: with
    SO_REUSEPORT, which would let a second server that also set it start
    silently on the same port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_server_on_a_port_in_use_fails_with_serve_error(
    nursery: trio.Nursery,
) -> None:
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        server = GrpcServer([], host="127.0.0.1", port=port)
        in_use = re.escape(f"127.0.0.1:{port}: the port is already in use")
        with pytest.raises(ServeError, match=in_use):
            await nursery.start(server.serve)


@pytest.mark.slow
async def test_serve_command_on_a_port_in_use_exits_with_a_one_line_error(
    database_url: str,
) -> None:
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "registry",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database-url",
            database_url,
        ]
        with trio.fail_after(WAIT):
            result = await trio.run_process(
                command,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        f"registry serve: cannot listen on 127.0.0.1:{port}: the port is already in "
        "use; stop the other process or choose another port (--port, REGISTRY_PORT)"
    )


# --- draining ----------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_ends_watch_streams_cleanly_and_exits_zero(
    nursery: trio.Nursery, database_url: str
) -> None:
    async with replica_process(database_url) as replica:
        async with grpc_client(replica.port) as client:
            watch = await watch_until_live(client.stub, pb.WatchRequest(snapshot=True))
            racing = client.stub.Register.future(
                registration(instance_id="racer"), timeout=WAIT
            )
            replica.terminate()

            # The stream ends with OK (no RpcError): the client resumes
            # elsewhere from its last revision.
            with trio.fail_after(WAIT):
                rest: list[Any] = await in_thread(list, watch)
            assert all(r.WhichOneof("kind") == "event" for r in rest)

            # The racing call was either served or refused, never cut.
            try:
                registered = await in_thread(racing.result)
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                registered = None
        assert await replica.wait() == 0, replica.log.decode()

    # What the client was told is what the registry holds.
    other = await start_replica(nursery, database_url)
    assert other.port is not None
    async with grpc_client(other.port) as client:
        listed = await client.call("List", pb.ListRequest(name="billing"))
    assert [i.instance_id for i in listed.instances] == (
        ["racer"] if registered is not None else []
    )
    other.stop()


@pytest.mark.slow
async def test_sigterm_lets_a_call_in_flight_finish_before_exiting(
    database_url: str,
) -> None:
    async with (
        replica_process(database_url) as draining,
        replica_process(database_url) as other,
        grpc_client(draining.port) as client,
        grpc_client(other.port) as other_client,
    ):
        first = await client.call("Register", registration(instance_id="one"))
        health = health_pb2_grpc.HealthStub(client.channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=WAIT
        )
        with trio.fail_after(WAIT):
            assert (await in_thread(next, health)).status == SERVING

        # Waits for a revision that only a write elsewhere will make.
        pending = client.stub.Resolve.future(
            pb.ResolveRequest(name="billing", min_revision=first.revision + 1),
            timeout=WAIT,
        )
        # Same connection, so once this is answered the replica has read the
        # Resolve's headers (HTTP/2 opens streams in order) and counts it.
        await client.call("List", pb.ListRequest())

        draining.terminate()
        with trio.fail_after(WAIT):
            assert (await in_thread(next, health)).status == NOT_SERVING
        second = await other_client.call("Register", registration(instance_id="two"))

        with trio.fail_after(WAIT):
            resolved = await in_thread(pending.result)
        assert resolved.revision >= second.revision
        assert sorted(i.instance_id for i in resolved.instances) == ["one", "two"]
        with trio.fail_after(WAIT):
            assert await in_thread(list, health) == []
        assert await draining.wait() == 0, draining.log.decode()
    assert b"2 calls in flight" in draining.log, draining.log.decode()
    assert b"grace period is over" not in draining.log


async def test_call_arriving_while_draining_is_refused_and_stores_nothing(
    nursery: trio.Nursery, database_url: str
) -> None:
    draining = await start_replica(nursery, database_url, drain_grace=WAIT)
    other = await start_replica(nursery, database_url)
    assert draining.port is not None
    assert other.port is not None
    raw = await RawConnection.open(draining.port)
    try:
        # A call the drain waits for: a revision nobody has written yet.
        pending = await raw.start_call(
            "/registry.v1.Registry/Resolve",
            pb.ResolveRequest(name="billing", min_revision=1),
        )
        # Opened after it on the same connection: once this answers, the
        # replica has read the Resolve too.
        health = await raw.start_call(
            "/grpc.health.v1.Health/Watch", health_pb2.HealthCheckRequest()
        )
        with trio.fail_after(WAIT):
            message = await raw.next_message(health)
        assert health_pb2.HealthCheckResponse.FromString(message).status == SERVING

        # A request the client sent before it could read the replica's
        # GOAWAY: held back here until the drain has begun.
        late = raw.queue_call(
            "/registry.v1.Registry/Register", registration(instance_id="late")
        )
        late_request = raw.conn.data_to_send()
        draining.stop()
        with trio.fail_after(WAIT):
            message = await raw.next_message(health)
            assert (
                health_pb2.HealthCheckResponse.FromString(message).status == NOT_SERVING
            )
            assert await raw.wait_go_away() == 2**31 - 1

        await raw.sock.send_all(late_request)
        with trio.fail_after(WAIT):
            refused = await raw.wait_end(late)
        # REFUSED_STREAM promises the call was never processed: the client
        # may retry it on another replica.
        assert refused.reset == h2.errors.ErrorCodes.REFUSED_STREAM

        # The call in flight still gets its answer once the revision exists.
        async with grpc_client(other.port) as client:
            registered = await client.call("Register", registration(instance_id="on"))
            with trio.fail_after(WAIT):
                assert await raw.wait_status(pending) == grpc.StatusCode.OK.value[0]
            resolved = pb.ResolveResponse.FromString(await raw.next_message(pending))
            assert [i.instance_id for i in resolved.instances] == ["on"]
            assert resolved.revision == registered.revision

            listed = await client.call("List", pb.ListRequest(name="billing"))
            assert [i.instance_id for i in listed.instances] == ["on"]
    finally:
        await raw.aclose()
    other.stop()


# --- grpc.health.v1 ----------------------------------------------------------


async def test_health_check_answers_for_the_server_and_the_registry(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        health = health_pb2_grpc.HealthStub(client.channel)
        for service in ("", SERVICE_NAME):
            answer = await in_thread(
                health.Check,
                health_pb2.HealthCheckRequest(service=service),
                timeout=WAIT,
            )
            assert answer.status == SERVING, service

        with pytest.raises(grpc.RpcError) as exc:
            await in_thread(
                health.Check,
                health_pb2.HealthCheckRequest(service="registry.v1.Nothing"),
                timeout=WAIT,
            )
        assert rpc_error(exc)[0] is grpc.StatusCode.NOT_FOUND
    replica.stop()


async def test_health_watch_sees_not_serving_when_the_replica_drains(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, drain_grace=WAIT)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        watch = health_pb2_grpc.HealthStub(client.channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=WAIT
        )
        with trio.fail_after(WAIT):
            assert (await in_thread(next, watch)).status == SERVING

        replica.stop()
        with trio.fail_after(WAIT):
            assert (await in_thread(next, watch)).status == NOT_SERVING
            # Then it ends cleanly, so the drain does not wait out its grace.
            assert await in_thread(list, watch) == []
            await server_of(replica).wait_idle()


async def test_health_is_not_serving_while_the_replica_has_lost_its_database(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica, proxy = await start_replica_behind_proxy(nursery, database_url)
    async with grpc_client(replica.port or 0) as client:
        watch = health_pb2_grpc.HealthStub(client.channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2 * WAIT
        )
        with trio.fail_after(WAIT):
            assert (await in_thread(next, watch)).status == SERVING

        proxy.cut()
        with trio.fail_after(WAIT):
            assert (await in_thread(next, watch)).status == NOT_SERVING
        proxy.heal()
        with trio.fail_after(WAIT):
            assert (await in_thread(next, watch)).status == SERVING
        watch.cancel()
    replica.stop()


async def test_health_serves_only_once_every_task_is_ready(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = Replica(TEST_CONFIG, database_url)
    assert not replica.health.serving

    with trio.fail_after(WAIT):
        port = await nursery.start(replica.run)
    assert replica.health.serving

    # The gRPC server answers from that same Health.
    async with grpc_client(port) as client:
        answer = await in_thread(
            health_pb2_grpc.HealthStub(client.channel).Check,
            health_pb2.HealthCheckRequest(),
            timeout=WAIT,
        )
    assert answer.status == SERVING
    replica.stop()
