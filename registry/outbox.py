"""The outbox publisher: every registry event to RabbitMQ, once, in order.

Events are rows of registry.events; the single row of registry.outbox says
up to which revision they have been published. A replica publishes by
claiming that row (FOR UPDATE SKIP LOCKED), publishing the next events with
publisher confirms and mandatory routing, and moving the row on in the same
transaction; replicas that find the row claimed skip it and try again later.
So however many replicas run, one publishes at a time, in revision order.

A replica that dies or loses the broker mid-batch rolls its claim back: the
batch goes out again, from its first unconfirmed event, under the next claim
(at least once; exactly once unless that happens). While the broker is
unreachable the events wait in the table, and the backlog is logged and
exported (registry_outbox_backlog).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from . import store
from .backoff import Backoff
from .broker import Broker, PublishOutcome
from .db import Database, redact
from .errors import Unavailable
from .model import Event
from .topology import event_message
from .watch import Hub

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["Outbox"]

log = logging.getLogger("registry.outbox")


class Outbox:
    def __init__(
        self,
        db: Database,
        broker: Broker,
        hub: Hub,
        *,
        exchange: str,
        batch: int = 500,
        interval: float = 1.0,
        timeout: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._broker = broker
        self._hub = hub
        self._exchange = exchange
        self._batch = batch
        self._interval = interval
        self._timeout = timeout
        self._metrics = metrics
        # Events not yet published, as last counted.
        self.backlog = 0
        # Events this replica published, and its publishes that failed.
        self.published = 0
        self.failures = 0
        self._next_count = 0.0

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish, forever. Started at once: the events wait in the table."""
        task_status.started()
        backoff = Backoff(0.2, 5.0)
        outage = False
        while True:
            if not self._broker.connected:
                await self._count_backlog()
                if not outage and self.backlog:
                    log.warning(
                        "%d events wait in the outbox until the broker is back",
                        self.backlog,
                    )
                    outage = True
                with trio.move_on_after(self._interval):
                    await self._broker.wait_connected()
                continue

            # Whatever the notifier sees next may be an event to publish.
            seen = self._hub.revision
            try:
                marked = await self._publish_batch()
            except Unavailable as exc:
                self._failed()
                await self._count_backlog()
                delay = backoff.next()
                log.warning(
                    "cannot publish events (%s); %d wait in the outbox; "
                    "retrying in %.1fs",
                    exc,
                    self.backlog,
                    delay,
                )
                outage = True
                await trio.sleep(delay)
                continue
            backoff.reset()
            if marked:
                self._set_backlog(max(0, self.backlog - marked))
                continue
            if marked == 0:
                # This replica holds the outbox and found nothing to publish.
                self._set_backlog(0)
            elif trio.current_time() >= self._next_count:
                # Another replica publishes: count now and then, not at
                # every event.
                await self._count_backlog()
            if outage and not self.backlog:
                log.info("the outbox caught up: every event is published")
                outage = False
            # Nothing to publish, or another replica is publishing: wait for
            # a new event, or look again after a while.
            with trio.move_on_after(self._interval):
                await self._hub.wait_for(seen + 1)

    async def _publish_batch(self) -> int | None:
        """Publish the next batch; how many events it marked published, or
        None if another replica holds the outbox."""
        outcome: PublishOutcome | None = None

        async def publish(events: list[Event]) -> int:
            nonlocal outcome
            outcome = await self._broker.publish(
                self._exchange, [event_message(event) for event in events]
            )
            return outcome.confirmed

        with trio.move_on_after(self._timeout) as late:
            marked = await store.publish_events(self._db, self._batch, publish)
        if late.cancelled_caught:
            raise Unavailable(
                f"the broker at {redact(self._broker.url)} did not confirm "
                f"within {self._timeout}s"
            )
        if outcome is not None:
            self._count_published(outcome.confirmed)
            if outcome.unrouted:
                log.debug(
                    "%d events went to no queue: nothing follows them",
                    outcome.unrouted,
                )
            if outcome.error is not None:
                raise Unavailable(
                    Broker.describe_error(self._broker.url, outcome.error)
                )
        return marked

    async def _count_backlog(self) -> None:
        self._next_count = trio.current_time() + self._interval
        try:
            backlog = await store.outbox_backlog(self._db)
        except Unavailable as exc:
            log.debug("cannot count the outbox's backlog: %s", exc)
            return
        self._set_backlog(backlog)

    def _set_backlog(self, backlog: int) -> None:
        self.backlog = backlog
        if self._metrics is not None:
            self._metrics.outbox_backlog.set(backlog)

    def _count_published(self, count: int) -> None:
        self.published += count
        if self._metrics is not None:
            self._metrics.outbox_published.inc(count)

    def _failed(self) -> None:
        self.failures += 1
        if self._metrics is not None:
            self._metrics.outbox_publish_failures.inc()
