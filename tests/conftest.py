"""Fixtures shared by the whole suite: one Postgres server, fresh databases.

The server is REGISTRY_TEST_DATABASE_URL when set, else an embedded Postgres
started once for the session. Every test that asks for `database_url` gets a
database of its own on that server, dropped afterwards.

pytest-trio runs no session-scoped async fixtures, so these fixtures are
synchronous and do their few SQL statements with asyncio.run and asyncpg.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

import brokers
from registry._embedded import embedded_postgres

# Seconds, for connecting and for CREATE/DROP DATABASE.
ADMIN_TIMEOUT = 30.0

# A `registry serve` that a test starts binds its ops endpoint to a free
# port, never to the fixed default that another process may hold.
os.environ.setdefault("REGISTRY_OPS_PORT", "0")


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN of a superuser on the Postgres server the tests use."""
    url = os.environ.get("REGISTRY_TEST_DATABASE_URL")
    if url:
        yield url
        return

    with embedded_postgres(tmp_path_factory.mktemp("pgdata")) as url:
        yield url


@pytest.fixture
def database_url(postgres_url: str) -> Iterator[str]:
    """A DSN of a new, empty database, dropped after the test."""
    name = f"registry_test_{secrets.token_hex(8)}"
    _admin(postgres_url, f'CREATE DATABASE "{name}"')
    yield with_database(postgres_url, name)
    _admin(postgres_url, f'DROP DATABASE "{name}" WITH (FORCE)')


def with_database(url: str, name: str) -> str:
    """`url` with its database replaced by `name`; all else is kept."""
    parts = urllib.parse.urlsplit(url)
    # A dbname or database option would override the path.
    query = "&".join(
        option
        for option in parts.query.split("&")
        if option and option.partition("=")[0] not in ("dbname", "database")
    )
    # Put together by hand: urlunsplit drops the "//" of an empty host, as in
    # postgresql:///db?host=/run/postgresql.
    path = "/" + urllib.parse.quote(name, safe="")
    return f"{parts.scheme}://{parts.netloc}{path}" + (f"?{query}" if query else "")


def _admin(url: str, statement: str) -> None:
    async def execute() -> None:
        connection = await asyncpg.connect(url, timeout=ADMIN_TIMEOUT)
        try:
            await connection.execute(statement, timeout=ADMIN_TIMEOUT)
        finally:
            await connection.close(timeout=ADMIN_TIMEOUT)

    asyncio.run(execute())


# --- RabbitMQ (helpers in brokers.py) -----------------------------------------


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The test broker; tests that ask for it skip where none answers, or fail
    with REGISTRY_REQUIRE_BROKER=1."""
    return brokers.broker_url_or_skip()


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[brokers.Amqp]:
    """A connection of the test's own; what it declared is deleted afterwards."""
    async with brokers.open_amqp(amqp_url) as amqp:
        yield amqp
