"""The notifier against real Postgres trouble: a LISTEN connection killed
under it, and a wake-up that never comes. Writes are made with SQL, the way
a write through another replica reaches the database."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
import trio
import trio_asyncio

from harness import (
    WAIT,
    grpc_client,
    logged,
    registration,
    start_replica,
    start_replica_behind_proxy,
    watch_stream,
)
from registry import db as dbmod
from registry.db import Connection, Database
from registry.notifier import APPLICATION_NAME, CHANNEL
from registry.v1 import registry_pb2 as pb

# One registration, as a replica writes it (the trigger records the event).
PUT_INSTANCE = r"""
    SELECT revision FROM registry.put_instance(
        $1, $2, 'active', '127.0.0.1', '', '', '[]', '[]', '{}', NULL, '\x00')
"""


async def test_notifier_reconnects_and_reads_on_from_its_last_revision(
    nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Events committed while the LISTEN connection is gone, whose NOTIFY it
    therefore never gets, reach the watchers once it is back."""
    caplog.set_level(logging.INFO, logger="registry.notifier")
    # A poll much longer than the test: only the reconnect can find the rows.
    replica = await start_replica(nursery, database_url, poll_interval=600)
    assert replica.port is not None

    async def write_and_kill_the_listener(conn: Connection) -> tuple[list[int], Any]:
        revisions = [
            await conn.fetchval(PUT_INSTANCE, "billing", f"sql-{n}") for n in range(3)
        ]
        # The writes commit right after: the notifier is still noticing the
        # loss or waiting out its reconnection backoff (50 ms at least).
        killed = await conn.fetchval(
            "SELECT array_agg(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1",
            APPLICATION_NAME,
        )
        return revisions, killed

    async with (
        grpc_client(replica.port) as client,
        watch_stream(client.stub, pb.WatchRequest(snapshot=True)) as stream,
        trio_asyncio.open_loop(),
        Database.open(database_url) as db,
    ):
        assert await stream.snapshot() == ([], 0)
        for n in range(2):
            await client.call("Register", registration("billing", f"grpc-{n}"))
        seen = [(await stream.receive_event()).revision for _ in range(2)]

        revisions, killed = await db.transaction(write_and_kill_the_listener)
        assert killed == [True]
        assert revisions == [3, 4, 5]
        seen += [(await stream.receive_event()).revision for _ in range(3)]

        for n in range(2, 4):
            await client.call("Register", registration("billing", f"grpc-{n}"))
        seen += [(await stream.receive_event()).revision for _ in range(2)]

    assert seen == [1, 2, 3, 4, 5, 6, 7]
    assert any(
        m.startswith("lost the database while listening for events")
        for m in caplog.messages
    )
    # Caught up from the rows before listening again: the NOTIFYs were lost.
    assert "listening for events after revision 5" in caplog.messages


async def test_notifier_poll_finds_events_whose_notify_was_lost(
    nursery: trio.Nursery, database_url: str
) -> None:
    """A missed NOTIFY costs latency, never an event.

    Postgres hands every NOTIFY of a committed transaction to a live
    listener, so a lost wake-up cannot be provoked by timing. Instead the
    write commits with the trigger's `pg_notify` call resolved, through that
    transaction's search_path, to a no-op of the same name: the event row is
    there and no notification is sent, exactly what a lost one looks like
    to the notifier. A second LISTEN connection proves no NOTIFY went out
    (notifications arrive in commit order, so the next one it gets is the
    later write's); the notifier must find the row at its next poll.
    """
    replica = await start_replica(nursery, database_url, poll_interval=0.2)
    assert replica.port is not None

    async def write_quietly(conn: Connection) -> int:
        await conn.execute("SET LOCAL search_path = quiet, pg_catalog, public")
        revision: int = await conn.fetchval(PUT_INSTANCE, "billing", "quiet")
        return revision

    notified_in, notified = trio.open_memory_channel[int](math.inf)

    def on_notify(*args: Any) -> None:
        notified_in.send_nowait(json.loads(args[-1])["revision"])

    async with (
        grpc_client(replica.port) as client,
        watch_stream(client.stub, pb.WatchRequest(snapshot=True)) as stream,
        trio_asyncio.open_loop(),
        Database.open(database_url) as db,
    ):
        await db.run(
            lambda conn: conn.execute(
                "CREATE SCHEMA quiet;"
                " CREATE FUNCTION quiet.pg_notify(text, text) RETURNS void"
                " LANGUAGE sql AS 'SELECT null::void'"
            )
        )
        listener = await dbmod.connect(database_url)
        try:
            await trio_asyncio.aio_as_trio(listener.add_listener)(CHANNEL, on_notify)
            assert await stream.snapshot() == ([], 0)

            quiet = await db.transaction(write_quietly)
            event = await stream.receive_event()
            assert (event.revision, event.instance.instance_id) == (quiet, "quiet")

            loud = await client.call("Register", registration("billing", "loud"))
            assert (await stream.receive_event()).revision == loud.revision
            with trio.fail_after(WAIT):
                assert await notified.receive() == loud.revision == quiet + 1
        finally:
            await trio_asyncio.aio_as_trio(listener.close)()


async def test_notifier_notices_a_silent_partition_by_its_deadline_query(
    nursery: trio.Nursery, database_url: str
) -> None:
    """A partition that closes nothing (no RST, no FIN) shows only as the
    periodic query going unanswered; the notifier then reconnects and reads
    what was written meanwhile."""
    replica, proxy = await start_replica_behind_proxy(
        nursery, database_url, poll_interval=0.2
    )
    assert replica.port is not None

    async with (
        grpc_client(replica.port) as client,
        watch_stream(client.stub, pb.WatchRequest(snapshot=True)) as stream,
        trio_asyncio.open_loop(),
        Database.open(database_url) as db,
    ):
        assert await stream.snapshot() == ([], 0)
        with logged("registry.notifier", "lost the database while listening") as lost:
            proxy.pause()
            written = [
                await db.fetchval(PUT_INSTANCE, "billing", f"sql-{n}") for n in range(2)
            ]
            with trio.fail_after(WAIT):
                await lost.wait()
        proxy.resume()

        # The partition lasted past the progress interval: skip progress.
        seen: list[int] = []
        while len(seen) < len(written):
            response = await stream.receive()
            if response.WhichOneof("kind") == "event":
                seen.append(response.event.revision)
    assert seen == written == [1, 2]
