"""Log output of `registry serve`: text for people, JSON for log pipelines.

In JSON, each record is one object on one line:

    time       when, ISO 8601 in UTC with milliseconds
    level      DEBUG, INFO, WARNING, ERROR or CRITICAL
    logger     the module's logger: registry.app, registry.service, ...
    message    the line a person reads, with its values filled in
    instance   "name/instance_id", on lines about one instance
    revision   the revision the line is about, where it has one
    exception  the traceback, on errors that carry one

A call site adds `instance` and `revision` with
`log.info(..., extra={"instance": f"{name}/{instance_id}", "revision": n})`.
In text, they follow the message as `instance=billing/b-1 revision=13`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "configure"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Attributes a call site may add through `extra`, in the order that both
# formats print them.
CONTEXT_FIELDS = ("instance", "revision")


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, then ` name=value` for each context field the record has."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Here rather than in format(): the fields stay on the message's
        # line, above a traceback.
        line = super().formatMessage(record)
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line += f" {name}={value}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["exception"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str, log_format: str) -> None:
    """Send every log record to stderr at `level` and above, as `log_format`."""
    if log_format not in FORMATS:
        raise ValueError(
            f"log format {log_format!r} is not one of {', '.join(FORMATS)}"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
