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
    progress_interval: float = 5.0
    poll_interval: float = 1.0
    event_retention: float = 24 * 3600.0
    compact_interval: float = 60.0
    drain_grace: float = 10.0
    log_level: str = "INFO"


_HELP = {
    "database_url": "Postgres DSN; unset starts an embedded Postgres in --data-dir",
    "data_dir": "folder of the embedded Postgres",
    "host": "address the gRPC server listens on",
    "port": "gRPC port (0 picks a free one)",
    "max_message_bytes": "largest request accepted, in bytes",
    "pool_size": "Postgres connections per replica",
    "watch_buffer": "events a watch stream may hold unsent before it is ended",
    "progress_interval": "seconds between progress events on an idle watch stream",
    "poll_interval": "seconds between the notifier's checks of its connection",
    "event_retention": "seconds events stay in the log before compaction",
    "compact_interval": "seconds between compactions of the event log",
    "drain_grace": "seconds in-flight calls get to finish on SIGTERM",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def env_name(field: str) -> str:
    return "REGISTRY_" + field.upper()


def _parser_for(kind: Any) -> Callable[[str], Any]:
    return {int: int, float: float, Path: Path}.get(kind, str)


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
