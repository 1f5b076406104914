"""Watch across real replica processes sharing one database."""

from __future__ import annotations

import grpc
import pytest
import trio

from harness import (
    WAIT,
    GrpcClient,
    grpc_client,
    registration,
    replica_process,
    watch_stream,
)
from registry.v1 import registry_pb2 as pb

pytestmark = pytest.mark.slow


async def test_watch_on_one_replica_sees_a_registration_through_another(
    database_url: str,
) -> None:
    async with (
        replica_process(database_url) as a,
        replica_process(database_url) as b,
        grpc_client(a.port) as watching,
        grpc_client(b.port) as writing,
        watch_stream(watching.stub, pb.WatchRequest(snapshot=True)) as stream,
    ):
        assert await stream.snapshot() == ([], 0)
        registered = await writing.call("Register", registration("billing", "b-1"))
        event = await stream.receive_event()

    assert (event.revision, event.instance.instance_id) == (registered.revision, "b-1")
    assert event.type == pb.EVENT_TYPE_REGISTERED


class Writer:
    """Registers new instances one after another until stopped."""

    def __init__(self, client: GrpcClient) -> None:
        self.client = client
        # The revision of each write, in the order they were made.
        self.revisions: list[int] = []
        self.stop = trio.Event()
        self.done = trio.Event()
        self._wrote = trio.Event()

    async def run(self) -> None:
        try:
            while not self.stop.is_set():
                n = len(self.revisions)
                response = await self.client.call(
                    "Register", registration("billing", f"b-{n}")
                )
                self.revisions.append(response.revision)
                self._wrote.set()
                self._wrote = trio.Event()
        finally:
            self.done.set()

    async def wait_for(self, count: int) -> None:
        """Return once `count` writes are done."""
        while len(self.revisions) < count:
            await self._wrote.wait()


async def test_watch_resumes_on_another_replica_after_its_replica_dies(
    database_url: str,
) -> None:
    """Revisions seen across both streams are exactly those written, in
    order, although writes went on while the watcher was cut off."""
    seen: list[int] = []
    async with (
        replica_process(database_url) as a,
        replica_process(database_url) as b,
        grpc_client(a.port) as on_a,
        grpc_client(b.port) as on_b,
        trio.open_nursery() as nursery,
    ):
        writer = Writer(on_b)
        async with watch_stream(on_a.stub, pb.WatchRequest(snapshot=True)) as stream:
            assert await stream.snapshot() == ([], 0)
            nursery.start_soon(writer.run)
            while len(seen) < 10:
                seen.append((await stream.receive_event()).revision)

            a.kill()
            responses, error = await stream.status()
            seen += [r.event.revision for r in responses]
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        killed_at = len(writer.revisions)

        # Writes go on while the watcher is cut off, and while it resumes.
        with trio.fail_after(WAIT):
            await writer.wait_for(killed_at + 5)
        resumed_at = seen[-1]
        request = pb.WatchRequest(from_revision=resumed_at)
        async with watch_stream(on_b.stub, request) as stream:
            while len(seen) < killed_at + 15:
                seen.append((await stream.receive_event()).revision)
            writer.stop.set()
            with trio.fail_after(WAIT):
                await writer.done.wait()
            while seen[-1] < writer.revisions[-1]:
                seen.append((await stream.receive_event()).revision)

    assert writer.revisions == list(range(1, len(writer.revisions) + 1))
    assert seen == writer.revisions
    # Some events were written after the first replica died, and replayed.
    assert resumed_at < killed_at + 5
