"""Tests of schema.sql: applied at every boot, idempotently and one replica at
a time; its views for SQL consumers; and its place in the wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from brokers import Amqp
from harness import WAIT, GrpcClient, grpc_client, registration, start_replica
from registry.app import Replica
from registry.db import Database
from registry.v1 import registry_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def connect(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection; the caller has opened a trio-asyncio loop."""
    connection = await aio_as_trio(asyncpg.connect)(database_url, timeout=WAIT)
    try:
        yield connection
    finally:
        await aio_as_trio(connection.close)()


async def sql(connection: asyncpg.Connection, query: str, *args: Any) -> Any:
    return await aio_as_trio(connection.fetch)(query, *args)


async def state(connection: asyncpg.Connection) -> dict[str, Any]:
    """Everything the registry stores, to compare before and after."""
    return {
        "revision": [
            tuple(r) for r in await sql(connection, "SELECT * FROM registry.revision")
        ],
        "instances": [
            tuple(r)
            for r in await sql(
                connection,
                "SELECT * FROM registry.instances ORDER BY name, instance_id",
            )
        ],
        "events": [
            tuple(r)
            for r in await sql(
                connection, "SELECT * FROM registry.events ORDER BY revision"
            )
        ],
    }


async def test_schema_applies_again_without_error_and_keeps_the_data(
    nursery: trio.Nursery, database_url: str
) -> None:
    first = await start_replica(nursery, database_url)
    assert first.port is not None
    async with grpc_client(first.port) as client:
        kept = await client.call("Register", registration(instance_id="billing-1"))
        gone = await client.call("Register", registration(instance_id="billing-2"))
        await client.call(
            "Deregister",
            pb.DeregisterRequest(
                name="billing", instance_id="billing-2", token=gone.token
            ),
        )

    async with trio_asyncio.open_loop(), connect(database_url) as connection:
        before = await state(connection)
        async with Database.open(database_url, max_size=2) as db:
            await db.apply_schema()
            await db.apply_schema()
        after = await state(connection)

        # A replica booting on it applies it a third time, and writes on.
        second = await start_replica(nursery, database_url)
        assert second.port is not None
        async with grpc_client(second.port) as client:
            again = await client.call("Register", registration(instance_id="billing-3"))
            resolved = await client.call("Resolve", pb.ResolveRequest(name="billing"))
        new_events = await sql(
            connection,
            "SELECT revision, type FROM registry.events WHERE revision > $1",
            before["revision"][0][1],
        )

    assert after == before
    assert before["revision"][0][1] == 3
    # The trigger fires once per write, not once per application.
    assert again.revision == 4
    assert [tuple(e) for e in new_events] == [(4, "registered")]
    assert [i.instance_id for i in resolved.instances] == ["billing-1", "billing-3"]
    assert resolved.instances[0] == kept.instance
    first.stop()
    second.stop()


async def test_replicas_booting_together_on_a_fresh_database_all_serve(
    nursery: trio.Nursery, database_url: str
) -> None:
    replicas: list[Replica] = []

    async def boot() -> None:
        replicas.append(await start_replica(nursery, database_url))

    # Each applies the whole schema; the advisory lock makes them take turns.
    async with trio.open_nursery() as booting:
        for _ in range(3):
            booting.start_soon(boot)

    ports = [r.port for r in replicas if r.port is not None]
    assert len(ports) == 3
    async with grpc_client(ports[0]) as writer:
        registered = await writer.call(
            "Register", registration(instance_id="billing-1")
        )
    for port in ports:
        async with grpc_client(port) as reader:
            resolved = await reader.call(
                "Resolve",
                pb.ResolveRequest(name="billing", min_revision=registered.revision),
            )
        assert list(resolved.instances) == [registered.instance]
    async with trio_asyncio.open_loop(), connect(database_url) as connection:
        counters = await sql(connection, "SELECT revision FROM registry.revision")
        elsewhere = await sql(
            connection,
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN"
            " ('registry', 'pg_catalog', 'information_schema')",
        )
        views = await sql(
            connection,
            "SELECT table_name FROM information_schema.views"
            " WHERE table_schema = 'registry' ORDER BY table_name",
        )
    assert [tuple(c) for c in counters] == [(1,)]
    # Everything lives in the registry schema.
    assert elsewhere == []
    assert [v["table_name"] for v in views] == [
        "active_instances",
        "instance_apis",
        "instance_brokers",
    ]
    for replica in replicas:
        replica.stop()


# --- views -------------------------------------------------------------------


async def _populate(
    client: GrpcClient, connection: asyncpg.Connection, brokers: list[pb.Broker]
) -> None:
    """billing: one active (with `brokers`), one pending; orders: one active,
    one inactive."""
    tcp = pb.HealthCheck(tcp=pb.TcpCheck(api="grpc"))
    requests = [
        registration(
            "billing",
            "b-active",
            port=8090,
            apis=[pb.Api(name="http", port=8080)],
            brokers=brokers,
            metadata={"team": "money"},
        ),
        registration("billing", "b-pending", port=8090, address="10.0.0.2"),
        registration("orders", "o-active", port=8090, address="10.0.0.3"),
        registration("orders", "o-inactive", port=8090, address="10.0.0.4"),
    ]
    requests[1].check.CopyFrom(tcp)
    for request in requests:
        await client.call("Register", request)
    await sql(
        connection,
        "UPDATE registry.instances SET status = 'inactive'"
        " WHERE instance_id = 'o-inactive'",
    )


@asynccontextmanager
async def populated(
    nursery: trio.Nursery,
    database_url: str,
    brokers: list[pb.Broker] | None = None,
    **config: Any,
) -> AsyncIterator[tuple[GrpcClient, asyncpg.Connection]]:
    """A replica (with `config`) and its registry, populated; registering
    `brokers` takes a replica configured with a broker."""
    replica = await start_replica(nursery, database_url, **config)
    assert replica.port is not None
    async with (
        trio_asyncio.open_loop(),
        connect(database_url) as connection,
        grpc_client(replica.port) as client,
    ):
        await _populate(client, connection, brokers or [])
        yield client, connection
    replica.stop()


async def test_active_instances_view_answers_what_resolve_answers(
    nursery: trio.Nursery, database_url: str
) -> None:
    async with populated(nursery, database_url) as (client, connection):
        rows = await sql(
            connection,
            "SELECT * FROM registry.active_instances ORDER BY name, instance_id",
        )
        resolved = [
            instance
            for name in ("billing", "orders")
            for instance in (
                await client.call("Resolve", pb.ResolveRequest(name=name))
            ).instances
        ]

    assert [(r["name"], r["instance_id"]) for r in rows] == [
        ("billing", "b-active"),
        ("orders", "o-active"),
    ]
    assert [(r["name"], r["instance_id"]) for r in rows] == [
        (i.name, i.instance_id) for i in resolved
    ]
    # Everything a caller needs to connect, and never the token hash.
    assert "token_hash" not in rows[0]
    billing = rows[0]
    assert (billing["address"], billing["version"], billing["generation"]) == (
        "127.0.0.1",
        "1.4.2",
        1,
    )
    assert json.loads(billing["apis"]) == [
        {"name": "grpc", "port": 8090},
        {"name": "http", "port": 8080},
    ]
    assert json.loads(billing["metadata"]) == {"team": "money"}
    assert billing["revision"] == resolved[0].revision


async def test_instance_apis_view_has_one_row_per_api(
    nursery: trio.Nursery, database_url: str
) -> None:
    async with populated(nursery, database_url) as (_, connection):
        rows = await sql(
            connection,
            "SELECT name, instance_id, status, address, api, port"
            " FROM registry.instance_apis ORDER BY name, instance_id, api",
        )

    # Instances of every status, each API on its own row.
    assert [tuple(r) for r in rows] == [
        ("billing", "b-active", "active", "127.0.0.1", "grpc", 8090),
        ("billing", "b-active", "active", "127.0.0.1", "http", 8080),
        ("billing", "b-pending", "pending", "10.0.0.2", "grpc", 8090),
        ("orders", "o-active", "active", "10.0.0.3", "grpc", 8090),
        ("orders", "o-inactive", "inactive", "10.0.0.4", "grpc", 8090),
    ]


async def test_instance_brokers_view_has_one_row_per_binding(
    nursery: trio.Nursery, database_url: str, amqp: Amqp, amqp_url: str
) -> None:
    # Exchanges of this test alone on the shared broker, deleted afterwards.
    billing, events = amqp.name("billing"), amqp.name("events")
    brokers = [
        pb.Broker(
            exchange=billing, routing_key="invoices.created", type=pb.BROKER_TYPE_QUEUE
        ),
        pb.Broker(
            exchange=events, routing_key="orders.*.paid", type=pb.BROKER_TYPE_TOPIC
        ),
    ]
    async with populated(
        nursery,
        database_url,
        brokers,
        amqp_url=amqp_url,
        events_exchange=amqp.name("registry.events"),
    ) as (client, connection):
        rows = await sql(
            connection,
            "SELECT name, instance_id, status, exchange, routing_key, type, queue"
            " FROM registry.instance_brokers ORDER BY name, instance_id, exchange",
        )
        listed = await client.call("List", pb.ListRequest(name="billing"))

    queues = {b.exchange: b.queue for b in listed.instances[0].brokers}
    amqp.track(*queues.values())
    assert [tuple(r) for r in rows] == [
        (
            "billing",
            "b-active",
            "active",
            billing,
            "invoices.created",
            "queue",
            queues[billing],
        ),
        (
            "billing",
            "b-active",
            "active",
            events,
            "orders.*.paid",
            "topic",
            queues[events],
        ),
    ]


# --- packaging ---------------------------------------------------------------


def test_wheel_ships_the_schema(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )

    [wheel] = tmp_path.glob("registry-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("registry/schema.sql")
    assert shipped == (ROOT / "schema.sql").read_bytes()
