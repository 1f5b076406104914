"""Compaction of the event log, on every replica (it is idempotent)."""

from __future__ import annotations

import logging
from collections.abc import Callable

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
    on_pass: Callable[[int], object] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Compact the log every `interval` seconds, forever.

    `on_pass`, if given, is called after each successful pass with the number
    of events dropped (for a metric, or a test that waits for a pass).
    """
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
            if on_pass is not None:
                on_pass(compacted)
        await trio.sleep(interval)
