"""Settings of a replica: each a `REGISTRY_*` environment variable and the
matching command-line flag, the flag winning. SETTINGS is the one table of
them; the README's configuration table follows it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Config:
    database_url: str | None = None
    data_dir: Path = Path("registry-data")
    host: str = "0.0.0.0"
    port: int = 50051
    max_message_bytes: int = 4 * 1024 * 1024
    pool_size: int = 10
    watch_buffer: int = 1024
    resolve_cache: int = 10_000
    progress_interval: float = 5.0
    poll_interval: float = 1.0
    event_retention: float = 24 * 3600.0
    compact_interval: float = 60.0
    drain_grace: float = 10.0
    # Ports (registry.ports) and RabbitMQ (registry.broker, registry.outbox).
    port_mode: str = "local"
    port_range: str = "20000-29999"
    remote_ports: str = "grpc=8090,http=8080"
    amqp_url: str | None = None
    events_exchange: str = "registry.events"
    outbox_batch: int = 500
    log_level: str = "INFO"
    log_format: str = "text"
    ops_host: str = "0.0.0.0"
    ops_port: int = 9090
    # Health probing; per-instance check fields override the first five.
    probe_interval: float = 10.0
    probe_timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    deregister_after: float = 600.0
    probe_backoff_max: float = 60.0
    max_probes: int = 100
    probe_lease: float = 10.0
    probe_poll_interval: float = 1.0
    kubeconfig: str = ""
    guard_startup: float = 60.0
    guard_window: float = 30.0
    guard_fraction: float = 0.5
    guard_min_probes: int = 10
    guard_max_hold: float = 600.0
    history_retention: float = 7 * 24 * 3600.0


_HELP = {
    "database_url": "Postgres DSN; unset starts an embedded Postgres in --data-dir",
    "data_dir": "folder of the embedded Postgres",
    "host": "address the gRPC server listens on",
    "port": "gRPC port (0 picks a free one)",
    "max_message_bytes": "largest request accepted, in bytes",
    "resolve_cache": "names whose Resolve answers a replica keeps between their "
    "events (0 turns the cache off)",
    "pool_size": "Postgres connections per replica",
    "watch_buffer": "events a watch stream may hold unsent before it is ended",
    "progress_interval": "seconds of idleness after which a watch stream gets a "
    "progress event (within one more interval)",
    "poll_interval": "seconds between the notifier's checks of its connection",
    "event_retention": "seconds events stay in the log before compaction",
    "compact_interval": "seconds between compactions of the event log",
    "drain_grace": "seconds in-flight calls get to finish on SIGTERM",
    "port_mode": "local (ports from --port-range) or remote (fixed per API kind)",
    "port_range": "ports assigned in local mode, LOW-HIGH",
    "remote_ports": "fixed port of each API kind in remote mode, KIND=PORT,...",
    "amqp_url": "RabbitMQ URL; unset turns broker features off",
    "events_exchange": "topic exchange that registry events are published to",
    "outbox_batch": "events published per claim of the outbox",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text, or json for one JSON object per line",
    "ops_host": "address the ops endpoint (/metrics, /healthz, /readyz) listens on",
    "ops_port": "port of the ops endpoint (0 picks a free one)",
    "probe_interval": "seconds between health probes of an instance",
    "probe_timeout": "seconds a health probe may take",
    "failure_threshold": "consecutive failed probes that make an instance inactive",
    "success_threshold": "consecutive good probes that make an instance active",
    "deregister_after": "seconds inactive before deregistration (0 keeps forever)",
    "probe_backoff_max": "longest delay between probes of an inactive instance",
    "max_probes": "health probes one replica runs at once; 0 runs none",
    "probe_lease": "seconds a claimed probe stays leased beyond its timeout",
    "probe_poll_interval": "longest wait between two looks for due probes",
    "kubeconfig": "kubeconfig file for Kubernetes checks; unset uses the "
    "in-cluster service account, else $KUBECONFIG or ~/.kube/config",
    "guard_startup": "seconds after start during which no instance is deregistered",
    "guard_window": "seconds of recent probes the mass-failure guard looks at",
    "guard_fraction": "failed share of recent probes that holds deregistrations",
    "guard_min_probes": "recent probes needed before the guard judges the share",
    "guard_max_hold": "longest the mass-failure guard holds deregistrations",
    "history_retention": "seconds status transitions are kept",
}


def env_name(field: str) -> str:
    return "REGISTRY_" + field.upper()


def _parser_for(kind: Any) -> Callable[[str], Any]:
    # A Path default is of a concrete subclass (PosixPath).
    if issubclass(kind, Path):
        return Path
    return {int: int, float: float}.get(kind, str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for field in fields(Config):
        kind = _field_type(field.name)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_parser_for(kind),
            default=None,
            metavar=field.name.upper(),
            help=f"{_HELP[field.name]} (env {env_name(field.name)}, "
            f"default {field.default!s})",
        )


def from_sources(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Flags over environment over defaults; a bad value is a clear error."""
    values: dict[str, Any] = {}
    for field in fields(Config):
        flag = getattr(args, field.name, None)
        if flag is not None:
            values[field.name] = flag
            continue
        raw = environ.get(env_name(field.name))
        if raw is None or raw == "":
            continue
        try:
            values[field.name] = _parser_for(_field_type(field.name))(raw)
        except ValueError:
            raise SystemExit(
                f"registry: {env_name(field.name)}={raw!r} is not a valid "
                f"{field.name.replace('_', ' ')}"
            ) from None
    return Config(**values)


def _field_type(name: str) -> Any:
    default = Config.__dataclass_fields__[name].default
    return str if default is None else type(default)


def load(args: argparse.Namespace) -> Config:
    return from_sources(args, os.environ)
