"""Logs as a log pipeline reads them: `registry serve --log-format json`
writes one JSON object per line, with the documented fields."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from harness import WAIT, grpc_client, registration
from registry.logs import JsonFormatter, TextFormatter
from registry.v1 import registry_pb2 as pb

FIELDS = {"time", "level", "logger", "message"}
DOCUMENTED = FIELDS | {"instance", "revision", "exception"}


class JsonLines:
    """The records a process writes to stderr, read as they come."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stderr is not None
        self._stream = process.stderr
        self._buffer = b""
        self.records: list[dict[str, Any]] = []

    async def until(self, message_start: str) -> dict[str, Any]:
        """Read records until one whose message starts so; return it."""
        with trio.fail_after(WAIT):
            while True:
                for record in self._complete_lines():
                    if record["message"].startswith(message_start):
                        return record
                chunk = await self._stream.receive_some()
                assert chunk, f"stderr ended before {message_start!r}"
                self._buffer += chunk

    async def to_the_end(self) -> None:
        with trio.fail_after(WAIT):
            async for chunk in self._stream:
                self._buffer += chunk
        list(self._complete_lines())
        assert self._buffer == b"", self._buffer

    def _complete_lines(self) -> list[dict[str, Any]]:
        *lines, self._buffer = self._buffer.split(b"\n")
        parsed = [json.loads(line) for line in lines]
        self.records.extend(parsed)
        return parsed


@pytest.mark.slow
async def test_serve_with_json_logs_writes_documented_fields_on_every_line(
    database_url: str,
) -> None:
    command = [
        *(sys.executable, "-m", "registry", "serve", "--log-format", "json"),
        *("--host", "127.0.0.1", "--port", "0", "--ops-port", "0"),
        *("--database-url", database_url),
    ]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        logs = JsonLines(process)
        ready = await logs.until("replica ready")
        port = int(ready["message"].rsplit(":", 1)[1])
        async with grpc_client(port) as client:
            registered = await client.call("Register", registration(instance_id="b-1"))
            await logs.until("registered billing/b-1")
            # A status change, through the health API, names its instance too.
            drained = await client.call(
                "Drain",
                pb.DrainRequest(
                    name="billing", instance_id="b-1", token=registered.token
                ),
            )
        draining = await logs.until("billing/b-1 is draining")
        process.send_signal(signal.SIGTERM)
        await logs.to_the_end()
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()

    for record in logs.records:
        assert FIELDS <= set(record) <= DOCUMENTED, record
        assert datetime.fromisoformat(record["time"]).tzinfo == UTC
        assert record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        assert record["logger"].startswith("registry"), record

    [write] = [r for r in logs.records if r["message"].startswith("registered")]
    assert write["logger"] == "registry.service"
    assert write["instance"] == "billing/b-1"
    assert write["revision"] == registered.revision == 1
    assert draining["logger"] == "registry.health_api"
    assert draining["level"] == "INFO"
    assert draining["instance"] == "billing/b-1"
    assert draining["revision"] == drained.revision == 2
    assert ready["logger"] == "registry.app"
    assert ready["revision"] == 0
    assert any(r["message"].startswith("draining:") for r in logs.records)
    assert logs.records[-1]["message"] == "replica stopped"


def test_json_formatter_carries_the_traceback_and_only_the_context_given() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "registry.test", logging.ERROR, __file__, 1, "failed at %s", ("x",), None
        )
        record.exc_info = sys.exc_info()
    record.revision = 7
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed at x"
    assert entry["level"] == "ERROR"
    assert entry["revision"] == 7
    assert "instance" not in entry
    assert entry["exception"].endswith("ValueError: boom")


def test_text_formatter_puts_the_context_given_after_the_message() -> None:
    record = logging.LogRecord(
        "registry.probes", logging.INFO, __file__, 1, "%s is %s", ("b", "up"), None
    )
    record.instance = "billing/b-1"
    record.revision = 12
    line = TextFormatter().format(record)
    assert line.endswith(
        " INFO registry.probes b is up instance=billing/b-1 revision=12"
    )

    # Only what the call site gave, and on the message's line, above a traceback.
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "registry.app", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    record.revision = 0
    first, *traceback = TextFormatter().format(record).split("\n")
    assert first.endswith(" ERROR registry.app failed revision=0")
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "ValueError: boom"

    plain = logging.LogRecord(
        "registry.app", logging.INFO, __file__, 1, "replica stopped", (), None
    )
    assert TextFormatter().format(plain).endswith(" INFO registry.app replica stopped")


async def test_serve_refuses_an_unknown_log_format() -> None:
    with trio.fail_after(WAIT):
        result = await trio.run_process(
            [sys.executable, "-m", "registry", "serve", "--log-format", "yaml"],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "registry serve: log format 'yaml' is not one of text, json\n"
    )
