"""The `registry` command, run as a subprocess against a real replica."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from google.protobuf.duration_pb2 import Duration

from harness import WAIT, grpc_client, registration, replica_process, start_replica
from registry.app import Replica
from registry.v1 import registry_pb2 as pb


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
        await client.call("Register", registration("billing", "b-1", port=8090))
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
    assert result.returncode == 3
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "registry resolve: NOT_FOUND: no instance of 'payments' is registered"
    ]


async def test_cli_exit_codes_tell_nothing_found_from_failure_and_bad_usage(
    replica: Replica,
) -> None:
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        drained = registration("shipping", "s-1")
        token = (await client.call("Register", drained)).token
        await client.call(
            "Drain", pb.DrainRequest(name="shipping", instance_id="s-1", token=token)
        )

    no_active = await registry_cli("resolve", "shipping", target(replica))
    none_listed = await registry_cli("list", "--name=payments", target(replica))
    no_history = await registry_cli("history", "payments", "--json", target(replica))
    no_token = await registry_cli("deregister", "shipping", "s-1", target(replica))
    bad_timeout = await registry_cli("list", "--timeout=-1", target(replica))
    bad_limit = await registry_cli("history", "billing", "--limit=-1", target(replica))
    bad_from = await registry_cli("watch", "--from=1" + "0" * 20, target(replica))

    assert no_active.returncode == 3
    assert no_active.stderr.decode().splitlines() == [
        "registry resolve: UNAVAILABLE: 'shipping' has no active instance: 1 draining"
    ]
    assert no_token.returncode == 2
    assert no_token.stderr.decode().splitlines()[-1] == (
        "registry deregister: error: the instance token is needed: --token or "
        "REGISTRY_TOKEN"
    )
    assert none_listed.returncode == 3
    assert none_listed.stdout.decode().splitlines()[-1] == (
        "0 instance(s) at revision 4"
    )
    assert none_listed.stderr.decode() == "registry list: no instance matches\n"
    assert no_history.returncode == 3
    assert json.loads(no_history.stdout) == {}
    assert no_history.stderr.decode() == (
        "registry history: no status transition of 'payments'\n"
    )
    for usage in (bad_timeout, bad_limit, bad_from):
        assert usage.returncode == 2
        assert usage.stderr.decode().splitlines()[-1].startswith("registry "), usage


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


@pytest.mark.parametrize(
    "command",
    ["serve", "list", "resolve", "watch", "register", "deregister", "history"],
)
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


# --- commands over registry.client --------------------------------------------


@asynccontextmanager
async def running(*args: str) -> AsyncIterator[tuple[trio.Process, AsyncIterator[str]]]:
    """`registry ARGS` running, with its output lines; killed on the way out
    if still running."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "registry", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        assert process.stdout is not None
        try:
            async with aclosing(_lines(process.stdout)) as lines:
                yield process, lines
        finally:
            if process.returncode is None:
                process.kill()


async def instance_ids(replica: Replica, name: str) -> list[str]:
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        response = await client.call("List", pb.ListRequest(name=name))
    return [i.instance_id for i in response.instances]


async def test_cli_register_holds_the_registration_until_sigterm(
    replica: Replica,
) -> None:
    async with running(
        "register",
        "payments",
        "--instance-id=p-1",
        "--address=10.0.0.9",
        "--api=grpc=0",
        "--metadata=team=money",
        "--json",
        target(replica),
    ) as (process, lines):
        with trio.fail_after(WAIT):
            registered = json.loads(await anext(lines))
        assert registered["instance"]["instance_id"] == "p-1"
        assert registered["instance"]["metadata"] == {"team": "money"}
        assert registered["token"]
        assert registered["instance"]["apis"][0]["port"] != 0
        assert await instance_ids(replica, "payments") == ["p-1"]

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            left = json.loads(await anext(lines))
            assert await process.wait() == 0
    assert await instance_ids(replica, "payments") == []
    assert left == {
        "deregistered": {
            "name": "payments",
            "instance_id": "p-1",
            "revision": str(int(registered["revision"]) + 2),
        }
    }


async def test_cli_register_from_a_toml_file_prints_what_it_was_given(
    replica: Replica, tmp_path: Path
) -> None:
    file = tmp_path / "payments.toml"
    file.write_text(
        'name = "payments"\n'
        'instance_id = "p-2"\n'
        'address = "10.0.0.9"\n'
        'apis = [{ name = "http", port = 8080 }]\n'
        'metadata = { team = "money" }\n'
    )
    # A flag overrides the file.
    async with running(
        "register", f"--file={file}", "--address=10.0.0.10", target(replica)
    ) as (process, lines):
        with trio.fail_after(WAIT):
            head = [await anext(lines) for _ in range(5)]
        assert head[0] == "registered payments/p-2 generation 1 at revision 3 (active)"
        assert head[1].split() == ["instance", "p-2"]
        assert head[2].split()[0] == "token"
        assert head[3].split()[0] == "ports"
        assert head[3].split()[1].startswith("http=")
        assert head[4].split() == ["queues", "-"]
        assert await instance_ids(replica, "payments") == ["p-2"]

        process.send_signal(signal.SIGINT)
        with trio.fail_after(WAIT):
            while not (line := await anext(lines)).startswith("deregistered"):
                pass
            assert await process.wait() == 0
    assert line == "deregistered payments/p-2 at revision 5"


async def test_cli_register_from_a_json_file_in_the_apis_json_form(
    replica: Replica, tmp_path: Path
) -> None:
    file = tmp_path / "payments.json"
    file.write_text(
        json.dumps(
            {
                "name": "payments",
                "instanceId": "p-3",
                "address": "10.0.0.11",
                "apis": [{"name": "grpc", "port": 0}],
                "check": {"ttl": {"ttl": "10s"}},
            }
        )
    )
    async with running("register", f"--file={file}", target(replica)) as (
        process,
        lines,
    ):
        with trio.fail_after(WAIT):
            first = await anext(lines)
            ports = [await anext(lines) for _ in range(3)][-1]
        assert first == "registered payments/p-3 generation 1 at revision 3 (pending)"
        assert ports.split()[0] == "ports"
        assert ports.split()[1].startswith("grpc=")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    assert await instance_ids(replica, "payments") == []


async def test_cli_watch_prints_a_readable_line_per_event(replica: Replica) -> None:
    assert replica.port is not None
    async with running("watch", "billing", "--snapshot", target(replica)) as (
        process,
        lines,
    ):
        with trio.fail_after(WAIT):
            snapshot = [await anext(lines), await anext(lines)]
            async with grpc_client(replica.port) as client:
                await client.call("Register", registration("billing", "b-2"))
            event = await anext(lines)
        process.send_signal(signal.SIGINT)
    assert snapshot == ["snapshot  billing/b-1  active", "snapshot taken at revision 2"]
    # Time, revision, type, instance and status.
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 +3  registered +"
        r"billing/b-2  active",
        event,
    ), event


async def test_cli_register_refuses_a_bad_request_with_its_reason(
    replica: Replica,
) -> None:
    result = await registry_cli(
        "register", "payments", "--address=10.0.0.9", "--api=grpc", target(replica)
    )
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == (
        "registry register: error: argument --api: 'grpc' is not NAME=PORT"
    )

    result = await registry_cli("register", "Pay Ments", "--address=x", target(replica))
    assert result.returncode == 1
    assert result.stderr.decode().startswith(
        "registry register: INVALID_ARGUMENT: name"
    )


async def test_cli_deregister_removes_an_instance_with_its_token(
    replica: Replica,
) -> None:
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        token = (await client.call("Register", registration("payments", "p-1"))).token

    wrong = await registry_cli(
        "deregister", "payments", "p-1", "--token", token[:-2] + "xx", target(replica)
    )
    assert wrong.returncode == 1
    assert wrong.stderr.decode().startswith("registry deregister: PERMISSION_DENIED: ")

    result = await registry_cli(
        "deregister", "payments", "p-1", "--token", token, "--json", target(replica)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"revision": "4"}
    assert await instance_ids(replica, "payments") == []

    again = await registry_cli(
        "deregister", "payments", "p-1", "--token", token, target(replica)
    )
    assert again.returncode == 3
    assert again.stderr.decode().splitlines() == [
        "registry deregister: NOT_FOUND: no instance 'p-1' of 'payments' is registered"
    ]


async def test_cli_history_shows_status_transitions(replica: Replica) -> None:
    assert replica.port is not None
    request = registration("payments", "p-1")
    request.check.CopyFrom(
        pb.HealthCheck(ttl=pb.TtlCheck(ttl=Duration(seconds=30)), success_threshold=1)
    )
    async with grpc_client(replica.port) as client:
        token = (await client.call("Register", request)).token
        owner = {"name": "payments", "instance_id": "p-1", "token": token}
        await client.call("Heartbeat", pb.HeartbeatRequest(**owner))
        drained = await client.call("Drain", pb.DrainRequest(**owner))

    result = await registry_cli("history", "payments", target(replica))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == ["TIME", "REVISION", "INSTANCE", "FROM", "TO", "WHY"]
    # Newest first.
    assert lines[1].split()[1:] == [
        str(drained.revision),
        "p-1",
        "active",
        "draining",
        "asked",
        "by",
        "the",
        "service",
    ]
    assert lines[2].split()[2:5] == ["p-1", "pending", "active"]
    assert lines[-1] == "2 transition(s)"

    result = await registry_cli(
        "history",
        "payments",
        "--instance",
        "p-1",
        "--limit",
        "1",
        "--json",
        target(replica),
    )
    assert result.returncode == 0, result.stderr
    (transition,) = json.loads(result.stdout)["transitions"]
    assert (transition["from_status"], transition["to_status"]) == (
        "STATUS_ACTIVE",
        "STATUS_DRAINING",
    )


async def test_cli_tries_each_target_in_turn(replica: Replica) -> None:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"
    result = await registry_cli(
        "resolve", "billing", "--json", f"--target={dead},127.0.0.1:{replica.port}"
    )
    assert result.returncode == 0, result.stderr
    assert [i["instance_id"] for i in json.loads(result.stdout)["instances"]] == ["b-1"]

    result = await registry_cli("list", "--target=localhost")
    assert result.returncode == 2
    reason = result.stderr.decode().splitlines()[-1]
    assert reason.startswith(
        "registry list: error: argument --target: endpoint 'localhost' is not HOST:PORT"
    )


@pytest.mark.slow
async def test_cli_watch_resumes_on_another_replica_when_its_replica_dies(
    database_url: str,
) -> None:
    async with (
        replica_process(database_url) as a,
        replica_process(database_url) as b,
        grpc_client(b.port) as client,
        running(
            "watch",
            "--snapshot",
            "--json",
            f"--target=127.0.0.1:{a.port},127.0.0.1:{b.port}",
        ) as (_, lines),
    ):
        seen = []
        with trio.fail_after(WAIT):
            # An empty snapshot: the stream is open.
            assert list(json.loads(await anext(lines))) == ["snapshot_end"]
            await client.call("Register", registration("billing", "b-1"))
            seen.append(json.loads(await anext(lines))["event"]["revision"])
        a.kill()
        # Written while it is cut off: it finds them on b, once each.
        for n in range(2, 5):
            await client.call("Register", registration("billing", f"b-{n}"))
        with trio.fail_after(WAIT):
            while len(seen) < 4:
                seen.append(json.loads(await anext(lines))["event"]["revision"])
    assert seen == ["1", "2", "3", "4"]


@pytest.mark.slow
async def test_serve_with_no_database_configured_runs_on_an_embedded_postgres(
    tmp_path: Path,
) -> None:
    # The quick start's `just run`: nothing configured at all.
    data = tmp_path / "registry-data"
    async with replica_process(None, "--data-dir", str(data), ready_within=180) as a:
        async with grpc_client(a.port) as client:
            await client.call("Register", registration("billing", "b-1"))
            listed = await client.call("List", pb.ListRequest())
        assert [i.instance_id for i in listed.instances] == ["b-1"]

        # SIGTERM stops the replica, then its Postgres, and exits 0.
        a.terminate()
        assert await a.wait() == 0, a.log.decode()
    log = a.log.decode()
    assert f"embedded postgres running: data in {data}" in log
    assert f"embedded postgres stopped: data in {data}" in log
