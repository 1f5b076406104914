"""One replica: the supervisor nursery and everything that runs in it.

    trio_asyncio.open_loop()          asyncpg runs here, called from Trio
    ├─ ops endpoint (HTTP)           /metrics, /healthz, /readyz
    └─ supervisor nursery
       ├─ notifier                   LISTEN -> fan-out to local watchers
       ├─ progress ticker            progress for idle watch streams
       ├─ committer                  Register calls stored in batches (group commit)
       ├─ janitor                    event log and history compaction
       ├─ probe scheduler            claims due health probes, runs, records them
       ├─ broker link                one RabbitMQ connection, kept open (with a broker)
       ├─ outbox publisher           registry events -> RabbitMQ (with a broker)
       └─ gRPC server                Registry, grpc.health.v1, reflection

The ops endpoint starts first, before the database is reached, so that an
orchestrator sees the process alive (/healthz) and why it is not ready yet
(/readyz) while Postgres is awaited. Each task reports readiness through
task_status.started(); the health service says SERVING, and /readyz 200,
only once all have. stop() (SIGTERM in `registry serve`)
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
from .broker import Broker
from .cache import ResolveCache
from .config import Config
from .db import Database, redact
from .errors import InvalidArgument, Unavailable
from .group_commit import Committer
from .health import Health
from .janitor import run_janitor
from .metrics import Metrics
from .notifier import Notifier
from .ops import OpsServer
from .outbox import Outbox
from .ports import PortPolicy
from .probes import Prober, ProbeSettings
from .reflection import Reflection
from .service import SERVICE_NAME, RegistryService, WatchSettings
from .validation import _validate_exchange
from .watch import Hub, tick_every

log = logging.getLogger("registry.app")

# Seconds /readyz and a scrape of /metrics wait for Postgres: below the
# usual probe timeout, so that a slow database reads as not ready rather
# than as a probe that timed out.
DATABASE_CHECK_TIMEOUT = 1.0


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
        self.hub = Hub(cache=ResolveCache(config.resolve_cache))
        self.health = Health([SERVICE_NAME])
        self.port: int | None = None
        # The gRPC server, once run() has made it.
        self.server: GrpcServer | None = None
        self.metrics = Metrics()
        self.metrics.follow_hub(lambda: self.hub.revision, lambda: len(self.hub))
        self.ops = OpsServer(
            host=config.ops_host,
            port=config.ops_port,
            readiness=self.readiness,
            metrics=self._scrape,
        )
        # Set once the ops endpoint listens, on `ops.port`: before the
        # replica is ready.
        self.ops_started = trio.Event()
        # What a starting replica is busy with, for /readyz.
        self._starting = "not started"
        self._db: Database | None = None
        # The health probe scheduler, once run() has made it.
        self.prober: Prober | None = None
        # The RabbitMQ publisher, once run() has made it (with a broker only).
        self.outbox: Outbox | None = None
        self._stop = trio.Event()
        # The trio-asyncio loop asyncpg and aio-pika run on, while running.
        self.asyncio_loop: asyncio.AbstractEventLoop | None = None

    @property
    def deregistration_guard_active(self) -> bool:
        """Whether this replica holds back deregistrations: it started
        recently, or most of its probes fail at once."""
        return self.prober is not None and self.prober.guard_active

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
            self.asyncio_loop = loop
            async with trio.open_nursery() as ops:
                self._starting = "starting the ops endpoint"
                await ops.start(self.ops.serve)
                self.ops_started.set()
                self._starting = "waiting for the database"
                async with Database.open(
                    self.database_url,
                    max_size=self.config.pool_size,
                    retry=Backoff(0.2, 10.0),
                ) as db:
                    self._starting = "applying the schema"
                    await self._apply_schema(db)
                    # Only now: a scrape before would query tables that may
                    # not exist yet.
                    self._db = db
                    self._starting = "starting its tasks"
                    await self._supervise(db, task_status)
                    self._db = None
                ops.cancel_scope.cancel()
        self.state = State.STOPPED
        log.info("replica stopped")

    def _database_reachable(self, up: bool) -> None:
        # The notifier's connection stands for the database: while it is
        # lost, calls fail, and load balancers that check grpc.health.v1
        # should send them to another replica.
        if self.state is State.READY:
            self.health.set_serving(up)

    async def readiness(self) -> str | None:
        """None if the replica serves: every task started, not draining, and
        Postgres answering; else why not."""
        if self.state is State.STARTING:
            return self._starting
        if self.state is not State.READY or self._db is None:
            return f"the replica is {self.state.value}"
        try:
            with trio.fail_after(DATABASE_CHECK_TIMEOUT):
                await self._db.fetchval("SELECT 1")
        except trio.TooSlowError:
            return f"the database did not answer within {DATABASE_CHECK_TIMEOUT}s"
        except Unavailable as exc:
            return str(exc)
        return None

    async def _scrape(self, accept: str) -> tuple[bytes, str]:
        return await self.metrics.scrape(self._db, accept, DATABASE_CHECK_TIMEOUT)

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

    def _ports_and_broker(self) -> tuple[PortPolicy, Broker | None]:
        config = self.config
        try:
            ports = PortPolicy.parse(
                config.port_mode, config.port_range, config.remote_ports
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        log.info("ports: %s", ports.describe())
        # Checked as an exchange of a registration is: a bad name would
        # otherwise only show as publishing failing, over and over.
        _validate_exchange("REGISTRY_EVENTS_EXCHANGE", config.events_exchange)
        if config.amqp_url is None:
            log.info(
                "no broker configured (REGISTRY_AMQP_URL is unset): broker "
                "features are off; Register refuses brokers and follows, and "
                "registry events are published to no exchange"
            )
            return ports, None
        log.info(
            "broker %s; registry events go to exchange %r",
            redact(config.amqp_url),
            config.events_exchange,
        )
        return ports, Broker(config.amqp_url)

    async def _supervise(self, db: Database, task_status: trio.TaskStatus[int]) -> None:
        config = self.config
        probe_settings = ProbeSettings.from_config(config)
        ports, broker = self._ports_and_broker()
        committer = Committer(db)
        service = RegistryService(
            db,
            self.hub,
            WatchSettings(buffer=config.watch_buffer),
            probe_defaults=probe_settings.defaults,
            ports=ports,
            broker=broker,
            events_exchange=config.events_exchange,
            committer=committer,
        )
        services = [service.service(), self.health.service()]
        reflection = Reflection(s.name for s in services)
        server = self.server = GrpcServer(
            [*services, *reflection.services()],
            host=config.host,
            port=config.port,
            max_message_bytes=config.max_message_bytes,
            metrics=self.metrics,
        )
        notifier = Notifier(
            db,
            self.hub,
            poll_interval=config.poll_interval,
            metrics=self.metrics,
            on_connected=self._database_reachable,
        )

        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            await nursery.start(tick_every, self.hub, config.progress_interval)
            # Before the server, and so cancelled after it has drained.
            await nursery.start(committer.run)
            await nursery.start(
                lambda task_status: run_janitor(
                    db,
                    retention=config.event_retention,
                    interval=config.compact_interval,
                    history_retention=config.history_retention,
                    keep_unpublished=broker is not None,
                    task_status=task_status,
                )
            )
            self.prober = Prober(db, self.hub, probe_settings, metrics=self.metrics)
            await nursery.start(self.prober.run)
            if broker is not None:
                await nursery.start(broker.run)
                self.outbox = Outbox(
                    db,
                    broker,
                    self.hub,
                    exchange=config.events_exchange,
                    batch=config.outbox_batch,
                    interval=config.poll_interval,
                    metrics=self.metrics,
                )
                await nursery.start(self.outbox.run)
            self.port = await nursery.start(server.serve)
            self.state = State.READY
            self.health.set_serving(notifier.connected)
            log.info(
                "replica ready: gRPC on %s:%d",
                config.host,
                self.port,
                extra={"revision": self.hub.revision},
            )
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
