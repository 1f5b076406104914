"""What the supervisor promises beyond its tasks: an error that asyncio would
only log does not bring the replica down, and a transaction cancelled at any
point leaves neither rows nor a lost connection behind."""

from __future__ import annotations

import logging

import pytest
import trio
import trio_asyncio

from harness import WAIT, grpc_client, logged, registration, start_replica
from registry.db import Connection, Database
from registry.v1 import registry_pb2 as pb


async def test_stray_asyncio_error_is_logged_and_the_replica_serves_on(
    nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None and replica.asyncio_loop is not None

    def broken_callback() -> None:
        raise RuntimeError("a library callback failed")

    with logged("registry.app", "asyncio reported an error") as reported:
        replica.asyncio_loop.call_soon(broken_callback)
        with trio.fail_after(WAIT):
            await reported.wait()

    async with grpc_client(replica.port) as client:
        await client.call("Register", registration("billing", "b-1"))
        listed = await client.call("List", pb.ListRequest())
    assert [i.instance_id for i in listed.instances] == ["b-1"]
    [record] = [r for r in caplog.records if r.name == "registry.app" and r.exc_info]
    assert record.levelno == logging.ERROR
    assert "a library callback failed" in str(record.exc_info[1])  # type: ignore[index]
    replica.stop()


async def test_transactions_cancelled_at_any_point_leave_no_rows_and_no_lost_connection(
    database_url: str,
) -> None:
    # One connection in the pool: one that a cancellation leaked would make
    # the next statement wait for ever.
    async with trio_asyncio.open_loop(), Database.open(database_url, max_size=1) as db:
        await db.run(lambda conn: conn.execute("CREATE TABLE written (n int)"))

        async def write(conn: Connection) -> None:
            await conn.execute("INSERT INTO written VALUES (1)")
            await conn.execute("SELECT pg_sleep(0.05)")
            await conn.execute("INSERT INTO written VALUES (2)")

        # Cancelled earlier and later, from before the first statement to
        # the commit itself.
        for step in range(12):
            with trio.move_on_after(step * 0.01):
                await db.transaction(write)
            with trio.fail_after(WAIT):
                rows = await db.fetch("SELECT n FROM written")
            assert [r["n"] for r in rows] in ([], [1, 2]), step
            await db.run(lambda conn: conn.execute("TRUNCATE written"))
