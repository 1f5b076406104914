"""The `registry` command, run as a subprocess against a real replica."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from functools import partial

import pytest
import trio

from harness import WAIT, grpc_client, registration, start_replica
from registry.app import Replica


async def registry_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT):
        return await trio.run_process(
            [sys.executable, "-m", "registry", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@pytest.fixture
async def replica(nursery: trio.Nursery, database_url: str) -> Replica:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        await client.call("Register", registration("billing", "b-1"))
        await client.call("Register", registration("orders", "o-1", version="2.0.0"))
    return replica


def target(replica: Replica) -> str:
    return f"--target=127.0.0.1:{replica.port}"


async def test_cli_list_prints_a_table(replica: Replica) -> None:
    result = await registry_cli("list", target(replica))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == [
        "NAME",
        "INSTANCE",
        "STATUS",
        "ADDRESS",
        "APIS",
        "VERSION",
        "REVISION",
    ]
    assert lines[1].split()[:4] == ["billing", "b-1", "active", "127.0.0.1"]
    assert lines[2].split()[:2] == ["orders", "o-1"]
    assert lines[-1] == "2 instance(s) at revision 2"


async def test_cli_list_json_filters_by_version(replica: Replica) -> None:
    result = await registry_cli("list", "--version", "2.0.0", "--json", target(replica))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert [i["instance_id"] for i in answer["instances"]] == ["o-1"]
    assert answer["revision"] == "2"


async def test_cli_resolve_json_lists_active_instances(replica: Replica) -> None:
    result = await registry_cli("resolve", "billing", "--json", target(replica))
    assert result.returncode == 0, result.stderr
    instances = json.loads(result.stdout)["instances"]
    assert [(i["name"], i["status"]) for i in instances] == [
        ("billing", "STATUS_ACTIVE")
    ]
    assert instances[0]["apis"] == [{"name": "grpc", "port": 8090}]


async def test_cli_resolve_unknown_name_exits_non_zero_with_a_reason(
    replica: Replica,
) -> None:
    result = await registry_cli("resolve", "payments", target(replica))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "registry resolve: NOT_FOUND: no instance of 'payments' is registered"
    ]


async def test_cli_reports_an_unreachable_registry(replica: Replica) -> None:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = await registry_cli("list", f"--target=127.0.0.1:{port}", "--timeout=5")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("registry list: cannot reach 127.0.0.1:")


@asynccontextmanager
async def watching(replica: Replica, *args: str) -> AsyncIterator[AsyncIterator[str]]:
    """`registry watch ARGS --json` running; yields its output lines."""
    command = [sys.executable, "-m", "registry", "watch", *args, "--json"]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [*command, target(replica)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        assert process.stdout is not None
        try:
            async with aclosing(_lines(process.stdout)) as lines:
                yield lines
        finally:
            process.kill()


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


async def test_cli_watch_replays_from_a_revision(replica: Replica) -> None:
    async with watching(replica, "--from", "1") as lines:
        with trio.fail_after(WAIT):
            replayed = json.loads(await anext(lines))
    assert replayed["event"]["revision"] == "2"
    assert replayed["event"]["type"] == "EVENT_TYPE_REGISTERED"
    assert replayed["event"]["instance"]["instance_id"] == "o-1"


async def test_cli_watch_prints_snapshot_then_live_events(replica: Replica) -> None:
    assert replica.port is not None
    async with watching(replica, "billing", "--snapshot") as lines:
        with trio.fail_after(WAIT):
            snapshot = json.loads(await anext(lines))
            marker = json.loads(await anext(lines))
            async with grpc_client(replica.port) as client:
                await client.call("Register", registration("orders", "o-2"))
                await client.call("Register", registration("billing", "b-2"))
            live = json.loads(await anext(lines))
    assert snapshot["snapshot"]["instance_id"] == "b-1"
    assert marker == {"snapshot_end": {"revision": "2"}}
    assert live["event"]["revision"] == "4"
    assert live["event"]["instance"]["instance_id"] == "b-2"


@pytest.mark.parametrize("command", ["serve", "list", "resolve", "watch"])
async def test_cli_help_explains_each_command_with_an_example(command: str) -> None:
    result = await registry_cli(command, "--help")
    assert result.returncode == 0
    assert f"example: registry {command}" in result.stdout.decode()


async def test_cli_serve_rejects_a_bad_setting() -> None:
    with trio.fail_after(WAIT):
        result = await trio.run_process(
            [sys.executable, "-m", "registry", "serve"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={"REGISTRY_PORT": "fifty", "PATH": ""},
        )
    assert result.returncode == 1
    assert "REGISTRY_PORT='fifty' is not a valid port" in result.stderr.decode()
