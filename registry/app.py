"""One replica: the supervisor nursery and everything that runs in it.

    trio_asyncio.open_loop()          asyncpg runs here, called from Trio
    └─ supervisor nursery
       ├─ notifier                   LISTEN -> fan-out to local watchers
       ├─ janitor                    event log compaction
       └─ gRPC server                Registry + grpc.health.v1

Each task reports readiness through task_status.started(); the health
service says SERVING only once all have. stop() (SIGTERM in `registry serve`)
drains: health goes NOT_SERVING, watch streams end cleanly so that clients
resume on another replica, calls in flight finish within the grace period,
and run() returns.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

import trio
import trio_asyncio

from ._grpc import GrpcServer
from .backoff import Backoff
from .config import Config
from .db import Database, redact
from .errors import Unavailable
from .health import Health
from .janitor import run_janitor
from .notifier import Notifier
from .service import SERVICE_NAME, RegistryService, WatchSettings
from .watch import Hub

log = logging.getLogger("registry.app")


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


def _log_asyncio_error(
    loop: asyncio.AbstractEventLoop, context: dict[str, Any]
) -> None:
    # trio-asyncio's default handler raises into the loop, and so would kill
    # the replica over errors plain asyncio only logs.
    exc = context.get("exception")
    log.error(
        "asyncio reported an error: %s",
        context.get("message", "no message"),
        exc_info=exc if isinstance(exc, BaseException) else None,
    )


class Replica:
    def __init__(self, config: Config, database_url: str) -> None:
        self.config = config
        self.database_url = database_url
        self.state = State.NEW
        self.hub = Hub()
        self.health = Health([SERVICE_NAME])
        self.port: int | None = None
        # The gRPC server, once run() has made it.
        self.server: GrpcServer | None = None
        self._stop = trio.Event()

    def stop(self) -> None:
        """Begin draining; run() returns once done."""
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until stop(); reports the bound gRPC port once ready."""
        if self.state is not State.NEW:
            raise RuntimeError(f"a replica runs once; this one is {self.state.value}")
        self.state = State.STARTING
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(_log_asyncio_error)
            async with Database.open(
                self.database_url,
                max_size=self.config.pool_size,
                retry=Backoff(0.2, 10.0),
            ) as db:
                await self._apply_schema(db)
                await self._supervise(db, task_status)
        self.state = State.STOPPED
        log.info("replica stopped")

    async def _apply_schema(self, db: Database) -> None:
        backoff = Backoff(0.2, 10.0)
        while True:
            try:
                await db.apply_schema()
            except Unavailable as exc:
                delay = backoff.next()
                log.warning(
                    "cannot apply the schema (%s); retrying in %.1fs", exc, delay
                )
                await trio.sleep(delay)
                continue
            log.info("database %s ready", redact(self.database_url))
            return

    async def _supervise(self, db: Database, task_status: trio.TaskStatus[int]) -> None:
        config = self.config
        service = RegistryService(
            db,
            self.hub,
            WatchSettings(
                buffer=config.watch_buffer, progress_interval=config.progress_interval
            ),
        )
        server = self.server = GrpcServer(
            [service.service(), self.health.service()],
            host=config.host,
            port=config.port,
            max_message_bytes=config.max_message_bytes,
        )
        notifier = Notifier(db, self.hub, poll_interval=config.poll_interval)

        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            await nursery.start(
                lambda task_status: run_janitor(
                    db,
                    retention=config.event_retention,
                    interval=config.compact_interval,
                    task_status=task_status,
                )
            )
            self.port = await nursery.start(server.serve)
            self.state = State.READY
            self.health.set_serving(True)
            log.info("replica ready: gRPC on %s:%d", config.host, self.port)
            task_status.started(self.port)

            await self._stop.wait()
            self.state = State.DRAINING
            log.info(
                "draining: ending %d watch streams, %d calls in flight get %.0fs",
                len(self.hub),
                server.active_calls,
                config.drain_grace,
            )
            self.health.drain()
            self.hub.drain()
            await server.drain(config.drain_grace)
            nursery.cancel_scope.cancel()
