"""The notifier: one LISTEN connection per replica, used only as a wake-up.

Each NOTIFY on `registry_events` (or the poll interval passing) makes the
notifier read the event rows after the last revision it published, page by
page, and hand them to the hub in order. A notification that never arrives
costs latency, never an event: the rows are the truth.

A lost connection is noticed three ways: asyncpg's termination callback, a
failed read, and a periodic `SELECT 1` under a deadline (asyncpg sets no TCP
keepalive, so a silent partition shows only that way). The notifier then
reconnects with backoff and reads on from its last revision.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
import trio_asyncio

from . import db as dbmod
from . import store
from .backoff import Backoff
from .db import Database
from .errors import Unavailable
from .watch import Ended, Hub

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("registry.notifier")

CHANNEL = "registry_events"
# How the LISTEN connection shows in pg_stat_activity.
APPLICATION_NAME = "registry-notifier"


class Notifier:
    def __init__(
        self,
        db: Database,
        hub: Hub,
        *,
        poll_interval: float = 1.0,
        ping_timeout: float = 5.0,
        page_size: int = 1000,
        metrics: Metrics | None = None,
        on_connected: Callable[[bool], object] | None = None,
    ) -> None:
        """`on_connected(up)` is called each time the LISTEN connection is
        made (after catching up) or lost."""
        self._db = db
        self._hub = hub
        self._metrics = metrics
        self._poll_interval = poll_interval
        self._ping_timeout = ping_timeout
        self._page_size = page_size
        self._on_connected = on_connected
        self._connected = False
        self._started = False

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is up and the hub caught up."""
        return self._connected

    def _set_connected(self, up: bool) -> None:
        if up != self._connected:
            self._connected = up
            if self._on_connected is not None:
                self._on_connected(up)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish events to the hub forever; started once first caught up."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self._listen_and_publish(backoff, task_status)
            except Unavailable as exc:
                if self.connected:
                    log.warning(
                        "lost the database while listening for events (%s); "
                        "reconnecting, watch streams wait meanwhile",
                        exc,
                    )
                else:
                    log.warning("cannot listen for events (%s); retrying", exc)
                self._set_connected(False)
            self._hub.set_live(False)
            await trio.sleep(backoff.next())

    async def _listen_and_publish(
        self, backoff: Backoff, task_status: trio.TaskStatus[None]
    ) -> None:
        wakeups_in, wakeups = trio.open_memory_channel[None](1)
        lost = trio.Event()

        def on_notify(*_: Any) -> None:
            # Called on the asyncio side. A full channel already holds a
            # wake-up, which is all a notification means.
            with contextlib.suppress(trio.WouldBlock):
                wakeups_in.send_nowait(None)

        def on_terminated(*_: Any) -> None:
            lost.set()
            on_notify()

        conn = await dbmod.connect(self._db.dsn, connect_timeout=self._ping_timeout)
        try:
            with dbmod.mapped_errors():
                await trio_asyncio.aio_as_trio(conn.execute)(
                    f"SET application_name = '{APPLICATION_NAME}'"
                )
                await trio_asyncio.aio_as_trio(conn.add_listener)(CHANNEL, on_notify)
            conn.add_termination_listener(on_terminated)

            # Listening came first, so whatever commits after this read wakes
            # us; on a reconnect, the hub's revision is where to read on from.
            if not self._started:
                self._hub.advance(await store.head_revision(self._db))
            await self._catch_up()
            self._set_connected(True)
            backoff.reset()
            log.info(
                "listening for events after revision %d",
                self._hub.revision,
                extra={"revision": self._hub.revision},
            )
            if not self._started:
                self._started = True
                task_status.started()

            while True:
                with trio.move_on_after(self._poll_interval) as idle:
                    await wakeups.receive()
                if lost.is_set():
                    raise Unavailable("the listen connection was closed")
                if idle.cancelled_caught:
                    await self._ping(conn)
                await self._catch_up()
        finally:
            self._hub.set_live(False)
            conn.terminate()

    async def _ping(self, conn: dbmod.Connection) -> None:
        with dbmod.mapped_errors():
            with trio.move_on_after(self._ping_timeout) as timed_out:
                await trio_asyncio.aio_as_trio(conn.fetchval)("SELECT 1")
        if timed_out.cancelled_caught:
            raise Unavailable(
                f"the listen connection did not answer within {self._ping_timeout}s"
            )

    async def _catch_up(self) -> None:
        """Publish every event after the hub's revision."""
        while True:
            page = await store.events_after(
                self._db, self._hub.revision, limit=self._page_size
            )
            if page.compacted > self._hub.revision:
                log.warning(
                    "events %d-%d were compacted before this replica read them; "
                    "ending all watch streams so that their clients take a snapshot",
                    self._hub.revision + 1,
                    page.compacted,
                )
                self._hub.set_live(False)
                self._hub.end_all(Ended.COMPACTED)
                self._hub.advance(page.compacted)
                continue
            self._hub.publish(page.events)
            if self._metrics is not None:
                self._metrics.count_events(page.events)
            if len(page.events) < self._page_size:
                self._hub.advance(page.head)
                self._hub.set_live(True)
                return
