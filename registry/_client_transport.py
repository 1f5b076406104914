"""A gRPC client transport for Trio, on purerpc's protocol layer.

The client-side twin of registry._grpc. purerpc's own client is not used: it
never closes its socket nor its calls' memory streams, cannot send
grpc-timeout, and its streaming stub leaves a generator unclosed. purerpc's
sans-io GRPCConnection does HTTP/2 (through h2) and gRPC framing; this module
moves the bytes.

A Channel is one HTTP/2 connection to one endpoint. hold_channel() opens it,
reports it through task_status.started(), and serves it (one reader task, one
writer task) until it is closed or the connection ends. Calls run in their
caller's task:

- a call sends grpc-timeout; its caller enforces the deadline with a cancel
  scope, and a call given up before its status arrived (cancelled, past its
  deadline, or abandoned) resets its stream with RST_STREAM CANCEL, so the
  server stops working on it at once;
- only the writer task writes to the socket, so a call cancelled halfway
  leaves no half-written frame behind;
- a response is acknowledged (flow control) when the caller takes it, so a
  slow reader holds the server back rather than growing memory: at most a
  stream window (twice the message size limit) is buffered per call;
- the server's graceful GOAWAY (a draining replica) retires the channel:
  calls in flight finish on it, new calls go elsewhere;
- the serving part runs under a shield, so that a call made from a shielded
  cleanup (a deregistration while the caller is cancelled) still gets its
  answer; close() is what ends a channel.

Failures are ConnectionFailed (nothing more will come from this connection)
and RpcError (the server answered with a status other than OK).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio
from google.protobuf.message import DecodeError, Message
from purerpc.grpclib.buffers import MessageTooLargeError
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import (
    MessageReceived,
    ResponseEnded,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import ProtocolError
from purerpc.grpclib.status import StatusCode

RECEIVE_SIZE = 65536

# Connection states of h2's state machine and the inputs it accepts after a
# GOAWAY from the server. h2 3.2 closes the whole connection on receipt, but
# a graceful GOAWAY (RFC 9113, section 6.8) lets the streams already open
# finish: their frames must still be taken, acknowledged and answered.
_STILL_OPEN_AFTER_GOAWAY = [
    h2.connection.ConnectionInputs.RECV_HEADERS,
    h2.connection.ConnectionInputs.RECV_DATA,
    h2.connection.ConnectionInputs.RECV_WINDOW_UPDATE,
    h2.connection.ConnectionInputs.RECV_PING,
    h2.connection.ConnectionInputs.RECV_SETTINGS,
    h2.connection.ConnectionInputs.RECV_RST_STREAM,
    h2.connection.ConnectionInputs.RECV_PRIORITY,
    h2.connection.ConnectionInputs.SEND_DATA,
    h2.connection.ConnectionInputs.SEND_WINDOW_UPDATE,
    h2.connection.ConnectionInputs.SEND_RST_STREAM,
    h2.connection.ConnectionInputs.SEND_PING,
    h2.connection.ConnectionInputs.SEND_SETTINGS,
]


class ConnectionFailed(Exception):
    """The endpoint cannot be reached, or the connection ended before the
    call's status arrived."""


class RpcError(Exception):
    """The server ended the call with a status other than OK."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


# --- the protocol layer ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StreamReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class _GoAway:
    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class _ResponseTooLarge:
    stream_id: int
    reason: str


class _Protocol(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's connection, client side, with the events it drops made
    visible and graceful GOAWAY honoured."""

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__(
            GRPCConfiguration(client_side=True, max_message_length=max_message_bytes)
        )
        h2conn = self.h2_connection
        machine = h2conn.state_machine
        closed = h2.connection.ConnectionState.CLOSED
        # An instance's own table: the class's is shared with the server.
        machine._transitions = {
            **machine._transitions,
            **{(closed, i): (None, closed) for i in _STILL_OPEN_AFTER_GOAWAY},
        }
        # On GOAWAY h2 drops what is queued to send, requests of streams the
        # server has just agreed to serve included; keep them.
        h2conn.clear_outbound_data_buffer = lambda: None

    def _stream_reset(self, event: h2.events.StreamReset) -> list[object]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [_StreamReset(event.stream_id, int(event.error_code))]

    def _connection_terminated(
        self, event: h2.events.ConnectionTerminated
    ) -> list[object]:
        return [_GoAway(event.last_stream_id, int(event.error_code))]

    def _data_received(self, event: h2.events.DataReceived) -> list[object]:
        buffer = self.message_read_buffers.get(event.stream_id)
        if buffer is None:
            # The call failed already: nobody will take these bytes.
            self.h2_connection.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            return []
        try:
            buffer.data_received(event.data, event.flow_controlled_length)
        except MessageTooLargeError as exc:
            del self.message_read_buffers[event.stream_id]
            return [_ResponseTooLarge(event.stream_id, str(exc))]
        return [
            MessageReceived(event.stream_id, message, length)
            for message, length in buffer.read_all_complete_messages_flowcontrol()
        ]


# --- calls -------------------------------------------------------------------


class Call:
    """One call on a channel: its request is sent; read its responses with
    receive(), and close() it when done."""

    def __init__(self, channel: Channel, stream_id: int, response_type: Any) -> None:
        self._channel = channel
        self.stream_id = stream_id
        self._response_type = response_type
        # Complete messages not taken yet, with their flow-controlled size.
        self._messages: deque[tuple[bytes, int]] = deque()
        self._status: Any = None
        self._failure: Exception | None = None
        self._changed = trio.Event()
        self._window_opened = trio.Event()
        self._closed = False

    @property
    def ended(self) -> bool:
        """The server has said all it will say on this call."""
        return self._status is not None or self._failure is not None

    async def receive(self) -> Any:
        """The next response; None once the call has ended with OK. Raises
        RpcError for another status, ConnectionFailed if the connection
        ended first."""
        while True:
            if self._messages:
                data, length = self._messages.popleft()
                self._channel._acknowledge(self.stream_id, length)
                try:
                    return self._response_type.FromString(data)
                except DecodeError:
                    self.close()
                    raise RpcError(
                        StatusCode.INTERNAL,
                        "the server's answer is not a valid "
                        f"{self._response_type.DESCRIPTOR.full_name}",
                    ) from None
            if self._failure is not None:
                raise self._failure
            if self._status is not None:
                if self._status.status_code is StatusCode.OK:
                    return None
                raise RpcError(self._status.status_code, self._status.status_message)
            changed = self._changed
            await changed.wait()

    async def receive_one(self) -> Any:
        """The single response of a unary call, once its status is OK."""
        response = await self.receive()
        if response is None:
            raise RpcError(StatusCode.INTERNAL, "the server answered no message")
        if await self.receive() is not None:
            raise RpcError(
                StatusCode.INTERNAL, "the server answered more than one message"
            )
        return response

    def close(self) -> None:
        """Forget the call; reset its stream if the server may still be at
        it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._channel._forget(self)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _open_window(self) -> None:
        self._window_opened.set()
        self._window_opened = trio.Event()

    def _fail(self, failure: Exception) -> None:
        if not self.ended:
            self._failure = failure
        self._wake()
        self._open_window()


# --- the channel -------------------------------------------------------------


def _reset_error(endpoint: str, error_code: int) -> RpcError:
    # The status a reset stands for (gRPC's HTTP/2 transport specification).
    try:
        name = h2.errors.ErrorCodes(error_code).name
    except ValueError:
        name = str(error_code)
    code = {
        h2.errors.ErrorCodes.CANCEL: StatusCode.CANCELLED,
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    }.get(error_code, StatusCode.INTERNAL)
    return RpcError(code, f"{endpoint} reset the call ({name})")


def _grpc_timeout(seconds: float) -> timedelta:
    # purerpc writes the timeout in microseconds unless it is whole seconds;
    # gRPC allows at most 8 digits, so from 100 s on, send whole seconds.
    if seconds >= 99:
        return timedelta(seconds=int(seconds) + 1)
    return timedelta(microseconds=max(1, int(seconds * 1e6)))


class Channel:
    """One HTTP/2 connection to one endpoint, shared by any number of calls."""

    def __init__(
        self, endpoint: str, sock: trio.SocketStream, max_message_bytes: int
    ) -> None:
        self.endpoint = endpoint
        self._sock = sock
        self._protocol = _Protocol(max_message_bytes)
        self._calls: dict[int, Call] = {}
        self._wake_writer = trio.Event()
        # Shields the serving tasks from their nursery's cancellation, and
        # is cancelled by close().
        self._scope = trio.CancelScope(shield=True)
        # Why the channel ended; None while it serves.
        self.failure: str | None = None
        self._going_away = False
        self._retired = False

    @property
    def usable(self) -> bool:
        """New calls may start here."""
        return self.failure is None and not self._going_away and not self._retired

    @property
    def active_calls(self) -> int:
        return len(self._calls)

    def close(self) -> None:
        """End the connection now; calls in flight fail."""
        if self.failure is None:
            self.failure = f"the connection to {self.endpoint} was closed"
        self._scope.cancel()

    def retire(self) -> None:
        """Take no new calls; close once those in flight are done."""
        self._retired = True
        if not self._calls:
            self.close()

    async def start_call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: Any,
        *,
        deadline_header: float | None,
    ) -> Call:
        """Open a call and send its request (a unary or server-streaming
        call: one request message, then the end of the request).

        `deadline_header` is the grpc-timeout to send, in seconds; enforcing
        it here is the caller's part."""
        if not self.usable:
            raise ConnectionFailed(
                self.failure or f"{self.endpoint} takes no new calls"
            )
        protocol = self._protocol
        try:
            stream_id = protocol.get_next_available_stream_id()
            call = Call(self, stream_id, response_type)
            protocol.start_request(
                stream_id,
                "http",
                service,
                method,
                authority=self.endpoint,
                timeout=None
                if deadline_header is None
                else _grpc_timeout(deadline_header),
                content_type_suffix="+proto",
            )
        except h2.exceptions.H2Error as exc:
            raise ConnectionFailed(
                f"cannot start a call on {self.endpoint}: {exc}"
            ) from None
        self._calls[stream_id] = call
        try:
            await self._send_message(call, request.SerializeToString())
            if not call.ended:
                protocol.end_request(stream_id)
            self._flush()
        except BaseException:
            call.close()
            raise
        return call

    async def _send_message(self, call: Call, data: bytes) -> None:
        payload = memoryview(struct.pack(">?I", False, len(data)) + data)
        while payload:
            if call._failure is not None:
                raise call._failure
            if call.ended:
                # Answered (and so refused) before the request was complete.
                return
            window = self._protocol.flow_control_window(call.stream_id)
            if window <= 0:
                waiter = call._window_opened
                self._flush()
                await waiter.wait()
                continue
            self._protocol.send_data(call.stream_id, bytes(payload[:window]))
            payload = payload[window:]

    def _acknowledge(self, stream_id: int, length: int) -> None:
        if self.failure is None:
            self._protocol.acknowledge_received_data(stream_id, length)
            self._flush()

    def _forget(self, call: Call) -> None:
        del self._calls[call.stream_id]
        if self.failure is None:
            if not call.ended:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self._protocol.reset_stream(
                        call.stream_id, h2.errors.ErrorCodes.CANCEL
                    )
                self._protocol.message_read_buffers.pop(call.stream_id, None)
            # Hand back the window of what the caller left unread.
            for _, length in call._messages:
                self._protocol.acknowledge_received_data(call.stream_id, length)
            call._messages.clear()
            self._flush()
        if self._retired and not self._calls:
            self.close()

    def _flush(self) -> None:
        self._wake_writer.set()

    # --- serving -------------------------------------------------------------

    async def _serve(self) -> None:
        self._protocol.initiate_connection()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            self._flush()
            await self._read_loop()
            nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._sock.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._end(f"the connection to {self.endpoint} broke: {exc}")
                return
            if not data:
                self._end(f"{self.endpoint} closed the connection")
                return
            try:
                events = self._protocol.receive_data(data)
            except (
                ProtocolError,
                h2.exceptions.ProtocolError,
                KeyError,
                ValueError,
            ) as exc:
                # KeyError, ValueError: purerpc reading a header that is
                # missing or malformed (a server that does not speak gRPC).
                self._end(f"{self.endpoint} broke the gRPC protocol: {exc!r}")
                return
            for event in events:
                self._dispatch(event)
            self._flush()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                targets = list(self._calls.values())
            else:
                targets = list(filter(None, [self._calls.get(event.stream_id)]))
            for call in targets:
                call._open_window()
            return
        if isinstance(event, _GoAway):
            self._going_away = True
            for stream_id, call in list(self._calls.items()):
                if stream_id > event.last_stream_id:
                    call._fail(
                        ConnectionFailed(f"{self.endpoint} refused the call (GOAWAY)")
                    )
            return

        found = self._calls.get(getattr(event, "stream_id", 0))
        if found is None:
            return
        call = found
        if isinstance(event, MessageReceived):
            call._messages.append((event.data, event.flow_controlled_length))
        elif isinstance(event, ResponseEnded):
            if not call.ended:
                call._status = event.status
        elif isinstance(event, _StreamReset):
            if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                # Never processed: another endpoint may take it.
                call._fail(ConnectionFailed(f"{self.endpoint} refused the call"))
            else:
                call._fail(_reset_error(self.endpoint, event.error_code))
        elif isinstance(event, _ResponseTooLarge):
            with contextlib.suppress(h2.exceptions.H2Error):
                self._protocol.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
            call._fail(
                RpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"the answer is too large: {event.reason}",
                )
            )
        call._wake()

    async def _write_loop(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            data = self._protocol.data_to_send()
            if not data:
                continue
            try:
                await self._sock.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._end(f"the connection to {self.endpoint} broke: {exc}")
                self._scope.cancel()
                return

    def _end(self, failure: str) -> None:
        """The connection is over: fail every call still in flight."""
        if self.failure is None:
            self.failure = failure
        for call in list(self._calls.values()):
            call._fail(ConnectionFailed(self.failure))


def _keepalive(sock: trio.SocketStream) -> None:
    # Notice a peer that vanished without a word (a partition, a host that
    # died) on a connection that carries only an idle watch.
    raw = sock.socket
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _reason(exc: OSError) -> str:
    # trio's open_tcp_stream wraps the errors of each address it tried.
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return exc.strerror or str(exc)


async def hold_channel(
    endpoint: str,
    host: str,
    port: int,
    *,
    nursery: trio.Nursery,
    connect_timeout: float,
    max_message_bytes: int,
    task_status: trio.TaskStatus[Channel] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect to `endpoint`, report the Channel, serve it until closed.

    Started with `nursery.start()` on `nursery`; connection errors are raised
    to the caller of start() as ConnectionFailed.
    """
    try:
        with trio.fail_after(connect_timeout):
            sock = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ConnectionFailed(
            f"cannot reach {endpoint}: no connection within {connect_timeout}s"
        ) from None
    except OSError as exc:
        raise ConnectionFailed(f"cannot reach {endpoint}: {_reason(exc)}") from None

    channel = Channel(endpoint, sock, max_message_bytes)
    try:
        _keepalive(sock)
        task_status.started(channel)
        if trio.lowlevel.current_task().parent_nursery is not nursery:
            # The caller gave up while this task was starting (trio then
            # leaves it where it was): nobody holds the channel.
            return
        with channel._scope:
            await channel._serve()
    finally:
        channel._end(channel.failure or f"the connection to {endpoint} was closed")
        with trio.CancelScope(shield=True):
            await sock.aclose()
