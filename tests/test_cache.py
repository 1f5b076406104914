"""The Resolve cache: its bookkeeping without I/O, then what clients of real
replicas see through it: their own writes at once, other replicas' writes
with their events."""

from __future__ import annotations

from typing import Any

import trio
import trio_asyncio
from test_hub import event

from harness import WAIT, grpc_client, registration, start_replica
from registry.cache import Answer, ResolveCache
from registry.db import Database
from registry.errors import NotFound
from registry.service import RegistryService, WatchSettings
from registry.v1 import registry_pb2 as pb
from registry.watch import Hub


def live_cache(size: int = 10) -> ResolveCache:
    cache = ResolveCache(size)
    cache.set_live(True)
    return cache


def filled(cache: ResolveCache, name: str, read_at: int = 1) -> Answer:
    fill = cache.begin(name)
    assert fill is not None
    answer = Answer(read_at, body=name.encode())
    cache.put(fill, answer)
    return answer


def test_cache_keeps_an_answer_until_an_event_of_its_name() -> None:
    cache = live_cache()
    billing = filled(cache, "billing")
    filled(cache, "orders")

    cache.observe(event(2, "orders"))

    assert cache.get("billing") is billing
    assert cache.get("orders") is None


def test_cache_drops_a_fill_that_an_event_overtook() -> None:
    cache = live_cache()
    fill = cache.begin("billing")
    assert fill is not None

    # The event commits after the read began; the read may predate it.
    cache.observe(event(7, "billing"))
    cache.put(fill, Answer(6, body=b"stale"))

    assert cache.get("billing") is None
    # A fill that began after the event is kept.
    assert filled(cache, "billing", read_at=7) is cache.get("billing")


def test_cache_forgets_a_name_written_through_this_replica() -> None:
    cache = live_cache()
    filled(cache, "billing")
    fill = cache.begin("orders")
    assert fill is not None

    cache.forget("billing")
    cache.forget("orders")
    cache.put(fill, Answer(3, body=b"before the write"))

    assert (cache.get("billing"), cache.get("orders")) == (None, None)


def test_cache_holds_nothing_while_not_live() -> None:
    cache = live_cache()
    filled(cache, "billing")
    fill = cache.begin("orders")
    assert fill is not None

    cache.set_live(False)
    cache.put(fill, Answer(3, body=b"read while events may be missed"))

    assert len(cache) == 0
    assert cache.begin("billing") is None
    cache.set_live(True)
    assert cache.begin("billing") is not None


def test_cache_drops_the_least_recently_used_answer_beyond_its_size() -> None:
    cache = live_cache(size=2)
    filled(cache, "billing")
    filled(cache, "orders")
    cache.get("billing")

    filled(cache, "payments")

    assert [n for n in ("billing", "orders", "payments") if cache.get(n)] == [
        "billing",
        "payments",
    ]
    assert ResolveCache(0).begin("billing") is None


def test_cache_keeps_errors_by_kind_and_message() -> None:
    cache = live_cache()
    fill = cache.begin("billing")
    assert fill is not None
    cache.put(fill, Answer(4, error=(NotFound, "no instance of 'billing'")))

    answer = cache.get("billing")

    assert answer is not None and answer.error == (
        NotFound,
        "no instance of 'billing'",
    )


def instance_ids(response: pb.ResolveResponse) -> list[str]:
    return sorted(i.instance_id for i in response.instances)


async def test_resolve_through_the_cache_reads_own_writes_and_other_replicas_events(
    nursery: trio.Nursery, database_url: str
) -> None:
    a = await start_replica(nursery, database_url)
    b = await start_replica(nursery, database_url)
    assert a.port is not None and b.port is not None
    async with grpc_client(a.port) as on_a, grpc_client(b.port) as on_b:
        registered = await on_a.call("Register", registration("billing", "b-1"))
        # Once A has its event: the event would drop an answer filled before.
        with trio.fail_after(WAIT):
            await a.hub.wait_for(registered.revision)
        first = await on_a.call("Resolve", pb.ResolveRequest(name="billing"))
        assert instance_ids(first) == ["b-1"]
        # Answered once from the database, then held.
        assert a.hub.cache.get("billing") is not None

        # A write through A: the next Resolve on A has it, events or not.
        await on_a.call("Register", registration("billing", "b-2"))
        own = await on_a.call("Resolve", pb.ResolveRequest(name="billing"))
        assert instance_ids(own) == ["b-1", "b-2"]

        # A write through B reaches A's cache with its event.
        third = await on_b.call("Register", registration("billing", "b-3"))
        with trio.fail_after(WAIT):
            await a.hub.wait_for(third.revision)
        seen = await on_a.call("Resolve", pb.ResolveRequest(name="billing"))
        assert instance_ids(seen) == ["b-1", "b-2", "b-3"]
        assert seen.revision >= third.revision

        # And with min_revision, at once, whatever A's notifier has seen.
        drained = await on_b.call(
            "Drain",
            pb.DrainRequest(name="billing", instance_id="b-3", token=third.token),
        )
        after = await on_a.call(
            "Resolve", pb.ResolveRequest(name="billing", min_revision=drained.revision)
        )
        assert instance_ids(after) == ["b-1", "b-2"]
        assert after.revision >= drained.revision


async def test_resolve_reads_a_write_through_its_replica_before_any_event(
    database_url: str,
) -> None:
    # The Registry service alone, with its hub live and no notifier: no event
    # ever reaches the cache, so only the write itself can make it drop the
    # answer it holds.
    async with trio_asyncio.open_loop(), Database.open(database_url) as db:
        await db.apply_schema()
        hub = Hub(cache=ResolveCache(10))
        hub.set_live(True)
        service = RegistryService(db, hub, WatchSettings())
        # Handlers that do not stream ignore their Call.
        call: Any = None

        def resolved(body: bytes) -> list[str]:
            return instance_ids(pb.ResolveResponse.FromString(body))

        await service.register(registration("billing", "b-1"), call)
        first = await service.resolve(pb.ResolveRequest(name="billing"), call)
        await service.register(registration("billing", "b-2"), call)
        second = await service.resolve(pb.ResolveRequest(name="billing"), call)

    assert resolved(first) == ["b-1"]
    assert resolved(second) == ["b-1", "b-2"]


async def test_resolve_read_from_the_database_reports_the_revision_it_read_at(
    database_url: str,
) -> None:
    # A hub that has gone past the read (as it can while the read runs):
    # the answer must not claim its revision, or a client watching from it
    # would skip what the read did not see.
    async with trio_asyncio.open_loop(), Database.open(database_url) as db:
        await db.apply_schema()
        hub = Hub(revision=100, cache=ResolveCache(10))
        service = RegistryService(db, hub, WatchSettings())
        call: Any = None

        registered = await service.register(registration("billing", "b-1"), call)
        body = await service.resolve(pb.ResolveRequest(name="billing"), call)

    assert pb.ResolveResponse.FromString(body).revision == registered.revision == 1
