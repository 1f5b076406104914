"""The Prometheus metrics of one replica.

Every replica owns one Metrics, made with the Replica and handed to each part
that records something: `replica.metrics`. Its metrics live in their own
CollectorRegistry (`metrics.registry`), not in prometheus_client's global
one, so that several replicas in one process (as in the tests) never share a
counter; /metrics serves that registry.

    from registry.metrics import Metrics
    metrics.probes.labels(kind="http").inc()
    metrics.probe_failures.labels(kind="http").inc()
    metrics.probe_duration.labels(kind="http").observe(seconds)
    metrics.outbox_backlog.set(unpublished)
    metrics.outbox_published.inc()
    metrics.outbox_publish_failures.inc()
    metrics.mass_failure_guard.set(1)  # 0 once it lifts

What the database knows (instances by status, the newest revision) is read
at scrape time, in one query under a deadline (`refresh`); the hub's figures
(watch streams, the notifier's revision) are read live. The README lists
every metric with its labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import store
from .db import Database
from .errors import Unavailable
from .model import CheckKind, Event, EventType, Status

__all__ = ["DatabaseFigures", "Metrics"]

log = logging.getLogger("registry.metrics")

# The `_created` series that prometheus_client adds to every counter double
# the text for nothing Prometheus uses; the switch is process-wide.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

# Latency buckets in seconds, from a cached read to a slow probe. A watch
# stream lasts minutes: it lands in +Inf, which is why its histogram is read
# by grpc_type="unary" in dashboards.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


@dataclass(frozen=True, slots=True)
class DatabaseFigures:
    """What one scrape read from the database."""

    revision: int
    instances: dict[Status, int]


class _DatabaseCollector(Collector):
    """The figures of the last scrape's query, and the notifier's lag behind
    it; nothing but `registry_database_up 0` when that query failed."""

    def __init__(self, hub_revision: Callable[[], int | None]) -> None:
        self.figures: DatabaseFigures | None = None
        self._hub_revision = hub_revision

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "registry_database_up",
            "1 if this scrape's query of Postgres answered in time, else 0",
        )
        up.add_metric([], 0 if self.figures is None else 1)
        yield up
        if self.figures is None:
            return

        instances = GaugeMetricFamily(
            "registry_instances",
            "Registered instances by status, over the whole registry",
            labels=["status"],
        )
        for status in Status:
            instances.add_metric([status.value], self.figures.instances.get(status, 0))
        yield instances
        yield GaugeMetricFamily(
            "registry_revision",
            "The newest revision written to the log, by any replica",
            value=self.figures.revision,
        )
        hub_revision = self._hub_revision()
        if hub_revision is not None:
            yield GaugeMetricFamily(
                "registry_notifier_lag_revisions",
                "Revisions written but not yet fanned out to this replica's "
                "watch streams",
                value=max(0, self.figures.revision - hub_revision),
            )


class Metrics:
    """The metrics of one replica, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        # The process_* and python_* series that a Python exporter is
        # expected to have.
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)

        # gRPC, under the names and labels of go-grpc-prometheus, so that
        # the usual dashboards work; grpc_code is the status code's name
        # (OK, NOT_FOUND, ...).
        self.grpc_started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server",
            _GRPC_LABELS,
            registry=registry,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code",
            (*_GRPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.grpc_handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status, in seconds",
            _GRPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        # The revision log and its fan-out.
        self.events = Counter(
            "registry_events_total",
            "Events read from the log by this replica's notifier, by type; "
            "every replica reads every event, whichever replica wrote it",
            ("type",),
            registry=registry,
        )
        for event_type in EventType:
            self.events.labels(type=event_type.value)
        self.notifier_revision = Gauge(
            "registry_notifier_revision",
            "The newest revision this replica has fanned out to its watch streams",
            registry=registry,
        )
        self.watch_streams = Gauge(
            "registry_watch_streams",
            "Watch streams following live events on this replica",
            registry=registry,
        )

        # Health probes (registry.probes records these).
        self.probes = Counter(
            "registry_probes_total",
            "Health probes run by this replica, by check kind",
            ("kind",),
            registry=registry,
        )
        self.probe_failures = Counter(
            "registry_probe_failures_total",
            "Health probes that found their instance unhealthy, by check kind",
            ("kind",),
            registry=registry,
        )
        self.probe_duration = Histogram(
            "registry_probe_duration_seconds",
            "Time a health probe took, in seconds, by check kind",
            ("kind",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for kind in CheckKind:
            self.probes.labels(kind=kind.value)
            self.probe_failures.labels(kind=kind.value)
        self.mass_failure_guard = Gauge(
            "registry_mass_failure_guard_active",
            "1 while deregistration is held back because this replica just "
            "started or most probes fail at once, else 0",
            registry=registry,
        )

        # The RabbitMQ outbox (registry.outbox records these).
        self.outbox_backlog = Gauge(
            "registry_outbox_backlog",
            "Events written but not yet published to RabbitMQ",
            registry=registry,
        )
        self.outbox_published = Counter(
            "registry_outbox_published_total",
            "Events this replica published to RabbitMQ (confirmed by the broker)",
            registry=registry,
        )
        self.outbox_publish_failures = Counter(
            "registry_outbox_publish_failures_total",
            "Attempts to publish an event to RabbitMQ that failed",
            registry=registry,
        )

        self._hub_revision: Callable[[], int | None] = lambda: None
        self._database = _DatabaseCollector(lambda: self._hub_revision())
        registry.register(self._database)

    def follow_hub(
        self, revision: Callable[[], int], streams: Callable[[], int]
    ) -> None:
        """Read the notifier's revision and the open watch streams live, at
        each scrape."""
        self._hub_revision = revision
        self.notifier_revision.set_function(revision)
        self.watch_streams.set_function(streams)

    def count_events(self, events: Iterable[Event]) -> None:
        for event in events:
            self.events.labels(type=event.type.value).inc()

    def rpc_started(self, grpc_type: str, service: str, method: str) -> None:
        self.grpc_started.labels(grpc_type, service, method).inc()

    def rpc_handled(
        self, grpc_type: str, service: str, method: str, code: str, seconds: float
    ) -> None:
        self.grpc_handled.labels(grpc_type, service, method, code).inc()
        self.grpc_handling.labels(grpc_type, service, method).observe(seconds)

    def declare_rpcs(self, methods: Iterable[tuple[str, str, str]]) -> None:
        """Start the series of each (grpc_type, service, method) at zero, so
        that a method never called still shows."""
        for grpc_type, service, method in methods:
            self.grpc_started.labels(grpc_type, service, method)
            self.grpc_handled.labels(grpc_type, service, method, "OK")
            self.grpc_handling.labels(grpc_type, service, method)

    async def scrape(
        self, db: Database | None, accept: str, query_seconds: float
    ) -> tuple[bytes, str]:
        """The metrics in the format `accept` asks for (Prometheus text or
        OpenMetrics) and its content type, with the database's figures read
        now; without a database yet, or if that read fails or takes over
        `query_seconds`, the scrape shows registry_database_up 0 instead."""
        figures = None
        if db is not None:
            with trio.move_on_after(query_seconds):
                try:
                    revision, counts = await store.instance_counts(db)
                except Unavailable as exc:
                    log.debug("metrics cannot read the database: %s", exc)
                else:
                    figures = DatabaseFigures(
                        revision, {Status(status): n for status, n in counts.items()}
                    )
        # No checkpoint from here on: a concurrent scrape cannot swap the
        # figures before they are encoded.
        self._database.figures = figures
        encoder, content_type = prometheus_client.exposition.choose_encoder(accept)
        return encoder(self.registry), content_type
