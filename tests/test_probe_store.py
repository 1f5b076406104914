"""The probe rows in Postgres: claims and leases, recording, generations,
history compaction. No replica runs here, so nothing claims behind the
test's back; two owners stand for two replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio_asyncio

from registry import probe_store, store, tokens
from registry.checks import ProbeResult
from registry.db import Database
from registry.health_machine import Policy
from registry.model import Api, CheckKind, HealthCheck, Registration, Status

POLICY = Policy(
    interval=10.0,
    timeout=1.0,
    failure_threshold=3,
    success_threshold=1,
    deregister_after=600.0,
    backoff_max=60.0,
)
TCP = HealthCheck(kind=CheckKind.TCP)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with trio_asyncio.open_loop(), Database.open(database_url) as opened:
        await opened.apply_schema()
        yield opened


async def register(
    db: Database, instance_id: str, check: HealthCheck | None = TCP, port: int = 0
) -> tokens.Token:
    """Store a registration; returns its token."""
    secret, secret_hash = tokens.new_secret()
    instance = await store.put_instance(
        db,
        Registration(
            name="billing",
            instance_id=instance_id,
            address="127.0.0.1",
            apis=(Api("grpc", port or 8000 + int(instance_id.split("-")[1])),),
            check=check,
        ),
        Status.PENDING if check else Status.ACTIVE,
        secret_hash,
    )
    return tokens.parse_token(tokens.format_token(instance.generation, secret))


async def claim(db: Database, owner: str, limit: int = 100) -> list[probe_store.Claim]:
    return await probe_store.claim_due(
        db, owner, limit, default_timeout=1.0, lease=10.0
    )


async def test_two_owners_claiming_at_once_never_get_the_same_probe(
    db: Database,
) -> None:
    for n in range(30):
        await register(db, f"b-{n}")
    got: dict[str, list[str]] = {}

    async def take(owner: str) -> None:
        got[owner] = [c.instance_id for c in await claim(db, owner, limit=20)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "a/1")
        nursery.start_soon(take, "b/1")

    assert not set(got["a/1"]) & set(got["b/1"])
    assert len(got["a/1"]) + len(got["b/1"]) == 30
    # Leased: nothing is left to claim until a lease ends or a probe is due.
    assert await claim(db, "c/1") == []


async def test_a_claim_carries_what_the_probe_needs(db: Database) -> None:
    await register(db, "b-1", HealthCheck(kind=CheckKind.HTTP, path="/ready"))
    await register(db, "b-2", check=None)

    [claimed] = await claim(db, "a/1")

    assert (claimed.name, claimed.instance_id, claimed.generation) == (
        "billing",
        "b-1",
        1,
    )
    assert claimed.check == HealthCheck(kind=CheckKind.HTTP, path="/ready")
    assert claimed.target.address == "127.0.0.1"
    assert claimed.target.apis == (Api("grpc", 8001),)
    assert claimed.due <= claimed.claimed_at
    assert claimed.lease_owner == "a/1"


async def test_recording_changes_the_status_writes_the_transition_and_sets_next_due(
    db: Database,
) -> None:
    await register(db, "b-1")
    [claimed] = await claim(db, "a/1")

    recorded = await probe_store.record(
        db, claimed, ProbeResult(True, latency=0.004), POLICY, guard_holds=False
    )

    assert recorded is not None
    assert recorded.step.transition == (Status.PENDING, Status.ACTIVE)
    event = await db.fetchrow(
        "SELECT type, status FROM registry.events WHERE revision = $1",
        recorded.revision,
    )
    assert event is not None
    assert tuple(event) == ("status_changed", "active")
    [transition] = await probe_store.history(db, "billing", "b-1", 10)
    assert (transition.from_status, transition.to_status) == (
        Status.PENDING,
        Status.ACTIVE,
    )
    assert transition.probe == ProbeResult(True, latency=0.004)
    row = await db.fetchrow(
        "SELECT lease_owner, successes, extract(epoch FROM next_due) AS due"
        " FROM registry.probes"
    )
    assert row is not None
    assert (row["lease_owner"], row["successes"]) == (None, 1)
    assert float(row["due"]) == pytest.approx(claimed.due + POLICY.interval)


async def test_an_expired_lease_passes_to_another_owner_and_the_late_record_is_dropped(
    db: Database,
) -> None:
    await register(db, "b-1")
    [first] = await claim(db, "a/1")
    assert await claim(db, "b/1") == []

    # The lease runs out (a/1 died, or hangs).
    await db.fetchval(
        "UPDATE registry.probes SET lease_expires = now() - interval '1 second'"
    )
    [second] = await claim(db, "b/1")
    late = await probe_store.record(
        db, first, ProbeResult(False, error="late"), POLICY, guard_holds=False
    )
    current = await probe_store.record(
        db, second, ProbeResult(True), POLICY, guard_holds=False
    )

    assert late is None
    assert current is not None
    row = await db.fetchrow(
        "SELECT failures, successes, last_error FROM registry.probes"
    )
    assert row is not None
    assert tuple(row) == (0, 1, "")


async def test_a_probe_of_an_older_generation_never_writes(db: Database) -> None:
    await register(db, "b-1")
    [old] = await claim(db, "a/1")
    await register(db, "b-1")

    recorded = await probe_store.record(
        db, old, ProbeResult(False, error="old"), POLICY, guard_holds=False
    )

    assert recorded is None
    row = await db.fetchrow(
        "SELECT generation, lease_owner, failures, next_due <= now() AS due"
        " FROM registry.probes"
    )
    assert row is not None
    # The new generation's row starts afresh, due at once.
    assert tuple(row) == (2, None, 0, True)
    [new] = await claim(db, "a/2")
    assert new.generation == 2


async def test_deregistration_by_probe_removes_instance_and_probe_row(
    db: Database,
) -> None:
    await register(db, "b-1")
    policy = Policy(10.0, 1.0, 1, 1, 0.001, 60.0)
    [first] = await claim(db, "a/1")
    await probe_store.record(db, first, ProbeResult(False), policy, guard_holds=False)
    await db.fetchval("UPDATE registry.probes SET next_due = now()")
    [second] = await claim(db, "a/2")

    held = await probe_store.record(
        db, second, ProbeResult(False), policy, guard_holds=True
    )
    await db.fetchval("UPDATE registry.probes SET next_due = now()")
    [third] = await claim(db, "a/3")
    gone = await probe_store.record(
        db, third, ProbeResult(False), policy, guard_holds=False
    )

    assert held is not None and held.step.held
    assert gone is not None and gone.step.deregister
    event = await db.fetchrow(
        "SELECT type FROM registry.events WHERE revision = $1", gone.revision
    )
    assert event is not None and event["type"] == "deregistered"
    assert await db.fetchval("SELECT count(*) FROM registry.probes") == 0
    assert await db.fetchval("SELECT count(*) FROM registry.instances") == 0


async def test_removing_the_check_or_the_instance_removes_its_probe_row(
    db: Database,
) -> None:
    token = await register(db, "b-1")
    await register(db, "b-2")
    await register(db, "b-2", check=None)
    assert await store.delete_instance(
        db, "billing", "b-1", token.generation, token.secret_hash
    )

    assert await db.fetchval("SELECT count(*) FROM registry.probes") == 0


async def test_release_gives_back_only_the_owners_leases(db: Database) -> None:
    for n in range(4):
        await register(db, f"b-{n}")
    await claim(db, "host:1:aa/1", limit=2)
    await claim(db, "host:2:bb/1", limit=2)

    released = await probe_store.release_leases(db, "host:1:aa/")

    assert released == 2
    assert len(await claim(db, "host:3:cc/1")) == 2


async def test_compaction_drops_only_transitions_older_than_the_retention(
    db: Database,
) -> None:
    await db.fetchval(
        """
        INSERT INTO registry.transitions (name, instance_id, generation,
            from_status, to_status, revision, created_at)
        VALUES ('billing', 'b-1', 1, 'pending', 'active', 1, now() - interval '2 days'),
               ('billing', 'b-1', 1, 'active', 'inactive', 2, now() - interval '1 hour')
        """
    )

    dropped = await probe_store.compact_transitions(db, 24 * 3600.0)

    assert dropped == 1
    [kept] = await probe_store.history(db, "billing", "", 10)
    assert kept.revision == 2
