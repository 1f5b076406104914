from __future__ import annotations

import trio

from harness import grpc_client, registration, replica_process, start_replica
from registry.v1 import registry_pb2 as pb


async def test_register_then_resolve_in_process(
    nursery: trio.Nursery, database_url: str
) -> None:
    replica = await start_replica(nursery, database_url)
    assert replica.port is not None
    async with grpc_client(replica.port) as client:
        registered = await client.call("Register", registration())
        resolved = await client.call("Resolve", pb.ResolveRequest(name="billing"))
    assert [i.instance_id for i in resolved.instances] == [
        registered.instance.instance_id
    ]
    replica.stop()


async def test_replica_process_serves(database_url: str) -> None:
    async with replica_process(database_url) as replica:
        async with grpc_client(replica.port) as client:
            registered = await client.call("Register", registration())
        assert registered.revision == 1
