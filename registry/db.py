"""Postgres access from Trio.

asyncpg is an asyncio library; the registry runs it on the trio-asyncio loop
that the supervisor opens at the root. Each database operation crosses from
Trio to asyncio exactly once: the whole unit (acquire, queries, commit,
release) runs as one asyncio coroutine. A Trio cancellation throws a single
CancelledError into that coroutine, and the cleanup steps (rollback, release)
run under asyncio.shield, so a cancelled call never leaks a connection or
leaves one inside an aborted transaction.

asyncpg's errors are mapped once, here: losing Postgres becomes Unavailable.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import trio
import trio_asyncio
from asyncpg import Connection as Connection

from .backoff import Backoff
from .errors import Unavailable

log = logging.getLogger("registry.db")

T = TypeVar("T")

# Any number taken the same by every replica: the lock only serialises the
# schema script between replicas booting together.
_SCHEMA_LOCK_KEY = 0x7265676973747279  # "registry"

_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Turn a lost or refused Postgres connection into Unavailable."""
    try:
        yield
    except _CONNECTION_ERRORS as exc:
        raise Unavailable(f"database unavailable: {exc!r}; retry shortly") from None


def redact(dsn: str) -> str:
    """The DSN without its password, for logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def schema_sql() -> str:
    """The schema script: shipped inside the wheel, or at the repository root."""
    packaged = importlib.resources.files("registry").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "schema.sql").read_text(
        encoding="utf-8"
    )


async def _init_connection(conn: Connection) -> None:
    # jsonb columns arrive as Python values instead of JSON text.
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


async def _keep_session(conn: Connection) -> None:
    """What a connection going back to the pool needs undone: nothing.

    asyncpg's default reset sends one more query at every release (unlock
    advisory locks, close cursors, UNLISTEN, RESET ALL), which doubles the
    round trips of a one-query read. The registry leaves no session state on
    pooled connections: its advisory locks are transaction-scoped, its
    settings SET LOCAL, and LISTEN has a connection of its own. asyncpg still
    rolls back a transaction left open before it calls this.
    """


async def _to_completion(step: Awaitable[object]) -> None:
    """Await `step` to its end even if cancelled meanwhile, then let the
    cancellation through: a half-done commit, rollback or release would
    leave the connection unusable."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def _release(pool: asyncpg.Pool, conn: Connection) -> None:
    try:
        await pool.release(conn)
    except asyncpg.InternalClientError:
        # The connection was lost between release() and its task running:
        # asyncpg has already given it back to the pool, and says so this
        # way. Raised on, it would end the replica over a lost connection.
        log.debug("connection lost while being released")


class Database:
    """A pool of Postgres connections, used from Trio."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self.dsn = dsn

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        retry: Backoff | None = None,
    ) -> AsyncIterator[Database]:
        """Open a pool. Unavailable if Postgres does not answer in time, or,
        with `retry`, keep trying (and logging) until it does."""
        while True:
            try:
                with mapped_errors():
                    pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
                        dsn,
                        min_size=min(2, max_size),
                        max_size=max_size,
                        timeout=connect_timeout,
                        command_timeout=command_timeout,
                        init=_init_connection,
                        reset=_keep_session,
                    )
                break
            except Unavailable as exc:
                if retry is None:
                    raise
                delay = retry.next()
                log.warning(
                    "cannot connect to %s (%s); retrying in %.1fs",
                    redact(dsn),
                    exc,
                    delay,
                )
                await trio.sleep(delay)
        try:
            yield cls(pool, dsn)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await trio_asyncio.aio_as_trio(pool.close)()

    async def run(self, operation: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `operation(connection)` on a pooled connection, outside a transaction.

        `operation` is asyncio code: it may only await asyncpg.
        """
        pool = self._pool

        async def unit() -> T:
            conn = await pool.acquire()
            try:
                return await operation(conn)
            finally:
                await _to_completion(_release(pool, conn))

        with mapped_errors():
            return cast(T, await trio_asyncio.aio_as_trio(unit)())

    async def transaction(
        self,
        operation: Callable[[Connection], Awaitable[T]],
        *,
        isolation: str = "read_committed",
    ) -> T:
        """Run `operation(connection)` in one transaction: committed if it
        returns, rolled back if it raises or is cancelled."""
        pool = self._pool

        async def unit() -> T:
            conn = await pool.acquire()
            try:
                tx = conn.transaction(isolation=isolation)
                try:
                    await _to_completion(tx.start())
                    result = await operation(conn)
                except BaseException:
                    await _to_completion(tx.rollback())
                    raise
                await _to_completion(tx.commit())
                return result
            finally:
                await _to_completion(_release(pool, conn))

        with mapped_errors():
            return cast(T, await trio_asyncio.aio_as_trio(unit)())

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self.run(lambda conn: conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self.run(lambda conn: conn.fetchrow(query, *args))

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.run(lambda conn: conn.fetchval(query, *args))

    async def apply_schema(self) -> None:
        """Create or update the registry schema, one replica at a time."""
        script = schema_sql()

        async def apply(conn: Connection) -> None:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            # Notices such as "relation already exists, skipping" are noise here.
            await conn.execute("SET LOCAL client_min_messages = warning")
            await conn.execute(script)

        await self.transaction(apply)
        log.debug("schema applied")


async def connect(dsn: str, *, connect_timeout: float = 10.0) -> Connection:
    """One connection outside the pool (the notifier's LISTEN connection)."""
    with mapped_errors():
        conn: Connection = await trio_asyncio.aio_as_trio(asyncpg.connect)(
            dsn, timeout=connect_timeout
        )
        await trio_asyncio.aio_as_trio(_init_connection)(conn)
        return conn
