"""Compaction of the event log and of the status history, on every replica
(it is idempotent)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from . import probe_store, store
from .db import Database
from .errors import Unavailable

log = logging.getLogger("registry.janitor")


async def run_janitor(
    db: Database,
    *,
    retention: float,
    interval: float,
    history_retention: float | None = None,
    keep_unpublished: bool = False,
    on_pass: Callable[[int], object] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Compact the log every `interval` seconds, forever; and the status
    transitions older than `history_retention`, when given.

    With `keep_unpublished` (a broker is configured), events the outbox has
    not published yet are kept, however old.

    `on_pass`, if given, is called after each successful pass with the number
    of events dropped (for a metric, or a test that waits for a pass).
    """
    task_status.started()
    while True:
        try:
            compacted = await store.compact_events(
                db, retention, keep_unpublished=keep_unpublished
            )
        except Unavailable as exc:
            log.warning("cannot compact the event log (%s); trying again later", exc)
        else:
            if compacted:
                log.info(
                    "compacted %d events older than %.0f seconds", compacted, retention
                )
            if on_pass is not None:
                on_pass(compacted)
        if history_retention is not None:
            await _compact_history(db, history_retention)
        await trio.sleep(interval)


async def _compact_history(db: Database, retention: float) -> None:
    try:
        dropped = await probe_store.compact_transitions(db, retention)
    except Unavailable as exc:
        log.warning("cannot compact the status history (%s); trying again later", exc)
        return
    if dropped:
        log.info(
            "dropped %d status transitions older than %.0f seconds", dropped, retention
        )
