"""Group commit of registrations.

Every write to the registry takes the revision counter's row lock and holds
it until its commit is on disk (that is what makes revisions gap-free and in
commit order), so writes one at a time go no faster than the WAL can flush.
Registrations that arrive together are therefore committed together: each
Register hands its write to the replica's Committer and waits; the
Committer's task takes every write waiting, up to a batch size, and stores
them with registry.register_many, in one transaction of one statement. They
share one flush and one hold of the counter, and each still gets its own
answer: its stored entry, or its own error (a refused item is undone alone).

A write whose caller has gone (cancelled, or its deadline passed) before its
batch starts is left out. One that is already in a batch is committed all the
same, as a single statement would be once sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from .db import Database
from .errors import RegistryError

__all__ = ["Committer", "Refused", "register_many"]

# Registrations one transaction stores at most.
DEFAULT_BATCH = 64


class Refused(Exception):
    """registry.register refused one write; its SQLSTATE, message and
    detail, as an asyncpg.PostgresError would carry them."""

    def __init__(self, sqlstate: str, message: str, detail: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail


@dataclass(eq=False)
class _Write:
    item: dict[str, Any]
    done: trio.Event = field(default_factory=trio.Event)
    entry: dict[str, Any] | None = None
    error: BaseException | None = None
    # Its caller stopped waiting before the write went into a batch.
    abandoned: bool = False


class Committer:
    """Stores registrations in batches; run() must be running in a nursery
    for register() to return."""

    def __init__(self, db: Database, batch: int = DEFAULT_BATCH) -> None:
        if batch < 1:
            raise ValueError(f"batch: {batch!r} is not a number of writes of 1 or more")
        self._db = db
        self._batch = batch
        # Bounded: callers wait to queue once this many writes are waiting.
        self._send, self._receive = trio.open_memory_channel[_Write](batch * 4)
        # Batches committed, and writes in them; for tests and metrics.
        self.batches = 0
        self.writes = 0

    async def register(self, item: dict[str, Any]) -> dict[str, Any]:
        """Store one registration (registry.register's arguments by name);
        its stored entry, or Refused, or what failed the whole batch."""
        write = _Write(item)
        try:
            await self._send.send(write)
            await write.done.wait()
        except BaseException:
            write.abandoned = True
            raise
        if write.error is not None:
            raise write.error
        assert write.entry is not None
        return write.entry

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        async for first in self._receive:
            batch = [first]
            while len(batch) < self._batch:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            batch = [write for write in batch if not write.abandoned]
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_Write]) -> None:
        try:
            outcomes = await register_many(self._db, [write.item for write in batch])
        except RegistryError as exc:
            # The database is unavailable: every write of the batch fails
            # alike, each with an exception of its own.
            for write in batch:
                write.error = type(exc)(str(exc))
                write.done.set()
            return
        except Exception as exc:
            # A bug: each caller's call ends INTERNAL, logged with this cause.
            for write in batch:
                write.error = RuntimeError(
                    f"storing a batch of {len(batch)} registrations failed"
                )
                write.error.__cause__ = exc
                write.done.set()
            return
        self.batches += 1
        self.writes += len(batch)
        for write, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Refused):
                write.error = outcome
            else:
                write.entry = outcome
            write.done.set()


async def register_many(
    db: Database, items: list[dict[str, Any]]
) -> list[dict[str, Any] | Refused]:
    """Store `items` in one transaction: each one's stored entry, or why it
    was refused, in order."""
    rows = await db.fetch(
        "SELECT entry, error_state, error_message, error_detail "
        "FROM registry.register_many($1)",
        items,
    )
    return [
        Refused(row["error_state"], row["error_message"], row["error_detail"])
        if row["error_state"] is not None
        else row["entry"]
        for row in rows
    ]
