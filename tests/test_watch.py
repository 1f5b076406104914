"""Watch over gRPC, against an in-process replica, with the grpcio client."""

from __future__ import annotations

import logging
import math

import grpc
import pytest
import trio
import trio_asyncio

from harness import WAIT, grpc_client, registration, start_replica, watch_stream
from registry import store
from registry.db import Database
from registry.janitor import run_janitor
from registry.model import Registration, Status
from registry.v1 import registry_pb2 as pb
from registry.v1 import registry_pb2_grpc


async def test_watch_snapshot_then_live_events_of_its_names(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        first = await client.call("Register", registration("billing", "b-1"))
        second = await client.call("Register", registration("billing", "b-2"))
        await client.call("Register", registration("orders", "o-1"))

        request = pb.WatchRequest(names=["billing"], snapshot=True)
        async with watch_stream(client.stub, request) as stream:
            instances, revision = await stream.snapshot()
            assert [(i.instance_id, i.revision) for i in instances] == [
                ("b-1", first.revision),
                ("b-2", second.revision),
            ]
            assert revision == 3

            # Orders changes come and go unseen: the next event is billing's.
            await client.call("Register", registration("orders", "o-2"))
            third = await client.call("Register", registration("billing", "b-3"))
            event = await stream.receive_event()
            assert (event.revision, event.type, event.instance.instance_id) == (
                third.revision,
                pb.EVENT_TYPE_REGISTERED,
                "b-3",
            )
            assert third.revision == 5


async def test_watch_replays_from_a_revision_then_goes_live(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        for n in range(5):
            await client.call("Register", registration("billing", f"b-{n}"))

        request = pb.WatchRequest(from_revision=2)
        async with watch_stream(client.stub, request) as stream:
            replayed = [await stream.receive_event() for _ in range(3)]
            for n in range(5, 7):
                await client.call("Register", registration("billing", f"b-{n}"))
            live = [await stream.receive_event() for _ in range(2)]

    assert [(e.revision, e.instance.instance_id) for e in replayed + live] == [
        (3, "b-2"),
        (4, "b-3"),
        (5, "b-4"),
        (6, "b-5"),
        (7, "b-6"),
    ]


async def test_watch_replay_meets_concurrent_writes_without_gap_or_repeat(
    nursery: trio.Nursery, database_url: str
) -> None:
    """The hand-over from the log to the hub happens while writes go on."""
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    total = 40
    async with grpc_client(replica.port) as client, trio.open_nursery() as writers:
        for n in range(10):
            await client.call("Register", registration("billing", f"b-{n}"))

        async def write() -> None:
            for n in range(10, total):
                await client.call("Register", registration("billing", f"b-{n}"))

        writers.start_soon(write)
        async with watch_stream(
            client.stub, pb.WatchRequest(from_revision=1)
        ) as stream:
            revisions = [
                (await stream.receive_event()).revision for _ in range(2, total + 1)
            ]

    assert revisions == list(range(2, total + 1))


async def test_watch_sends_progress_with_the_current_revision_when_idle(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, progress_interval=0.2)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        await client.call("Register", registration("billing", "b-1"))
        orders = await client.call("Register", registration("orders", "o-1"))
        await client.call("Register", registration("billing", "b-2"))

        request = pb.WatchRequest(names=["orders"], snapshot=True)
        async with watch_stream(client.stub, request) as stream:
            instances, revision = await stream.snapshot()
            assert [i.revision for i in instances] == [orders.revision]
            assert revision == 3

            # Idle: a progress event carries the head, past the last orders event.
            response = await stream.receive()
            assert response.WhichOneof("kind") == "progress"
            assert response.progress.revision == 3

            # Events of other names move the progress on, and are not sent.
            billing = await client.call("Register", registration("billing", "b-3"))
            head = (await client.call("List", pb.ListRequest())).revision
            assert head == billing.revision == 4
            while response.progress.revision < head:
                response = await stream.receive()
                assert response.WhichOneof("kind") == "progress", response
            assert response.progress.revision == head


async def test_watch_below_the_retained_window_is_out_of_range(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        for n in range(4):
            await client.call("Register", registration("billing", f"b-{n}"))
        async with trio_asyncio.open_loop(), Database.open(database_url) as db:
            # The newest event is always kept: revisions 1-3 go.
            assert await store.compact_events(db, 0) == 3

        async with watch_stream(
            client.stub, pb.WatchRequest(from_revision=1)
        ) as stream:
            responses, error = await stream.status()
        assert responses == []
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "oldest revision held is 4" in error.details()
        assert "snapshot" in error.details()

        # From the newest revision compacted away, nothing is missing.
        async with watch_stream(
            client.stub, pb.WatchRequest(from_revision=3)
        ) as stream:
            assert (await stream.receive_event()).revision == 4


async def test_watch_from_a_revision_the_log_has_not_reached_is_out_of_range(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        for n in range(3):
            await client.call("Register", registration("billing", f"b-{n}"))

        # A cursor from before a restore of the database, say: following it
        # would skip revisions 4 to 100 in silence once they are written.
        async with watch_stream(
            client.stub, pb.WatchRequest(from_revision=100)
        ) as stream:
            responses, error = await stream.status()
        assert responses == []
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error.details().startswith(
            "from_revision: 100 is ahead of the newest revision, 3;"
        )

        # The newest revision itself is a cursor that has seen everything.
        async with watch_stream(
            client.stub, pb.WatchRequest(from_revision=3)
        ) as stream:
            written = await client.call("Register", registration("billing", "b-9"))
            assert (await stream.receive_event()).revision == written.revision == 4


async def test_janitor_compacts_events_past_retention(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.janitor")
    async with trio_asyncio.open_loop(), Database.open(database_url) as db:
        await db.apply_schema()
        for n in range(5):
            await store.put_instance(
                db,
                Registration("billing", f"b-{n}", "127.0.0.1"),
                Status.ACTIVE,
                b"hash",
            )

        passes_in, passes = trio.open_memory_channel[int](math.inf)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_janitor(
                    db,
                    retention=0,
                    interval=0.05,
                    on_pass=passes_in.send_nowait,
                    task_status=task_status,
                )
            )
            with trio.fail_after(WAIT):
                assert await passes.receive() == 4
                # Later passes find nothing more to drop: the head stays.
                assert await passes.receive() == 0
            nursery.cancel_scope.cancel()

        log = await db.fetchrow(
            "SELECT compacted, (SELECT array_agg(revision) FROM registry.events)"
            " AS held FROM registry.revision"
        )
    assert log is not None
    assert (log["compacted"], log["held"]) == (4, [5])
    assert "compacted 4 events older than 0 seconds" in caplog.messages


async def test_watch_too_slow_is_ended_resource_exhausted(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url, watch_buffer=8)
    assert replica.port is not None
    # 8 KB per event: a few fill the stream's flow-control window. Without BDP
    # probing, grpcio keeps that window at 64 KB while nobody reads.
    metadata = {f"key-{n}": "x" * 1000 for n in range(8)}
    total = 60
    slow = grpc.insecure_channel(
        f"127.0.0.1:{replica.port}", options=[("grpc.http2.bdp_probe", 0)]
    )
    try:
        request = pb.WatchRequest(names=["billing"], snapshot=True)
        stub = registry_pb2_grpc.RegistryStub(slow)
        async with (
            grpc_client(replica.port) as client,
            watch_stream(stub, request) as stream,
        ):
            await stream.snapshot()
            assert len(replica.hub) == 1

            # The stream is not read while these are written.
            for n in range(total):
                await client.call(
                    "Register", registration("billing", f"b-{n}", metadata=metadata)
                )
            responses, error = await stream.status()
            assert len(replica.hub) == 0

            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            revisions = [r.event.revision for r in responses]
            last = revisions[-1]
            assert revisions == list(range(1, last + 1))
            assert last < total
            assert f"resume with from_revision={last}" in error.details()

            # Resuming from there, a reader gets the rest.
            request = pb.WatchRequest(names=["billing"], from_revision=last)
            async with watch_stream(client.stub, request) as resumed:
                rest = [
                    (await resumed.receive_event()).revision for _ in range(last, total)
                ]
            assert rest == list(range(last + 1, total + 1))
    finally:
        slow.close()


async def test_watch_with_a_bad_name_is_invalid_argument(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        request = pb.WatchRequest(names=["billing", "Bad_Name"])
        async with watch_stream(client.stub, request) as stream:
            responses, error = await stream.status()
    assert responses == []
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "names[1]" in error.details()
    assert "'Bad_Name'" in error.details()
    assert len(replica.hub) == 0
