"""The registry's queries. Every write goes through registry.instances, whose
trigger records the event (see schema.sql); nothing here writes events."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from .db import Connection, Database
from .errors import AlreadyExists, Unavailable
from .group_commit import Committer, Refused, register_many
from .hostports import free_port_check
from .model import (
    Api,
    Broker,
    BrokerType,
    CheckKind,
    Event,
    EventType,
    HealthCheck,
    Instance,
    Registration,
    Status,
)
from .ports import (
    DEFAULT_POLICY,
    Holder,
    PortMode,
    PortPolicy,
    address_key,
    assign,
    held_error,
)

log = logging.getLogger("registry.store")

_INSTANCE_COLUMNS = """
    name, instance_id, generation, status, address, version, description, apis,
    brokers, metadata, health_check, registered_at, updated_at, revision,
    follows, events_queue
"""


# registry.register's SQLSTATE for a port another instance holds.
_PORT_HELD = "RG001"
_UNIQUE_VIOLATION = "23505"
# A deadlock or a serialization failure: undone, and worth trying again.
_TRY_AGAIN = ("40P01", "40001")
# Rounds of choosing ports from the local range before a registration gives
# up: each lost one means another registration took a chosen port meanwhile.
_CHOICE_ATTEMPTS = 5


def check_to_json(check: HealthCheck | None) -> dict[str, Any] | None:
    return None if check is None else dataclasses.asdict(check)


def check_from_json(data: dict[str, Any] | None) -> HealthCheck | None:
    if data is None:
        return None
    return HealthCheck(**{**data, "kind": CheckKind(data["kind"])})


def _timestamp(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def instance_from_row(row: asyncpg.Record | dict[str, Any]) -> Instance:
    """An Instance from a registry.instances row or an event's entry."""
    return Instance(
        name=row["name"],
        instance_id=row["instance_id"],
        generation=row["generation"],
        status=Status(row["status"]),
        address=row["address"],
        version=row["version"],
        description=row["description"],
        apis=tuple(Api(a["name"], a["port"]) for a in row["apis"]),
        brokers=tuple(
            Broker(b["exchange"], b["routing_key"], BrokerType(b["type"]), b["queue"])
            for b in row["brokers"]
        ),
        metadata=dict(row["metadata"]),
        check=check_from_json(row["health_check"]),
        registered_at=_timestamp(row["registered_at"]),
        updated_at=_timestamp(row["updated_at"]),
        revision=row["revision"],
        # Events logged before these columns existed have neither.
        follows=tuple(row.get("follows") or ()),
        events_queue=row.get("events_queue") or "",
    )


def event_from_row(row: asyncpg.Record) -> Event:
    return Event(
        revision=row["revision"],
        type=EventType(row["type"]),
        name=row["name"],
        instance_id=row["instance_id"],
        instance=instance_from_row(row["entry"]),
        time=row["created_at"],
    )


async def put_instance(
    db: Database,
    registration: Registration,
    status: Status,
    token_hash: bytes,
    *,
    ports: PortPolicy = DEFAULT_POLICY,
    events_queue: str = "",
    committer: Committer | None = None,
) -> Instance:
    """Store `registration` as the next generation of its instance, with the
    ports `ports` assigns to its APIs.

    AlreadyExists if a port it names is held by another instance on its
    address; ResourceExhausted if no port is left to assign.

    The write goes through `committer`, in a batch with the registrations
    that arrive with it (registry.register_many); without one, in a batch of
    its own. Only an API that asks for a port from the local range costs a
    read before it: what its address holds, to choose from. Another
    registration may take a chosen port in between; registry.register then
    refuses it, and the choice is made again.
    """
    address = address_key(registration.address)
    choose = ports.mode is PortMode.LOCAL and any(
        api.port == 0 for api in registration.apis
    )
    is_free = free_port_check(address) if choose else None
    conflict: Refused | None = None
    for _ in range(_CHOICE_ATTEMPTS):
        held: dict[int, Holder] = {}
        previous: dict[str, int] = {}
        if choose:
            held, previous = await _held_ports(db, address, registration)
        apis = assign(
            registration.apis,
            ports,
            address=registration.address,
            held=held,
            previous=previous,
            is_free=is_free,
            offset=random.randrange(len(ports.range)),
        )
        item = {
            "name": registration.name,
            "instance_id": registration.instance_id,
            "status": status.value,
            "address": registration.address,
            "address_key": address,
            "version": registration.version,
            "description": registration.description,
            "apis": [dataclasses.asdict(api) for api in apis],
            "brokers": [dataclasses.asdict(broker) for broker in registration.brokers],
            "metadata": registration.metadata,
            "health_check": check_to_json(registration.check),
            "token_hash": token_hash.hex(),
            "follows": list(registration.follows),
            "events_queue": events_queue,
        }
        try:
            if committer is None:
                [outcome] = await register_many(db, [item])
                if isinstance(outcome, Refused):
                    raise outcome
                entry = outcome
            else:
                entry = await committer.register(item)
        except Refused as exc:
            if exc.sqlstate == _UNIQUE_VIOLATION:
                # Only a writer that skipped the address's lock gets here.
                raise AlreadyExists(
                    f"apis: a port of this registration on {registration.address} "
                    "was taken at the same moment by another writer; register again"
                ) from None
            if exc.sqlstate in _TRY_AGAIN:
                # The batch's locks are taken in one order that every writer
                # keeps, so this is not expected; if it comes, the write was
                # undone alone and goes into the next batch.
                log.warning(
                    "registration of %s/%s hit %s; trying again",
                    registration.name,
                    registration.instance_id,
                    exc,
                )
                conflict = exc
                continue
            if exc.sqlstate != _PORT_HELD or exc.detail is None:
                raise RuntimeError(
                    f"registry.register failed: {exc} (SQLSTATE {exc.sqlstate})"
                ) from None
            holder = json.loads(exc.detail)
            index = next(i for i, a in enumerate(apis) if a.port == holder["port"])
            if not choose or registration.apis[index].port:
                # Named by the service, or fixed by the port mode: refused.
                raise held_error(
                    f"apis[{index}].port",
                    holder["port"],
                    registration.address,
                    Holder(holder["name"], holder["instance_id"], holder["api"]),
                ) from None
            # Chosen here, and taken meanwhile: choose again.
            conflict = None
            continue
        return instance_from_row(entry)
    if conflict is not None:
        raise Unavailable(
            f"registration of {registration.name}/{registration.instance_id} "
            f"failed {_CHOICE_ATTEMPTS} times on concurrent writes ({conflict}); "
            "retry shortly"
        )
    raise AlreadyExists(
        f"apis: the ports chosen on {registration.address} were taken by other "
        f"registrations at the same moment, {_CHOICE_ATTEMPTS} times; register again"
    )


async def _held_ports(
    db: Database, address: str, registration: Registration
) -> tuple[dict[int, Holder], dict[str, int]]:
    """The ports other instances hold on `address`, and those the
    registering instance held there before, by API."""
    held: dict[int, Holder] = {}
    previous: dict[str, int] = {}
    for row in await db.fetch(
        "SELECT port, name, instance_id, api FROM registry.ports WHERE address = $1",
        address,
    ):
        if (row["name"], row["instance_id"]) == (
            registration.name,
            registration.instance_id,
        ):
            previous[row["api"]] = row["port"]
        else:
            held[row["port"]] = Holder(row["name"], row["instance_id"], row["api"])
    return held, previous


async def credentials(
    db: Database, name: str, instance_id: str
) -> tuple[int, bytes] | None:
    """The current generation and token hash of an instance, if it exists."""
    row = await db.fetchrow(
        "SELECT generation, token_hash FROM registry.instances"
        " WHERE name = $1 AND instance_id = $2",
        name,
        instance_id,
    )
    return None if row is None else (row["generation"], bytes(row["token_hash"]))


async def delete_instance(
    db: Database, name: str, instance_id: str, generation: int, token_hash: bytes
) -> int | None:
    """Delete the instance if it is still at `generation` with this token.

    Returns the revision of the deregistration, or None if the instance has
    moved on (or is gone) since the caller looked.
    """

    async def delete(conn: Connection) -> int | None:
        deleted = await conn.fetchval(
            "DELETE FROM registry.instances WHERE name = $1 AND instance_id = $2"
            " AND generation = $3 AND token_hash = $4 RETURNING true",
            name,
            instance_id,
            generation,
            token_hash,
        )
        if not deleted:
            return None
        # The trigger holds the counter's row lock until we commit, so this is
        # the revision it took.
        revision: int = await conn.fetchval("SELECT revision FROM registry.revision")
        return revision

    return await db.transaction(delete)


async def select_instances(
    db: Database,
    *,
    names: Sequence[str] = (),
    status: Status | None = None,
    version: str = "",
) -> tuple[int, list[Instance]]:
    """Matching instances and the revision they were read at, in one snapshot."""
    rows = await db.fetch(
        f"""
        SELECT r.revision AS head, i.* FROM registry.revision AS r
        LEFT JOIN LATERAL (
            SELECT {_INSTANCE_COLUMNS} FROM registry.instances
            WHERE (cardinality($1::text[]) = 0 OR name = ANY($1::text[]))
              AND ($2::text IS NULL OR status = $2::text)
              AND ($3::text = '' OR version = $3::text)
            ORDER BY name, instance_id
        ) AS i ON true
        """,
        list(names),
        None if status is None else status.value,
        version,
    )
    head: int = rows[0]["head"]
    return head, [instance_from_row(row) for row in rows if row["name"] is not None]


@dataclasses.dataclass(frozen=True, slots=True)
class EventPage:
    """Events after a revision, read in one snapshot with the log's bounds."""

    events: list[Event]
    # The newest revision written when the page was read.
    head: int
    # Events up to this revision are gone from the log.
    compacted: int


async def events_after(
    db: Database,
    after: int,
    *,
    names: Sequence[str] = (),
    limit: int = 1000,
) -> EventPage:
    query = """
        SELECT r.revision AS head, r.compacted, e.* FROM registry.revision AS r
        LEFT JOIN LATERAL (
            SELECT revision, type, name, instance_id, entry, created_at
            FROM registry.events
            WHERE revision > $1
              AND (cardinality($2::text[]) = 0 OR name = ANY($2::text[]))
            ORDER BY revision
            LIMIT $3
        ) AS e ON true
    """
    rows = await db.fetch(query, after, list(names), limit)
    return EventPage(
        events=[event_from_row(row) for row in rows if row["revision"] is not None],
        head=rows[0]["head"],
        compacted=rows[0]["compacted"],
    )


async def head_revision(db: Database) -> int:
    revision: int = await db.fetchval("SELECT revision FROM registry.revision")
    return revision


async def instance_counts(db: Database) -> tuple[int, dict[str, int]]:
    """The newest revision, and how many instances have each status."""
    rows = await db.fetch(
        """
        SELECT r.revision, i.status, i.n FROM registry.revision AS r
        LEFT JOIN LATERAL (
            SELECT status, count(*) AS n FROM registry.instances GROUP BY status
        ) AS i ON true
        """
    )
    counts = {row["status"]: row["n"] for row in rows if row["status"] is not None}
    return rows[0]["revision"], counts


async def compact_events(
    db: Database,
    retention_seconds: float,
    *,
    keep_unpublished: bool = False,
    publisher_gone_after: float = 24 * 3600.0,
) -> int:
    """Drop events older than the retention window; returns how many.

    The newest event is always kept, so the log never forgets the head; with
    `keep_unpublished` (a broker is configured), so is every event the outbox
    has not published yet. So it is, too, while any replica has published
    within `publisher_gone_after` seconds: a replica run without a broker must
    not drop what the others have still to publish. A registry whose broker
    was taken away compacts as usual once that time has passed.
    """

    async def compact(conn: Connection) -> int:
        upto: int | None = await conn.fetchval(
            """
            SELECT max(revision) FROM registry.events
            WHERE created_at < now() - make_interval(secs => $1)
              AND revision < (SELECT revision FROM registry.revision)
              AND (NOT ($2 OR (SELECT coalesce(
                                    published_at > now() - make_interval(secs => $3),
                                    false)
                                FROM registry.outbox))
                   OR revision <= (SELECT published FROM registry.outbox))
            """,
            retention_seconds,
            keep_unpublished,
            publisher_gone_after,
        )
        if upto is None:
            return 0
        status = await conn.execute(
            "DELETE FROM registry.events WHERE revision <= $1", upto
        )
        await conn.execute(
            "UPDATE registry.revision SET compacted = greatest(compacted, $1)", upto
        )
        return int(status.split()[-1])

    return await db.transaction(compact)


async def publish_events(
    db: Database,
    limit: int,
    publish: Callable[[list[Event]], Awaitable[int]],
) -> int | None:
    """Publish the next unpublished events, in revision order, if this replica
    can claim the outbox; None when another replica holds it.

    `publish` is asyncio code, awaited inside the transaction that holds the
    claim: it publishes the events it is given, in order, and returns how
    many of them (from the first) the broker has confirmed. Those are marked
    published in the same transaction; the rest stay for the next claim.
    Returns how many were marked.
    """

    async def claim_and_publish(conn: Connection) -> int | None:
        published: int | None = await conn.fetchval(
            "SELECT published FROM registry.outbox FOR UPDATE SKIP LOCKED"
        )
        if published is None:
            return None
        rows = await conn.fetch(
            "SELECT revision, type, name, instance_id, entry, created_at"
            " FROM registry.events WHERE revision > $1 ORDER BY revision LIMIT $2",
            published,
            limit,
        )
        if not rows:
            return 0
        events = [event_from_row(row) for row in rows]
        confirmed = await publish(events)
        if confirmed:
            await conn.execute(
                "UPDATE registry.outbox SET published = $1, published_at = now()",
                events[confirmed - 1].revision,
            )
        return confirmed

    return await db.transaction(claim_and_publish)


async def outbox_backlog(db: Database) -> int:
    """How many events wait to be published."""
    backlog: int = await db.fetchval("SELECT registry.outbox_backlog()")
    return backlog
