"""A gRPC server for Trio, built on purerpc's protocol layer.

purerpc supplies the sans-io part: HTTP/2 through h2, gRPC headers, message
framing. Its own Server is not used, because it leaves too much undone for a
registry (it ignores deadlines and client cancels, and leaks handler errors
to the client); this module is the Trio shell that does it:

- a call runs under the caller's `grpc-timeout`, and ends with
  DEADLINE_EXCEEDED when it passes;
- RST_STREAM from the client, or the connection closing, cancels the call's
  handler at once, idle watch streams included;
- an error the handler did not mean to raise reaches the client as INTERNAL
  with a generic message, and its traceback goes to the log;
- a request larger than the limit gets RESOURCE_EXHAUSTED on its own stream;
  the connection and the other calls on it go on;
- the listening socket is bound without SO_REUSEPORT, so a port in use is an
  error at start;
- drain() stops accepting, asks clients to go elsewhere (GOAWAY), lets the
  calls in flight finish within a grace period and their last answers reach
  the client before the connection closes, then cancels the rest.

Handlers receive the decoded request and a Call. Unary handlers return the
response; streaming handlers send responses with `await call.send(...)` and
return when the stream is complete. A response may also be given already
serialized, as bytes, so that one sent often is encoded once. A method with
a request stream (server reflection's) gets an async iterator of decoded
requests instead of one request; the messages the handler has not taken yet
are bounded by the message size limit, and a client that sends past it gets
RESOURCE_EXHAUSTED.
RegistryError subclasses raised by a handler become their status code through
STATUS_CODES, the one place where the registry chooses gRPC status codes.
Each call to a known method is counted, by status code, in the server's
Metrics.
"""

from __future__ import annotations

import errno
import logging
import math
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import h2.errors
import h2.events
import h2.exceptions
import trio
from google.protobuf.message import DecodeError, Message
from hyperframe.frame import GoAwayFrame
from purerpc.grpclib.buffers import MessageTooLargeError
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import ProtocolError
from purerpc.grpclib.status import Status, StatusCode

from . import errors

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("registry.grpc")

STATUS_CODES: dict[type[errors.RegistryError], StatusCode] = {
    errors.InvalidArgument: StatusCode.INVALID_ARGUMENT,
    errors.NotFound: StatusCode.NOT_FOUND,
    errors.AlreadyExists: StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: StatusCode.PERMISSION_DENIED,
    errors.OutOfRange: StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: StatusCode.UNAVAILABLE,
}

INTERNAL_MESSAGE = "internal error; the registry logged the details"

# The highest stream id: a GOAWAY naming it asks the client to open no new
# streams while those in flight finish (RFC 9113, section 6.8).
_GRACEFUL_GOAWAY = GoAwayFrame(stream_id=0, last_stream_id=2**31 - 1).serialize()

RECEIVE_SIZE = 65536
# HTTP/2's initial flow-control window, a connection's until its client
# opens it wider.
_DEFAULT_WINDOW = 65535
# A gRPC message's prefix: compressed flag, then length.
_MESSAGE_PREFIX = struct.Struct(">?I")


class ServeError(Exception):
    """The server cannot start (a port in use, say)."""


def status_of(exc: errors.RegistryError) -> Status:
    for kind in type(exc).__mro__:
        code = STATUS_CODES.get(cast(type[errors.RegistryError], kind))
        if code is not None:
            return Status(code, str(exc))
    return Status(StatusCode.INTERNAL, INTERNAL_MESSAGE)


@dataclass(frozen=True, slots=True)
class Method:
    request_type: type[Message]
    # (request, call) -> response for unary methods; -> None for streaming
    # methods, which send through call.send(). With request_streaming, the
    # first argument is an AsyncIterator of the requests.
    handler: Callable[[Any, Call], Awaitable[Any]]
    # The responses are a stream.
    streaming: bool = False
    # The requests are a stream.
    request_streaming: bool = False

    @property
    def kind(self) -> str:
        """The gRPC method type, as metrics label it."""
        if self.request_streaming:
            return "bidi_stream" if self.streaming else "client_stream"
        return "server_stream" if self.streaming else "unary"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    methods: dict[str, Method]


# --- the protocol layer ------------------------------------------------------


class _StreamReset:
    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _RequestTooLarge:
    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


class _Protocol(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's connection, with the two events it drops made visible, and
    flow control that cannot leak."""

    def __init__(self, config: GRPCConfiguration) -> None:
        super().__init__(config)
        # Every header this server sends comes from purerpc's fixed lists
        # (lowercase names, the status message percent-encoded) and none from
        # a caller, so h2's checks and normalization of outgoing headers,
        # which run for every response, would find nothing to change.
        # Incoming headers are still checked.
        h2_config = self.h2_connection.config
        h2_config.validate_outbound_headers = False
        h2_config.normalize_outbound_headers = False

    def _stream_reset(self, event: h2.events.StreamReset) -> list[object]:
        # Its request will never complete: drop what is buffered of it.
        self.message_read_buffers.pop(event.stream_id, None)
        return [_StreamReset(event.stream_id)]

    def _data_received(self, event: h2.events.DataReceived) -> list[object]:
        # The window goes back at once, not when a message is complete:
        # bytes of a request that never completes (answered early, reset,
        # too large) would otherwise shrink the connection's window for good,
        # until it stalls. The message size limit bounds what is buffered.
        self.h2_connection.acknowledge_received_data(
            event.flow_controlled_length, event.stream_id
        )
        buffer = self.message_read_buffers.get(event.stream_id)
        if buffer is None:
            # The stream was already answered (its request was too large).
            return []
        try:
            buffer.data_received(event.data, event.flow_controlled_length)
        except MessageTooLargeError as exc:
            del self.message_read_buffers[event.stream_id]
            return [_RequestTooLarge(event.stream_id, str(exc))]
        return [
            MessageReceived(event.stream_id, message, length)
            for message, length in buffer.read_all_complete_messages_flowcontrol()
        ]


# --- calls -------------------------------------------------------------------


@dataclass(eq=False)
class _Stream:
    id: int
    # None: no such method.
    method: Method | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # The request of a unary-request method.
    request: bytes | None = None
    # The requests of a request stream that its handler has not taken yet.
    messages: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    message_arrived: trio.Event = field(default_factory=trio.Event)
    # Why the request cannot be read; raised to the handler.
    request_error: errors.RegistryError | None = None
    request_complete: trio.Event = field(default_factory=trio.Event)
    window_opened: trio.Event = field(default_factory=trio.Event)
    headers_sent: bool = False
    # The client reset the stream: it wants no answer.
    reset: bool = False
    # A message was cut off halfway: only a reset can end the stream.
    broken: bool = False


class Call:
    """What a handler knows of its call, and how a streaming one sends."""

    def __init__(
        self, connection: _Connection, stream: _Stream, path: str, peer: str
    ) -> None:
        self._connection = connection
        self._stream = stream
        self.path = path
        self.peer = peer
        self.messages_sent = 0

    async def send(self, message: Message | bytes) -> None:
        """Send one response: a message, or one already serialized."""
        await self._connection.send_message(self._stream, message)
        self.messages_sent += 1


class _Requests:
    """The messages of a request stream, decoded, in the order they came."""

    def __init__(self, stream: _Stream, request_type: type[Message]) -> None:
        self._stream = stream
        self._request_type = request_type

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Message:
        await trio.lowlevel.checkpoint()
        stream = self._stream
        while not stream.messages:
            if stream.request_error is not None:
                raise stream.request_error
            if stream.request_complete.is_set():
                raise StopAsyncIteration
            await stream.message_arrived.wait()
        data = stream.messages.popleft()
        stream.queued_bytes -= len(data)
        return _decode(self._request_type, data)


def _decode(request_type: type[Message], data: bytes) -> Message:
    try:
        return request_type.FromString(data)
    except DecodeError:
        raise errors.InvalidArgument(
            f"the request is not a valid {request_type.DESCRIPTOR.full_name}"
        ) from None


def _too_large(reason: str) -> errors.ResourceExhausted:
    return errors.ResourceExhausted(
        f"request too large: {reason.split(': ', 1)[-1]}"
        " bytes; split it or raise the server's max message size"
    )


class _Connection:
    def __init__(self, server: GrpcServer, sock: trio.SocketStream) -> None:
        self._server = server
        self._sock = sock
        self._protocol = _Protocol(
            GRPCConfiguration(
                client_side=False, max_message_length=server.max_message_bytes
            )
        )
        self._streams: dict[int, _Stream] = {}
        # Only the writer task touches the socket's sending side: a handler
        # cancelled halfway through a write would break every call on it.
        self._wake_writer = trio.Event()
        self._raw_frames = b""
        self._nursery: trio.Nursery | None = None
        # Set by close_after_writing(): end once everything queued is sent.
        self._closing = False
        # Set once the writer has ended.
        self._written = trio.Event()
        self.peer = _peer_name(sock)

    @property
    def active_calls(self) -> int:
        return len(self._streams)

    async def serve(self) -> None:
        self._protocol.initiate_connection()
        if self._server.draining:
            # Accepted just before the drain began, and so not told yet.
            self.go_away()
            self.close_after_writing()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                self._flush()
                await self._read_loop()
                # The peer is gone: nobody is left to answer.
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._sock.aclose()

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._sock.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                events = self._protocol.receive_data(data)
            except (ProtocolError, h2.exceptions.ProtocolError) as exc:
                log.debug("closing connection from %s: %s", self.peer, exc)
                self._protocol.h2_connection.close_connection(
                    error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR
                )
                # The writer sends the GOAWAY: it may be sending right now,
                # and a second sender would break the connection's task.
                self.close_after_writing()
                with trio.move_on_after(1):
                    await self._written.wait()
                return
            for event in events:
                self._dispatch(event)
            self._flush()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, RequestReceived):
            service = self._server.services.get(event.service_name)
            method = service.methods.get(event.method_name) if service else None
            stream = _Stream(event.stream_id, method)
            if self._server.draining:
                # Never processed, so the client may retry it elsewhere.
                self._protocol.reset_stream(
                    event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM
                )
                return
            self._streams[stream.id] = stream
            assert self._nursery is not None
            self._nursery.start_soon(self._run_call, stream, event)
            return
        if isinstance(event, WindowUpdated):
            targets = (
                self._streams.values()
                if event.stream_id == 0
                else filter(None, [self._streams.get(event.stream_id)])
            )
            for stream in targets:
                stream.window_opened.set()
                stream.window_opened = trio.Event()
            return

        stream_id: int = getattr(event, "stream_id", 0)
        found = self._streams.get(stream_id)
        if found is None:
            return
        if isinstance(event, MessageReceived):
            if found.method is not None and found.method.request_streaming:
                self._queue_request(found, event.data)
                return
            if found.request is not None:
                found.request_error = errors.InvalidArgument(
                    "a unary request carries exactly one message"
                )
            found.request = event.data
        elif isinstance(event, RequestEnded):
            found.request_complete.set()
            found.message_arrived.set()
        elif isinstance(event, _RequestTooLarge):
            found.request_error = _too_large(event.reason)
            found.request_complete.set()
            found.message_arrived.set()
        elif isinstance(event, _StreamReset):
            found.reset = True
            found.scope.cancel()

    def _queue_request(self, stream: _Stream, data: bytes) -> None:
        """Hold one message of a request stream for its handler."""
        if stream.request_error is not None:
            # The call is failing already: what follows is dropped.
            return
        limit = self._server.max_message_bytes
        if stream.messages and stream.queued_bytes + len(data) > limit:
            stream.request_error = errors.ResourceExhausted(
                f"more than {limit} bytes of requests are waiting to be handled; "
                "wait for the answers before sending more"
            )
        else:
            stream.messages.append(data)
            stream.queued_bytes += len(data)
        stream.message_arrived.set()
        stream.message_arrived = trio.Event()

    async def _run_call(self, stream: _Stream, event: RequestReceived) -> None:
        path = f"/{event.service_name}/{event.method_name}"
        metrics = self._server.metrics if stream.method is not None else None
        labels = (
            stream.method.kind if stream.method else "",
            event.service_name,
            event.method_name,
        )
        if metrics is not None:
            metrics.rpc_started(*labels)
        started = trio.current_time()
        status: Status | None = None
        try:
            with stream.scope:
                status = await self._call(stream, event, path)
                await self._finish(stream, status)
        finally:
            del self._streams[stream.id]
            self._server._on_call_ended()
            if stream.scope.cancelled_caught:
                status = Status(StatusCode.CANCELLED, "cancelled by the client")
            elif status is None:
                # Cut off by the server (the drain's grace ran out), or its
                # connection broke: the client sees the connection close.
                status = Status(StatusCode.UNAVAILABLE, "cut off by the server")
            elapsed = trio.current_time() - started
            if metrics is not None:
                metrics.rpc_handled(*labels, status.status_code.name, elapsed)
            log.debug(
                "%s from %s: %s in %.1f ms", path, self.peer, status, elapsed * 1000
            )

    async def _call(self, stream: _Stream, event: RequestReceived, path: str) -> Status:
        method = stream.method
        if method is None:
            return Status(StatusCode.UNIMPLEMENTED, f"method {path} is not implemented")

        deadline = math.inf
        if event.timeout is not None:
            deadline = trio.current_time() + event.timeout.total_seconds()
        with trio.move_on_at(deadline) as deadline_scope:
            try:
                call = Call(self, stream, path, self.peer)
                request: Any
                if method.request_streaming:
                    request = _Requests(stream, method.request_type)
                else:
                    request = await self._read_request(stream, method)
                if method.streaming:
                    await method.handler(request, call)
                else:
                    response = await method.handler(request, call)
                    await self.send_message(stream, response)
                return Status(StatusCode.OK)
            except errors.RegistryError as exc:
                return status_of(exc)
            except Exception:
                log.exception("unhandled error in %s from %s", path, self.peer)
                return Status(StatusCode.INTERNAL, INTERNAL_MESSAGE)
        assert deadline_scope.cancelled_caught
        return Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    async def _read_request(self, stream: _Stream, method: Method) -> Message:
        await stream.request_complete.wait()
        if stream.request_error is not None:
            raise stream.request_error
        if stream.request is None:
            raise errors.InvalidArgument("the request carries no message")
        return _decode(method.request_type, stream.request)

    async def send_message(self, stream: _Stream, message: Message | bytes) -> None:
        data = message if isinstance(message, bytes) else message.SerializeToString()
        if len(data) > self._server.max_message_bytes:
            raise errors.ResourceExhausted(
                f"response of {len(data)} bytes exceeds the limit of "
                f"{self._server.max_message_bytes}; narrow the request"
            )
        if not stream.headers_sent:
            self._protocol.start_response(stream.id, "+proto")
            stream.headers_sent = True
        framed = _MESSAGE_PREFIX.pack(False, len(data)) + data

        # Nothing is sent until the client's window opens, and a message
        # that fits in half the window a client starts with waits until it
        # fits whole: cancelled while waiting (a watcher ended as too slow),
        # the call still ends with its status, with no half-sent message
        # before it. Clients grant more window once they have read about half
        # of it (h2, nghttp2) or less, so waiting for more than half could
        # wait for ever; a larger message goes as the window allows.
        # TODO: a larger message cut by a cancellation midway ends its
        # stream with RST_STREAM (CANCEL): a watcher ended as too slow while
        # such an event was half sent (one over 32 KiB, or less with a
        # client's smaller window: an entry using most of its metadata
        # allowance) gets CANCELLED instead of RESOURCE_EXHAUSTED and its
        # resume hint. Finishing the message within a grace period would keep
        # the status.
        window = await self._wait_to_send(stream, len(framed))
        try:
            if len(framed) <= min(window, self._max_frame()):
                # The usual case, and the one a watch event's fan-out takes
                # once per stream: the whole message in one DATA frame.
                self._protocol.send_data(stream.id, framed)
            else:
                await self._send_in_frames(stream, memoryview(framed))
        except BaseException:
            # Cancelled midway, the stream is reset: a half-sent message must
            # not be followed by anything else.
            stream.broken = True
            raise
        self._flush()

    async def _send_in_frames(self, stream: _Stream, payload: memoryview) -> None:
        """Send `payload` in frames as large as the client takes, as fast as
        its window opens."""
        while payload:
            size = min(await self._wait_to_send(stream, 1), self._max_frame())
            self._protocol.send_data(stream.id, bytes(payload[:size]))
            payload = payload[size:]

    async def _wait_to_send(self, stream: _Stream, size: int) -> int:
        """Wait until the client's flow-control window (the stream's and the
        connection's) takes `size` bytes whole if they fit in half the window
        a client starts with, else any of them; the window. The client's
        settings may change meanwhile, so the rule is applied anew at each
        wake-up."""
        h2conn = self._protocol.h2_connection
        while True:
            window: int = h2conn.local_flow_control_window(stream.id)
            if window >= (size if size <= self._initial_window() // 2 else 1):
                return window
            waiter = stream.window_opened
            self._flush()
            await waiter.wait()

    def _initial_window(self) -> int:
        """The smaller of the windows a new stream and the connection start
        with, as the client set them."""
        settings = self._protocol.h2_connection.remote_settings
        return min(settings.initial_window_size, _DEFAULT_WINDOW)  # type: ignore[no-any-return]  # h2 is untyped

    def _max_frame(self) -> int:
        """The largest DATA frame the client takes."""
        return self._protocol.h2_connection.max_outbound_frame_size  # type: ignore[no-any-return]  # h2 is untyped

    async def _finish(self, stream: _Stream, status: Status) -> None:
        if stream.reset:
            return
        if stream.broken:
            self._protocol.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
        elif stream.headers_sent:
            self._protocol.end_response(stream.id, status)
        else:
            self._protocol.respond_status(stream.id, status, "+proto")
        self._flush()
        await trio.lowlevel.checkpoint()

    def _flush(self) -> None:
        self._wake_writer.set()

    async def _writer(self) -> None:
        try:
            await self._write_until_closed()
        finally:
            self._written.set()

    async def _write_until_closed(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            # h2's frames first: a connection's first frame is its SETTINGS.
            data = self._protocol.data_to_send() + self._raw_frames
            self._raw_frames = b""
            if data:
                try:
                    await self._sock.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The peer is gone: nobody is left to answer.
                    self.close()
                    return
            if self._closing and not self._wake_writer.is_set():
                # All is written. Closing now, with the client's last frames
                # unread, would reset the connection, and a client may drop
                # what it has not read yet: half-close, and let the read
                # loop end at the client's own close.
                try:
                    await self._sock.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.close()
                return

    def go_away(self) -> None:
        """Ask the client to open no new streams here."""
        self._raw_frames += _GRACEFUL_GOAWAY
        self._flush()

    def close_after_writing(self) -> None:
        """End the connection once what its calls left to send (their last
        messages and statuses) is on the wire."""
        self._closing = True
        self._flush()

    def close(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _close(listeners: Sequence[trio.SocketListener]) -> None:
    for listener in listeners:
        listener.socket.close()


def _peer_name(sock: trio.SocketStream) -> str:
    try:
        host, port, *_ = sock.socket.getpeername()
    except OSError:
        return "unknown"
    return f"{host}:{port}"


# --- the server --------------------------------------------------------------


class GrpcServer:
    def __init__(
        self,
        services: Sequence[Service],
        *,
        host: str = "0.0.0.0",
        port: int = 50051,
        max_message_bytes: int = 4 * 1024 * 1024,
        metrics: Metrics | None = None,
    ) -> None:
        self.services = {service.name: service for service in services}
        self.metrics = metrics
        if metrics is not None:
            metrics.declare_rpcs(
                (method.kind, service.name, name)
                for service in services
                for name, method in service.methods.items()
            )
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.draining = False
        self._connections: set[_Connection] = set()
        self._accepting: trio.CancelScope | None = None
        self._cancel_all: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._call_ended = trio.Event()

    @property
    def active_calls(self) -> int:
        return sum(conn.active_calls for conn in self._connections)

    def _on_call_ended(self) -> None:
        self._call_ended.set()
        self._call_ended = trio.Event()

    async def wait_idle(self) -> None:
        """Return once no call is in flight."""
        while self.active_calls:
            await self._call_ended.wait()

    async def serve(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report the bound port through task_status, serve until
        drained or cancelled."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"cannot listen on {self.host}:{self.port}: the port is already "
                    "in use; stop the other process or choose another port "
                    "(--port, REGISTRY_PORT)"
                ) from None
            raise ServeError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        self.port = listeners[0].socket.getsockname()[1]
        log.info("gRPC listening on %s:%d", self.host, self.port)

        try:
            with trio.CancelScope() as self._cancel_all:
                async with trio.open_nursery() as nursery:
                    task_status.started(self.port)
                    with trio.CancelScope() as self._accepting:
                        async with trio.open_nursery() as accepting:
                            for listener in listeners:
                                accepting.start_soon(self._accept, listener, nursery)
                    # Draining: refuse new connections from here on.
                    _close(listeners)
        finally:
            _close(listeners)
            self._stopped.set()

    async def _accept(
        self, listener: trio.SocketListener, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                sock = await listener.accept()
            except OSError as exc:
                # Out of file descriptors, say: wait a little and go on.
                log.warning("accepting a connection failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_connection, sock)

    async def _serve_connection(self, sock: trio.SocketStream) -> None:
        connection = _Connection(self, sock)
        self._connections.add(connection)
        try:
            await connection.serve()
        except Exception:
            # One connection's failure must not end the server's others.
            log.exception("the connection from %s failed", connection.peer)
        finally:
            self._connections.discard(connection)

    async def drain(self, grace: float) -> None:
        """Stop accepting, let calls in flight finish for up to `grace`
        seconds, then end everything."""
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        for connection in list(self._connections):
            connection.go_away()
        with trio.move_on_after(grace):
            await self.wait_idle()
            # Cancelling now could cut the answers the last calls queued:
            # each connection sends them first, and serve() returns once
            # every connection has closed.
            for connection in list(self._connections):
                connection.close_after_writing()
            await self._stopped.wait()
            return
        log.warning(
            "the %.1fs grace period is over with %d calls still running; "
            "cancelling them",
            grace,
            self.active_calls,
        )
        if self._cancel_all is not None:
            self._cancel_all.cancel()
