"""Group commit: registrations that arrive together share one transaction,
each keeps its own outcome, and batches from two replicas never deadlock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
import trio_asyncio

from harness import WAIT
from registry import store
from registry.db import Database
from registry.errors import AlreadyExists
from registry.group_commit import Committer
from registry.model import Api, Instance, Registration, Status


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
