"""Helpers for the tests that run against a real RabbitMQ.

The broker is REGISTRY_TEST_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/),
shared by every test and by other runs of the suite: each test names its
exchanges with a random suffix (`Amqp.name`), and deletes at teardown every
exchange and queue it declared or had the registry declare (`Amqp.track`).
Where no broker answers, the tests that need one skip with the reason, or
fail when REGISTRY_REQUIRE_BROKER=1 (as in CI).

`Amqp` is the tests' own client (aio-pika on the test's trio-asyncio loop):
it looks at what the registry declared, publishes, and consumes. A test cuts
the registry's connection through harness.TcpProxy, never by stopping the
shared broker.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aio_pika
import aiormq.exceptions
import pytest
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from harness import WAIT

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Seconds the session waits for the broker to answer before skipping.
PROBE_TIMEOUT = 3.0


def broker_url_or_skip() -> str:
    """The test broker's URL, once it has answered; else skip (or fail)."""
    url = os.environ.get("REGISTRY_TEST_AMQP_URL") or DEFAULT_AMQP_URL

    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=PROBE_TIMEOUT)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        reason = f"no RabbitMQ answers at {url} ({exc!r})"
        if os.environ.get("REGISTRY_REQUIRE_BROKER") == "1":
            pytest.fail(f"{reason}, and REGISTRY_REQUIRE_BROKER=1", pytrace=False)
        pytest.skip(f"{reason}; set REGISTRY_TEST_AMQP_URL to test against one")
    return url


class Subscription:
    """Messages of one queue, received on the Trio side."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive

    async def receive(self) -> Any:
        """The next message (an aio_pika IncomingMessage), within WAIT."""
        with trio.fail_after(WAIT):
            return await self._receive.receive()


class Amqp:
    """The tests' own connection to the broker."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.connection = connection
        self.suffix = secrets.token_hex(4)
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()

    def name(self, prefix: str) -> str:
        """An exchange name of this test alone, deleted at teardown."""
        name = f"{prefix}.t-{self.suffix}"
        self._exchanges.add(name)
        return name

    def track(self, *queues: str) -> None:
        """Delete these queues (the registry declared them) at teardown."""
        self._queues.update(queues)

    async def _on_channel(self, operation: Any) -> Any:
        """`operation(channel)` on a channel of its own: a refusal closes
        only that channel."""

        async def run() -> Any:
            channel = await self.connection.channel()
            try:
                return await operation(channel)
            finally:
                if not channel.is_closed:
                    await channel.close()

        return await aio_as_trio(run)()

    async def queue_messages(self, queue: str) -> int | None:
        """How many messages wait in `queue`; None if there is no such queue."""

        async def passive(channel: aio_pika.abc.AbstractChannel) -> int | None:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
            count: int = declared.declaration_result.message_count
            return count

        result: int | None = await self._on_channel(passive)
        return result

    async def exchange_is(self, exchange: str, kind: str) -> bool:
        """Whether `exchange` exists as a durable exchange of `kind`."""

        async def check(channel: aio_pika.abc.AbstractChannel) -> bool:
            try:
                await channel.declare_exchange(exchange, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            return True

        if not await self._on_channel(check):
            return False

        # Declaring it again as it is succeeds; with another type, the broker
        # refuses.
        async def same(channel: aio_pika.abc.AbstractChannel) -> bool:
            try:
                await channel.declare_exchange(exchange, kind, durable=True)
            except aiormq.exceptions.ChannelPreconditionFailed:
                return False
            return True

        result: bool = await self._on_channel(same)
        return result

    async def declare_exchange(self, exchange: str, kind: str) -> None:
        await self._on_channel(
            lambda channel: channel.declare_exchange(exchange, kind, durable=True)
        )

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, message_id: str = ""
    ) -> None:
        """Publish with confirms and mandatory routing: unroutable fails."""

        async def publish(channel: aio_pika.abc.AbstractChannel) -> None:
            target = await channel.get_exchange(exchange, ensure=False)
            await target.publish(
                aio_pika.Message(body, message_id=message_id or None),
                routing_key=routing_key,
                mandatory=True,
            )

        async def run() -> None:
            channel = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            try:
                await publish(channel)
            finally:
                await channel.close()

        await aio_as_trio(run)()

    @asynccontextmanager
    async def consume(self, queue: str) -> AsyncIterator[Subscription]:
        """Consume an existing queue (auto-ack) for the length of the block."""
        send, receive = trio.open_memory_channel[Any](math.inf)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            send.send_nowait(message)

        channel = await aio_as_trio(self.connection.channel)()
        try:
            declared = await aio_as_trio(channel.declare_queue)(queue, passive=True)
            await aio_as_trio(declared.consume)(on_message, no_ack=True)
            yield Subscription(receive)
        finally:
            with trio.CancelScope(shield=True):
                await aio_as_trio(channel.close)()

    @asynccontextmanager
    async def subscribe(
        self, exchange: str, routing_key: str = "#"
    ) -> AsyncIterator[Subscription]:
        """A queue of the test's own, bound to `exchange` (declared topic if
        missing), consumed for the length of the block."""
        queue = f"test/{exchange}/{secrets.token_hex(4)}"
        self.track(queue)

        async def declare(channel: aio_pika.abc.AbstractChannel) -> None:
            target = await channel.declare_exchange(exchange, "topic", durable=True)
            declared = await channel.declare_queue(queue, durable=False)
            await declared.bind(target, routing_key)

        await self._on_channel(declare)
        async with self.consume(queue) as subscription:
            yield subscription

    async def delete_declared(self) -> None:
        """Delete every exchange and queue the test declared or tracked; one
        that cannot be deleted does not keep the others."""

        async def delete(kind: str, name: str) -> None:
            async def run(channel: aio_pika.abc.AbstractChannel) -> None:
                # aio-pika's channels delete only what they declared;
                # aiormq's delete by name.
                underlay = await channel.get_underlay_channel()
                if kind == "queue":
                    await underlay.queue_delete(name)
                else:
                    await underlay.exchange_delete(name)

            with suppress(aiormq.exceptions.AMQPError):
                await self._on_channel(run)

        for queue in sorted(self._queues):
            await delete("queue", queue)
        for exchange in sorted(self._exchanges):
            await delete("exchange", exchange)


@asynccontextmanager
async def open_amqp(url: str) -> AsyncIterator[Amqp]:
    async with trio_asyncio.open_loop():
        connection = await aio_as_trio(aio_pika.connect)(url, timeout=WAIT)
        amqp = Amqp(connection)
        try:
            yield amqp
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(WAIT):
                try:
                    await amqp.delete_declared()
                finally:
                    await aio_as_trio(connection.close)()
