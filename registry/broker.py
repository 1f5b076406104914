"""The registry's RabbitMQ connection, used from Trio.

aio-pika is an asyncio library; like asyncpg it runs on the trio-asyncio loop
that the supervisor opens at the root. One connection per replica, kept by
run(): opened at start, and opened again with backoff whenever it is lost.
aio-pika's robust connection is not used: its first connect does not retry,
and it replays declarations on its own; here the replica decides.

A declaration the broker refuses (an exchange that exists with another type,
a queue with other arguments) closes the channel it was made on. So each
Register declares on a channel of its own, closed afterwards, and a refusal
never breaks a later call; the publisher keeps one channel, with publisher
confirms and mandatory routing, and opens another when it breaks.

aio-pika's errors are mapped once, here: an unreachable or lost broker
becomes Unavailable, topology the broker refuses becomes FailedPrecondition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.exceptions
import trio
import trio_asyncio

from .backoff import Backoff
from .db import redact
from .errors import FailedPrecondition, Unavailable
from .topology import Binding, EventMessage

__all__ = ["Broker", "PublishOutcome"]

log = logging.getLogger("registry.broker")

_CONNECTION_ERRORS = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ConnectionClosed,
    # A channel closed under a call by anything but a refusal.
    aiormq.exceptions.ChannelClosed,
)


# What the broker answers to a declaration it will not make; it closes the
# channel with it.
_REFUSALS = (
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelAccessRefused,
)


def _lost() -> ConnectionError | None:
    """Called on CancelledError: when aiormq loses its connection it cancels
    the calls in flight, which is a lost broker, not a cancellation of this
    task (that one shows in the task's cancelling())."""
    task = asyncio.current_task()
    if task is not None and not task.cancelling():
        return ConnectionError("the broker connection closed during the call")
    return None


def _raise_if_lost() -> None:
    lost = _lost()
    if lost is not None:
        raise lost


class _Refused(Exception):
    """The broker refused one binding's declaration."""

    def __init__(self, binding: Binding, reason: BaseException) -> None:
        super().__init__(binding, reason)
        self.binding = binding
        self.reason = reason


@contextmanager
def _mapped_errors(url: str) -> Iterator[None]:
    try:
        yield
    except _Refused as exc:
        binding = exc.binding
        raise FailedPrecondition(
            f"the broker refused exchange {binding.exchange!r} ({binding.kind} "
            f"exchange) or queue {binding.queue!r}: {exc.reason}; an exchange's "
            "type never changes: use another exchange name, or have the broker's "
            "operator delete the old exchange"
        ) from None
    except _CONNECTION_ERRORS as exc:
        raise Unavailable(
            f"the broker at {redact(url)} is unreachable ({exc!r}); retry shortly"
        ) from None


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """How a batch went: its first `confirmed` messages are with the broker
    (routed to a queue, or `unrouted` of them to none); the rest are not."""

    confirmed: int
    unrouted: int
    error: BaseException | None


class Broker:
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        retry: Backoff | None = None,
    ) -> None:
        self.url = url
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._retry = retry or Backoff(0.2, 5.0)
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._connected = trio.Event()
        # The publisher's channel and the exchanges declared on it, by name.
        self._publishing: aio_pika.abc.AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

    @property
    def connected(self) -> bool:
        return self._connection is not None

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a connection open, forever.

        Started after the first attempt to connect, whether it worked or not:
        a broker that is down must not keep the replica from serving what
        needs no broker, but one that is up is there for the first Register.
        """
        started = False
        while True:
            try:
                connection = await self._connect()
            except Unavailable as exc:
                if not started:
                    started = True
                    task_status.started()
                delay = self._retry.next()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await trio.sleep(delay)
                continue
            self._retry.reset()
            lost = trio.Event()

            def on_close(*_: object, lost: trio.Event = lost) -> None:
                # Called on the asyncio side, synchronously.
                lost.set()

            connection.close_callbacks.add(on_close)
            self._connection = connection
            self._connected.set()
            log.info("connected to the broker at %s", redact(self.url))
            if not started:
                started = True
                task_status.started()
            try:
                await lost.wait()
            finally:
                self._connection = None
                self._connected = trio.Event()
                self._publishing = None
                self._exchanges = {}
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(5),
                    suppress(Exception),
                ):
                    await trio_asyncio.aio_as_trio(connection.close)()
            log.warning(
                "lost the broker at %s; reconnecting (Register calls that need "
                "it fail meanwhile, events wait in the outbox)",
                redact(self.url),
            )

    async def _connect(self) -> aio_pika.abc.AbstractConnection:
        try:
            with trio.fail_after(self._connect_timeout + 1):
                connection: aio_pika.abc.AbstractConnection = (
                    await trio_asyncio.aio_as_trio(aio_pika.connect)(
                        self.url, timeout=self._connect_timeout
                    )
                )
                return connection
        except trio.TooSlowError:
            raise Unavailable(
                f"the broker at {redact(self.url)} did not answer within "
                f"{self._connect_timeout}s"
            ) from None
        except Exception as exc:
            # A refused, reset or half-done handshake surfaces as any of a
            # dozen exceptions (StopAsyncIteration among them).
            raise Unavailable(
                f"cannot connect to the broker at {redact(self.url)} ({exc!r})"
            ) from None

    def _require(self) -> aio_pika.abc.AbstractConnection:
        connection = self._connection
        if connection is None:
            raise Unavailable(
                f"the broker at {redact(self.url)} is unreachable; retry shortly"
            )
        return connection

    async def declare(self, bindings: Sequence[Binding]) -> None:
        """Declare every exchange, durable queue and binding; idempotent."""
        if not bindings:
            return
        connection = self._require()

        async def declare_all() -> None:
            channel = await connection.channel(publisher_confirms=False)
            try:
                exchanges: dict[str, Any] = {}
                for binding in bindings:
                    try:
                        exchange = exchanges.get(binding.exchange)
                        if exchange is None:
                            exchange = await channel.declare_exchange(
                                binding.exchange, binding.kind.value, durable=True
                            )
                            exchanges[binding.exchange] = exchange
                        queue = await channel.declare_queue(binding.queue, durable=True)
                        await queue.bind(exchange, binding.routing_key)
                    except _REFUSALS as exc:
                        raise _Refused(binding, exc) from None
            except asyncio.CancelledError:
                _raise_if_lost()
                raise
            finally:
                if not channel.is_closed:
                    await asyncio.shield(channel.close())

        with _mapped_errors(self.url):
            with trio.move_on_after(self._timeout) as late:
                await trio_asyncio.aio_as_trio(declare_all)()
        if late.cancelled_caught:
            raise Unavailable(
                f"the broker at {redact(self.url)} did not declare the topology "
                f"within {self._timeout}s; retry shortly"
            )

    async def publish(
        self, exchange: str, messages: Sequence[EventMessage]
    ) -> PublishOutcome:
        """Publish `messages` in order to the topic exchange `exchange`, with
        confirms, and wait for every answer.

        asyncio code: the outbox awaits it inside its database transaction.
        Sent one after the other without waiting in between (aiormq writes
        them in call order); a message the broker returns as unroutable (no
        queue follows its key) counts as confirmed: nobody asked for it.
        """
        try:
            target = await self._publishing_exchange(exchange)
        except asyncio.CancelledError:
            # An outcome, not an exception: raised, it would pass for the
            # database's (this runs inside the outbox's transaction).
            lost = _lost()
            if lost is None:
                raise
            return PublishOutcome(0, 0, lost)
        except Exception as exc:
            return PublishOutcome(0, 0, exc)
        results = await asyncio.gather(
            *(
                target.publish(
                    aio_pika.Message(
                        message.body,
                        message_id=message.message_id,
                        type=message.type,
                        timestamp=message.timestamp,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        app_id="registry",
                    ),
                    routing_key=message.routing_key,
                    mandatory=True,
                )
                for message in messages
            ),
            return_exceptions=True,
        )
        confirmed = unrouted = 0
        for result in results:
            if isinstance(result, aiormq.exceptions.PublishError):
                unrouted += 1
            elif isinstance(result, BaseException):
                if isinstance(result, aiormq.exceptions.ChannelClosed):
                    self._publishing = None
                return PublishOutcome(confirmed, unrouted, result)
            confirmed += 1
        return PublishOutcome(confirmed, unrouted, None)

    async def _publishing_exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        connection = self._connection
        if connection is None:
            raise ConnectionError("the broker is not connected")
        channel = self._publishing
        if channel is None or channel.is_closed:
            channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._publishing = channel
            self._exchanges = {}
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await channel.declare_exchange(
                name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            self._exchanges[name] = exchange
        return exchange

    @staticmethod
    def describe_error(url: str, error: BaseException) -> str:
        if isinstance(error, aiormq.exceptions.DeliveryError):
            return f"the broker at {redact(url)} refused a message ({error})"
        return f"the broker at {redact(url)} is unreachable ({error!r})"
