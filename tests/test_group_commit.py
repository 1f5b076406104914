"""Group commit: registrations that arrive together share one transaction,
each keeps its own outcome, and batches from two replicas never deadlock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import trio
import trio.testing
import trio_asyncio
from trio_asyncio import aio_as_trio

from harness import WAIT, grpc_client, registration, start_replica_behind_proxy
from registry import db as dbmod
from registry import store
from registry.db import Database
from registry.errors import AlreadyExists
from registry.group_commit import Committer, register_many
from registry.model import Api, CheckKind, HealthCheck, Instance, Registration, Status
from registry.v1 import registry_pb2 as pb


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with trio_asyncio.open_loop(), Database.open(database_url) as opened:
        await opened.apply_schema()
        yield opened


def on(address: str, instance_id: str, port: int = 8090) -> Registration:
    return Registration("billing", instance_id, address, apis=(Api("grpc", port),))


async def put(
    db: Database, registration: Registration, committer: Committer | None = None
) -> Instance:
    return await store.put_instance(
        db, registration, Status.ACTIVE, b"hash", committer=committer
    )


async def test_registrations_waiting_together_commit_in_one_batch_each_with_its_outcome(
    db: Database,
) -> None:
    holder = await put(db, on("10.0.0.1", "holder"))
    committer = Committer(db)
    outcomes: dict[str, Instance | Exception] = {}

    async def register(registration: Registration) -> None:
        try:
            outcomes[registration.instance_id] = await put(db, registration, committer)
        except AlreadyExists as exc:
            outcomes[registration.instance_id] = exc

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as committing:
            async with trio.open_nursery() as callers:
                for n in range(10):
                    callers.start_soon(register, on(f"10.0.1.{n}", f"b-{n}"))
                # The holder's port, named: refused, alone.
                callers.start_soon(register, on("10.0.0.1", "late"))
                # Every write waits in the queue before the committer runs.
                await trio.testing.wait_all_tasks_blocked()
                await committing.start(committer.run)
            committing.cancel_scope.cancel()

    assert (committer.batches, committer.writes) == (1, 11)
    refused = outcomes.pop("late")
    assert isinstance(refused, AlreadyExists)
    assert str(refused).startswith("apis[0].port: port 8090 on 10.0.0.1 is held by ")
    assert "holder" in str(refused)
    stored = [o for o in outcomes.values() if isinstance(o, Instance)]
    assert len(stored) == 10
    # One transaction: the revisions follow the holder's without a gap.
    assert sorted(i.revision for i in stored) == list(
        range(holder.revision + 1, holder.revision + 11)
    )
    events = await db.fetchval("SELECT count(*) FROM registry.events")
    assert events == 11


async def test_a_registration_whose_caller_left_before_its_batch_is_not_stored(
    db: Database,
) -> None:
    committer = Committer(db)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as committing:
            with trio.CancelScope() as gone:
                async with trio.open_nursery() as callers:
                    callers.start_soon(put, db, on("10.0.0.1", "b-1"), committer)
                    await trio.testing.wait_all_tasks_blocked()
                    gone.cancel()
            async with trio.open_nursery() as callers:
                callers.start_soon(put, db, on("10.0.0.2", "b-2"), committer)
                await trio.testing.wait_all_tasks_blocked()
                await committing.start(committer.run)
            committing.cancel_scope.cancel()

    rows = await db.fetch("SELECT instance_id FROM registry.instances")
    assert [row["instance_id"] for row in rows] == ["b-2"]
    assert (committer.batches, committer.writes) == (1, 1)


async def test_batches_of_two_replicas_over_the_same_entries_never_deadlock(
    database_url: str,
) -> None:
    # Two replicas' committers, each on a pool of its own, register the same
    # instances on the same addresses in opposite orders, round after round:
    # the batches must take their locks in one order, or they deadlock.
    addresses = [f"10.0.2.{n}" for n in range(6)]
    entries = [on(a, f"b-{n}", 9000 + n) for n, a in enumerate(addresses)]
    rounds = 15
    async with (
        trio_asyncio.open_loop(),
        Database.open(database_url) as first,
        Database.open(database_url) as second,
    ):
        await first.apply_schema()
        committers = [Committer(first), Committer(second)]
        stored: list[int] = []

        async def one(db: Database, r: Registration, committer: Committer) -> None:
            stored.append((await put(db, r, committer)).revision)

        async def replica(
            db: Database, committer: Committer, order: list[Registration]
        ) -> None:
            for _ in range(rounds):
                async with trio.open_nursery() as callers:
                    for registration in order:
                        callers.start_soon(one, db, registration, committer)

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for committer in committers:
                    await nursery.start(committer.run)
                async with trio.open_nursery() as writers:
                    writers.start_soon(replica, first, committers[0], entries)
                    writers.start_soon(replica, second, committers[1], entries[::-1])
                nursery.cancel_scope.cancel()

        head = await first.fetchval("SELECT revision FROM registry.revision")
        events = await first.fetch("SELECT revision FROM registry.events")
    total = 2 * rounds * len(entries)
    assert sorted(stored) == list(range(1, total + 1))
    assert head == total
    assert sorted(row["revision"] for row in events) == list(range(1, total + 1))
    # Some batches did hold several writes, or this tested nothing.
    assert sum(c.writes for c in committers) > sum(c.batches for c in committers)


async def waiting_for_a_lock(db: Database, pid: int) -> None:
    """Return once backend `pid` waits for a lock (polled: Postgres sends no
    signal for it)."""
    query = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
    with trio.fail_after(WAIT):
        while True:
            if await db.fetchval(query, pid):
                return
            await trio.sleep(0.01)


async def blocked_by(
    db: Database, pid: int, holder: Any, outcomes: dict[str, Any]
) -> None:
    """Return once backend `pid` waits for `holder`'s backend, or the batch
    has its outcome."""
    query = "SELECT $2::int = ANY(pg_blocking_pids($1))"
    with trio.fail_after(WAIT):
        while "batch" not in outcomes:
            if await db.fetchval(query, pid, holder.get_server_pid()):
                return
            await trio.sleep(0.01)


def item(instance_id: str, address: str, name: str = "svc") -> dict[str, object]:
    """registry.register_many's item for a plain registration."""
    return {
        "name": name,
        "instance_id": instance_id,
        "status": "active",
        "address": address,
        "address_key": address,
        "version": "",
        "description": "",
        "apis": [],
        "brokers": [],
        "metadata": {},
        "health_check": None,
        "token_hash": "00",
        "follows": [],
        "events_queue": "",
    }


async def test_batch_reads_its_own_rows_by_key_however_many_are_registered(
    db: Database,
) -> None:
    # A fleet: a batch that read whole tables to find its own rows would cost
    # more with each instance registered.
    def member(instance_id: str, address: str) -> dict[str, object]:
        return item(instance_id, address) | {
            "apis": [{"name": "grpc", "port": 8090}],
            "health_check": store.check_to_json(
                HealthCheck(CheckKind.TTL, ttl_seconds=60)
            ),
        }

    fleet = [member(f"i-{n}", f"10.1.{n // 250}.{n % 250}") for n in range(2000)]
    for part in range(0, len(fleet), 500):
        await register_many(db, fleet[part : part + 500])
    # As autovacuum would: the planner knows how big the tables are.
    await db.fetch("ANALYZE registry.instances, registry.ports, registry.probes")

    async def batch(conn: dbmod.Connection) -> dict[str, int]:
        # pg_stat_xact_* shows the backend's counts not yet flushed to the
        # shared statistics, which can hold earlier transactions' (it flushes
        # about once a second). Asked to flush the next time it is idle, as
        # it is right after this statement, it then counts the batch alone.
        await conn.execute("SELECT pg_stat_force_next_flush()")
        async with conn.transaction():
            await conn.fetch(
                "SELECT entry FROM registry.register_many($1)",
                [member("i-7", "10.1.0.7"), member("new", "10.2.0.1")],
            )
            rows = await conn.fetch(
                "SELECT relname, seq_scan FROM pg_stat_xact_user_tables"
                " WHERE schemaname = 'registry'"
                " AND relname IN ('instances', 'ports', 'probes')"
            )
        return {row["relname"]: row["seq_scan"] for row in rows}

    assert await db.run(batch) == {"instances": 0, "ports": 0, "probes": 0}


# How the other registration creates the row: as a replica does, or as a
# SQL caller of the function kept for them does.
CREATIONS = {
    "register_many": (
        "SELECT error_state FROM registry.register_many($1)",
        [item("i-1", "10.0.0.3")],
    ),
    "put_instance": (
        "SELECT revision FROM registry.put_instance('svc', 'i-1', 'active',"
        " '10.0.0.3', '', '', '[]', '[]', '{}', NULL, '\\x00'::bytea)",
    ),
}


@pytest.mark.parametrize("creation", list(CREATIONS))
async def test_batch_waits_for_an_instance_another_registration_is_creating(
    db: Database, database_url: str, creation: str
) -> None:
    """The order that once deadlocked: a batch registers an instance whose row
    another registration is creating, while a drain waits for the counter
    and, once the row exists, a heartbeat locks it."""
    await register_many(db, [item("z-1", "10.9.9.9", name="other")])
    sessions = [await dbmod.connect(database_url) for _ in range(4)]
    creating, draining, batch, beating = sessions
    for session in sessions:
        await aio_as_trio(session.set_type_codec)(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )

    async def run(session: Any, query: str, *args: Any) -> Any:
        return await aio_as_trio(session.fetch)(query, *args)

    many = "SELECT error_state, error_message FROM registry.register_many($1)"
    outcomes: dict[str, Any] = {}
    drained = trio.Event()

    async def keep(key: str, session: Any, query: str, *args: Any) -> None:
        outcomes[key] = await run(session, query, *args)
        if key == "drain":
            drained.set()

    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                # A registration of svc/i-1 at one address, not committed yet.
                await run(creating, "BEGIN")
                await run(creating, *CREATIONS[creation])
                # A drain of another instance, queued for the counter.
                await run(draining, "BEGIN")
                nursery.start_soon(
                    keep,
                    "drain",
                    draining,
                    "UPDATE registry.instances SET status = 'draining'"
                    " WHERE name = 'other'",
                )
                await waiting_for_a_lock(db, draining.get_server_pid())
                # The batch: svc/i-1 again, at another address.
                nursery.start_soon(
                    keep, "batch", batch, many, [item("i-1", "10.0.0.1")]
                )
                await waiting_for_a_lock(db, batch.get_server_pid())
                await run(creating, "COMMIT")
                await drained.wait()
                # The batch now holds the new row, and waits for the counter,
                # which the drain's open transaction has (unless it took the
                # counter first and is done).
                await blocked_by(db, batch.get_server_pid(), draining, outcomes)
                # A heartbeat of the row now there: it locks the row, then
                # waits for the counter (or for the batch, which has the row).
                await run(beating, "BEGIN")
                nursery.start_soon(
                    keep,
                    "beat",
                    beating,
                    "UPDATE registry.instances SET status = 'draining'"
                    " WHERE name = 'svc' AND instance_id = 'i-1'",
                )
                await waiting_for_a_lock(db, beating.get_server_pid())
                await run(draining, "COMMIT")
            await run(beating, "COMMIT")
    finally:
        for session in sessions:
            await aio_as_trio(session.close)()

    assert [tuple(row) for row in outcomes["batch"]] == [(None, None)]
    events = await db.fetch(
        "SELECT revision, type, instance_id FROM registry.events ORDER BY revision"
    )
    written = [(r["type"], r["instance_id"]) for r in events]
    assert written[:2] == [("registered", "z-1"), ("registered", "i-1")]
    # The drain and the batch both waited for the registration to commit;
    # either may take the counter first.
    assert sorted(written[2:4]) == [("status_changed", "z-1"), ("updated", "i-1")]
    assert written[4:] == [("status_changed", "i-1")]


async def test_register_while_the_database_is_cut_is_unavailable_then_works_again(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica, proxy = await start_replica_behind_proxy(nursery, database_url)
    async with grpc_client(replica.port or 0) as client:
        await client.call("Register", registration("billing", "b-1"))

        proxy.cut()
        with pytest.raises(grpc.RpcError) as cut:
            await client.call("Register", registration("billing", "b-2"))
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE

        # The replica's committer lived through it: the next batches go in,
        # once the pool has replaced the connections the cut broke (a call
        # that meets one first is refused, as a client would see and retry).
        proxy.heal()
        again = None
        with trio.fail_after(WAIT):
            while again is None:
                try:
                    again = await client.call(
                        "Register", registration("billing", "b-3")
                    )
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    await trio.sleep(0.05)
        listed = await client.call("List", pb.ListRequest(min_revision=again.revision))
    assert sorted(i.instance_id for i in listed.instances) == ["b-1", "b-3"]
    replica.stop()
