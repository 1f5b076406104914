"""The queries of health probing: claiming due probes, recording outcomes,
heartbeats, drains and the transition history (tables in schema.sql).

Every function that changes a status does it with an UPDATE of
registry.instances, whose trigger records the status_changed event in the
same transaction, and writes the transition beside it. Rows are locked in
one order everywhere, the instance before its probe row, as Register and
Deregister do through their triggers, so that none of these deadlock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime

import asyncpg

from . import tokens
from .checks import ProbeResult, Target
from .db import Connection, Database
from .errors import FailedPrecondition, NotFound
from .health_machine import Policy, ProbeState, Step, next_due, observe
from .model import Api, CheckKind, HealthCheck, Status
from .store import check_from_json


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """A due probe leased to this replica."""

    name: str
    instance_id: str
    generation: int
    check: HealthCheck
    target: Target
    # When it was due and when it was claimed, in epoch seconds.
    due: float
    claimed_at: float
    lease_owner: str


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """What recording a probe's outcome did."""

    # The outcome recorded; for TTL checks, decided in the transaction.
    result: ProbeResult
    step: Step
    # The revision of the status change or deregistration, if any.
    revision: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Transition:
    name: str
    instance_id: str
    generation: int
    from_status: Status
    to_status: Status
    revision: int
    time: datetime
    # None for a change the service asked for (Drain).
    probe: ProbeResult | None


async def claim_due(
    db: Database,
    owner: str,
    limit: int,
    *,
    default_timeout: float,
    lease: float,
) -> list[Claim]:
    """Lease up to `limit` due probes to `owner`, oldest due first.

    A lease lasts the probe's timeout plus `lease` seconds: long enough to
    probe and record, short enough that another replica takes over soon
    after this one dies.
    """
    rows = await db.fetch(
        """
        UPDATE registry.probes AS p
        SET lease_owner = $1,
            lease_expires = now() + make_interval(secs =>
                coalesce((i.health_check->>'timeout_seconds')::float8, $3) + $4)
        FROM registry.instances AS i
        WHERE i.name = p.name AND i.instance_id = p.instance_id
          AND (p.name, p.instance_id) IN (
              SELECT name, instance_id FROM registry.probes
              WHERE next_due <= now()
                AND (lease_expires IS NULL OR lease_expires < now())
              ORDER BY next_due
              LIMIT $2
              FOR UPDATE SKIP LOCKED)
        RETURNING p.name, p.instance_id, p.generation, p.next_due,
                  now() AS claimed_at, i.address, i.apis, i.health_check
        """,
        owner,
        limit,
        default_timeout,
        lease,
    )
    claims = []
    for row in rows:
        check = check_from_json(row["health_check"])
        if check is None:
            continue
        claims.append(
            Claim(
                name=row["name"],
                instance_id=row["instance_id"],
                generation=row["generation"],
                check=check,
                target=Target(
                    row["address"],
                    tuple(Api(a["name"], a["port"]) for a in row["apis"]),
                ),
                due=row["next_due"].timestamp(),
                claimed_at=row["claimed_at"].timestamp(),
                lease_owner=owner,
            )
        )
    return claims


async def seconds_to_next_due(db: Database) -> float | None:
    """How long until some probe can be claimed; None when there are none."""
    # Two index scans: the earliest unleased row, and the leased rows (few:
    # those in flight) whose lease may end before that.
    seconds: float | None = await db.fetchval(
        """
        SELECT extract(epoch FROM least(
            (SELECT next_due FROM registry.probes WHERE lease_expires IS NULL
             ORDER BY next_due LIMIT 1),
            (SELECT min(greatest(next_due, lease_expires)) FROM registry.probes
             WHERE lease_expires IS NOT NULL)
        ) - now())
        """
    )
    return None if seconds is None else float(seconds)


async def release_leases(db: Database, owner_prefix: str) -> int:
    """Give back every lease whose owner starts with `owner_prefix`, but
    for rows another transaction holds (a registration replacing the probe,
    say): waiting for those could deadlock, and their leases expire anyway."""
    status = await db.fetchval(
        """
        WITH released AS (
            UPDATE registry.probes SET lease_owner = NULL, lease_expires = NULL
            WHERE (name, instance_id) IN (
                SELECT name, instance_id FROM registry.probes
                WHERE starts_with(lease_owner, $1)
                FOR UPDATE SKIP LOCKED
            )
            RETURNING 1
        ) SELECT count(*) FROM released
        """,
        owner_prefix,
    )
    return int(status)


async def record(
    db: Database,
    claim: Claim,
    result: ProbeResult | None,
    policy: Policy,
    *,
    guard_holds: bool,
) -> Recorded | None:
    """Record a probe's outcome, and the status change or deregistration it
    makes, in one transaction.

    `result` is None for a TTL check: whether its deadline passed is decided
    here. Returns None, writing nothing, when the claim no longer holds: the
    instance is gone or registered anew, or the lease passed to another
    replica (or a heartbeat came in time).
    """

    async def write(conn: Connection) -> Recorded | None:
        instance = await _lock_instance(conn, claim.name, claim.instance_id)
        if instance is None or instance["generation"] != claim.generation:
            return None
        probe = await _lock_probe(conn, claim.name, claim.instance_id)
        if probe is None or probe["lease_owner"] != claim.lease_owner:
            return None
        now: datetime = probe["now"]

        outcome = result
        if outcome is None:
            deadline: datetime | None = probe["ttl_deadline"]
            if deadline is not None and deadline > now:
                # A heartbeat came in while this replica held the lease.
                await conn.execute(
                    """
                    UPDATE registry.probes SET lease_owner = NULL,
                        lease_expires = NULL, next_due = ttl_deadline
                    WHERE name = $1 AND instance_id = $2
                    """,
                    claim.name,
                    claim.instance_id,
                )
                return None
            outcome = ProbeResult(False, error=_missed_heartbeat(deadline, now))

        state = _state(instance["status"], probe)
        step = observe(
            state, outcome.healthy, now.timestamp(), policy, guard_holds=guard_holds
        )
        if step.deregister:
            # The probe row goes with it (ON DELETE CASCADE).
            await conn.execute(
                "DELETE FROM registry.instances"
                " WHERE name = $1 AND instance_id = $2 AND generation = $3",
                claim.name,
                claim.instance_id,
                claim.generation,
            )
            # The trigger holds the counter's row lock until we commit, so
            # this is the revision it took.
            revision = await conn.fetchval("SELECT revision FROM registry.revision")
            return Recorded(outcome, step, revision)

        following = next_due(
            step.state, due=claim.due, started=claim.claimed_at, policy=policy
        )
        await conn.execute(
            """
            UPDATE registry.probes
            SET successes = $3, failures = $4, down_since = to_timestamp($5),
                next_due = to_timestamp($6), lease_owner = NULL,
                lease_expires = NULL, last_probe_at = now(), last_healthy = $7,
                last_code = $8, last_error = $9, last_latency_ms = $10
            WHERE name = $1 AND instance_id = $2
            """,
            claim.name,
            claim.instance_id,
            step.state.successes,
            step.state.failures,
            step.state.down_since,
            following,
            outcome.healthy,
            outcome.code,
            outcome.error,
            outcome.latency * 1000,
        )
        revision = None
        if step.transition is not None:
            revision = await _change_status(
                conn,
                claim.name,
                claim.instance_id,
                claim.generation,
                step.transition,
                outcome,
            )
        return Recorded(outcome, step, revision)

    return await db.transaction(write)


def _missed_heartbeat(deadline: datetime | None, now: datetime) -> str:
    if deadline is None:
        return "no heartbeat deadline is set"
    late = (now - deadline).total_seconds()
    return f"no heartbeat for {late:.1f}s past the TTL deadline"


def _state(status: str, probe: asyncpg.Record) -> ProbeState:
    down_since: datetime | None = probe["down_since"]
    return ProbeState(
        Status(status),
        successes=probe["successes"],
        failures=probe["failures"],
        down_since=None if down_since is None else down_since.timestamp(),
    )


async def _lock_instance(
    conn: Connection, name: str, instance_id: str
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT generation, status, token_hash, health_check, revision
        FROM registry.instances WHERE name = $1 AND instance_id = $2 FOR UPDATE
        """,
        name,
        instance_id,
    )
    return row


async def _lock_probe(
    conn: Connection, name: str, instance_id: str
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT *, now() AS now FROM registry.probes
        WHERE name = $1 AND instance_id = $2 FOR UPDATE
        """,
        name,
        instance_id,
    )
    return row


async def _change_status(
    conn: Connection,
    name: str,
    instance_id: str,
    generation: int,
    transition: tuple[Status, Status],
    probe: ProbeResult | None,
) -> int:
    before, after = transition
    revision: int = await conn.fetchval(
        """
        UPDATE registry.instances SET status = $4
        WHERE name = $1 AND instance_id = $2 AND generation = $3
        RETURNING revision
        """,
        name,
        instance_id,
        generation,
        after.value,
    )
    await conn.execute(
        """
        INSERT INTO registry.transitions (name, instance_id, generation,
            from_status, to_status, revision, probe_healthy, probe_code,
            probe_error, probe_latency_ms)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        """,
        name,
        instance_id,
        generation,
        before.value,
        after.value,
        revision,
        None if probe is None else probe.healthy,
        None if probe is None else probe.code,
        None if probe is None else probe.error,
        None if probe is None else probe.latency * 1000,
    )
    return revision


async def _owned_instance(
    conn: Connection, name: str, instance_id: str, token: tokens.Token
) -> asyncpg.Record:
    """The instance's row, locked, once `token` is proven to be its own."""
    instance = await _lock_instance(conn, name, instance_id)
    if instance is None:
        raise NotFound(f"no instance {instance_id!r} of {name!r} is registered")
    tokens.check_token(token, instance["generation"], bytes(instance["token_hash"]))
    return instance


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    status: Status
    ttl: float
    # The revision of the status change the heartbeat made, if any.
    revision: int | None


async def heartbeat(
    db: Database,
    name: str,
    instance_id: str,
    token: tokens.Token,
    policy_of: Callable[[HealthCheck], Policy],
) -> Heartbeat:
    """Renew a TTL-checked instance: its deadline moves one TTL ahead, and
    the heartbeat counts as one successful probe."""

    async def renew(conn: Connection) -> Heartbeat:
        instance = await _owned_instance(conn, name, instance_id, token)
        check = check_from_json(instance["health_check"])
        if check is None or check.kind is not CheckKind.TTL:
            kind = "no" if check is None else f"a {check.kind.value}"
            raise FailedPrecondition(
                f"{name}/{instance_id} has {kind} health check; only instances "
                "registered with a ttl check send heartbeats"
            )
        assert check.ttl_seconds is not None, "validation requires a ttl"
        probe = await _lock_probe(conn, name, instance_id)
        assert probe is not None, "the sync_probe trigger keeps a row"
        now: datetime = probe["now"]
        healthy = ProbeResult(True)
        step = observe(
            _state(instance["status"], probe), True, now.timestamp(), policy_of(check)
        )
        await conn.execute(
            """
            UPDATE registry.probes
            SET successes = $3, failures = 0, down_since = to_timestamp($4),
                ttl_deadline = now() + make_interval(secs => $5),
                next_due = now() + make_interval(secs => $5),
                last_probe_at = now(), last_healthy = true, last_code = 0,
                last_error = '', last_latency_ms = 0
            WHERE name = $1 AND instance_id = $2
            """,
            name,
            instance_id,
            step.state.successes,
            step.state.down_since,
            check.ttl_seconds,
        )
        revision = None
        if step.transition is not None:
            revision = await _change_status(
                conn,
                name,
                instance_id,
                instance["generation"],
                step.transition,
                healthy,
            )
        return Heartbeat(step.state.status, check.ttl_seconds, revision)

    return await db.transaction(renew)


async def drain(
    db: Database, name: str, instance_id: str, token: tokens.Token
) -> tuple[int, Status]:
    """Mark the instance DRAINING; returns the revision of that change (or
    of the instance, if it was draining already) and the status before."""

    async def mark(conn: Connection) -> tuple[int, Status]:
        instance = await _owned_instance(conn, name, instance_id, token)
        before = Status(instance["status"])
        if before is Status.DRAINING:
            return instance["revision"], before
        revision = await _change_status(
            conn,
            name,
            instance_id,
            instance["generation"],
            (before, Status.DRAINING),
            None,
        )
        return revision, before

    return await db.transaction(mark)


async def history(
    db: Database, name: str, instance_id: str, limit: int
) -> list[Transition]:
    """The newest transitions of a name, or of one of its instances."""
    rows = await db.fetch(
        """
        SELECT * FROM registry.transitions
        WHERE name = $1 AND ($2 = '' OR instance_id = $2)
        ORDER BY id DESC
        LIMIT $3
        """,
        name,
        instance_id,
        limit,
    )
    return [_transition(row) for row in rows]


def _transition(row: asyncpg.Record) -> Transition:
    probe = None
    if row["probe_healthy"] is not None:
        probe = ProbeResult(
            row["probe_healthy"],
            code=row["probe_code"] or 0,
            error=row["probe_error"] or "",
            latency=(row["probe_latency_ms"] or 0.0) / 1000,
        )
    return Transition(
        name=row["name"],
        instance_id=row["instance_id"],
        generation=row["generation"],
        from_status=Status(row["from_status"]),
        to_status=Status(row["to_status"]),
        revision=row["revision"],
        time=row["created_at"],
        probe=probe,
    )


async def compact_transitions(db: Database, retention_seconds: float) -> int:
    """Drop transitions older than the retention window; returns how many."""
    status: str = await db.run(
        lambda conn: conn.execute(
            "DELETE FROM registry.transitions"
            " WHERE created_at < now() - make_interval(secs => $1)",
            retention_seconds,
        )
    )
    return int(status.split()[-1])
