"""Postgres access from Trio.

asyncpg is an asyncio library; the registry runs it on the trio-asyncio loop
that the supervisor opens at the root. The pool is kept on the Trio side: a
semaphore bounds the connections in use, idle ones wait in a list, and each
database operation crosses from Trio to asyncio exactly once, to run the
whole unit (its queries, and the commit or rollback) on one connection.
asyncpg's own pool would cost two more crossings' worth of asyncio tasks and
futures per operation (acquire, release), as much CPU as the query itself.

A connection goes back to the idle list only after a unit that completed or
failed with an error of Postgres' own (a constraint, say), which leaves it
ready for the next. After a cancellation, or a lost connection, it is closed
instead: whatever it was doing, the server rolls it back, and nothing half
done reaches the next unit. Commit and rollback run to completion even if the
unit is cancelled meanwhile.

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


# Errors by which Postgres undoes a statement to let another go on.
_GAVE_UP = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


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


async def _to_completion(step: Awaitable[object]) -> None:
    """Await `step` to its end even if cancelled meanwhile, then let the
    cancellation through: a half-done commit or rollback would leave the
    connection unusable."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class Database:
    """A pool of Postgres connections, used from Trio."""

    def __init__(
        self,
        dsn: str,
        first: Connection,
        *,
        max_size: int,
        connect_timeout: float,
        command_timeout: float,
    ) -> None:
        self.dsn = dsn
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        # Connections not in use, the most recently used last.
        self._idle: list[Connection] = [first]
        # One token per connection in use or being opened.
        self._slots = trio.Semaphore(max_size)
        self._closed = False

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
                first = await connect(
                    dsn,
                    connect_timeout=connect_timeout,
                    command_timeout=command_timeout,
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
        db = cls(
            dsn,
            first,
            max_size=max_size,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
        )
        try:
            yield db
        finally:
            db._close()

    def _close(self) -> None:
        # Units still running hold their own connections, and close them as
        # they end (see _put_back).
        self._closed = True
        for conn in self._idle:
            conn.terminate()
        self._idle.clear()

    async def _take(self) -> Connection:
        """A connection for one unit; give it back with _put_back()."""
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
            return await connect(
                self.dsn,
                connect_timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
            )
        except BaseException:
            self._slots.release()
            raise

    def _put_back(self, conn: Connection, *, reusable: bool) -> None:
        if reusable and not self._closed and not conn.is_closed():
            self._idle.append(conn)
        else:
            conn.terminate()
        self._slots.release()

    async def run(self, operation: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `operation(connection)` on a pooled connection, outside a transaction.

        `operation` is asyncio code: it may only await asyncpg.
        """
        conn = await self._take()
        reusable = False
        try:
            with mapped_errors():
                result = cast(T, await trio_asyncio.aio_as_trio(operation)(conn))
            reusable = True
            return result
        except _GAVE_UP as exc:
            # Not expected (writers take their locks in one order), but if
            # Postgres ends a deadlock or a serialization conflict, the
            # statement is undone and worth sending again.
            reusable = True
            raise Unavailable(
                f"the database undid this call to resolve a conflict with "
                f"another ({exc.sqlstate}: {exc}); retry"
            ) from None
        except asyncpg.PostgresError:
            # Postgres refused the statement; the connection is fine.
            reusable = True
            raise
        finally:
            self._put_back(conn, reusable=reusable)

    async def transaction(
        self,
        operation: Callable[[Connection], Awaitable[T]],
        *,
        isolation: str = "read_committed",
    ) -> T:
        """Run `operation(connection)` in one transaction: committed if it
        returns, rolled back if it raises or is cancelled."""

        async def unit(conn: Connection) -> T:
            tx = conn.transaction(isolation=isolation)
            await tx.start()
            try:
                result = await operation(conn)
            except BaseException:
                await _to_completion(tx.rollback())
                raise
            await _to_completion(tx.commit())
            return result

        return await self.run(unit)

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


async def connect(
    dsn: str, *, connect_timeout: float = 10.0, command_timeout: float | None = None
) -> Connection:
    """One new connection (the pool's, or the notifier's LISTEN connection)."""
    with mapped_errors():
        conn: Connection = await trio_asyncio.aio_as_trio(asyncpg.connect)(
            dsn, timeout=connect_timeout, command_timeout=command_timeout
        )
        try:
            await trio_asyncio.aio_as_trio(_init_connection)(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn
