"""Compaction of the event log, on every replica (it is idempotent)."""

from __future__ import annotations

import logging

import trio

from . import store
from .db import Database
from .errors import Unavailable

log = logging.getLogger("registry.janitor")


async def run_janitor(
    db: Database,
    *,
    retention: float,
    interval: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    while True:
        try:
            compacted = await store.compact_events(db, retention)
        except Unavailable as exc:
            log.warning("cannot compact the event log (%s); trying again later", exc)
        else:
            if compacted:
                log.info(
                    "compacted %d events older than %.0f seconds", compacted, retention
                )
        await trio.sleep(interval)
