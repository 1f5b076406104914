"""Probes shared between real replica processes: each due probe goes to
exactly one replica, and a replica that is killed loses its probes to the
others once its leases expire.

The probed services are one HttpTarget in the test process listening on 200
ports, one per instance; every request carries the probing replica's id
(host:pid:...) in its User-Agent, so each hit says who probed whom and when.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import trio
from google.protobuf.duration_pb2 import Duration

from harness import WAIT, GrpcClient, grpc_client, registration, replica_process
from probe_targets import Hit, HttpTarget
from registry.v1 import registry_pb2 as pb

pytestmark = pytest.mark.slow

INSTANCES = 200
INTERVAL = 1.0
TIMEOUT = 0.8
LEASE = 1.0
# Several intervals watched with both replicas up, then with one.
WATCHED = 3.0
REPLICA_ENV = {
    "REGISTRY_MAX_PROBES": "100",
    "REGISTRY_GUARD_STARTUP": "0",
    "REGISTRY_PROBE_LEASE": str(LEASE),
    "REGISTRY_PROBE_POLL_INTERVAL": "0.5",
    "REGISTRY_POOL_SIZE": "4",
}


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


async def register_all(client: GrpcClient, ports: list[int]) -> None:
    check = pb.HealthCheck(
        http=pb.HttpCheck(path="/healthz"),
        interval=seconds(INTERVAL),
        timeout=seconds(TIMEOUT),
        # This test is about who probes when: a probe slowed past its
        # timeout by a loaded machine must not make an instance inactive,
        # which would stretch its interval (backoff).
        failure_threshold=100,
    )
    todo = iter(enumerate(ports))

    async def worker() -> None:
        for n, port in todo:
            request = registration("billing", f"b-{n:03}")
            del request.apis[:]
            request.apis.append(pb.Api(name="http", port=port))
            request.check.CopyFrom(check)
            await client.call("Register", request)

    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(worker)


async def wait_until(target: HttpTarget, moment: float, per_port: int) -> None:
    """Return once every port has `per_port` hits at or after `moment`."""
    for port in target.ports:
        before = sum(1 for h in target.hits if h.port == port and h.time < moment)
        await target.wait_for_hits(before + per_port, port)


def hits_between(target: HttpTarget, start: float, end: float) -> dict[int, list[Hit]]:
    by_port: dict[int, list[Hit]] = defaultdict(list)
    for hit in target.hits:
        if start <= hit.time < end:
            by_port[hit.port].append(hit)
    return by_port


def prober_pid(hit: Hit) -> int:
    # "registry-probe (host:pid:random)"
    return int(hit.headers["user-agent"].split(":")[-2])


async def test_replicas_share_probes_once_per_interval_and_take_over_from_a_killed_one(
    nursery: trio.Nursery, database_url: str
) -> None:
    target = HttpTarget()
    ports = await target.serve(nursery, count=INSTANCES)

    async with (
        replica_process(database_url, **REPLICA_ENV) as a,
        replica_process(database_url, **REPLICA_ENV) as b,
        grpc_client(b.port) as client,
    ):
        await register_all(client, ports)
        # Every instance probed once: all are registered and scheduled.
        settled = trio.current_time()
        await wait_until(target, settled, 1)

        # Both replicas up: every instance once per interval, never twice.
        start = trio.current_time()
        await wait_until(target, start + WATCHED, 1)
        shared = hits_between(target, start, start + WATCHED)
        assert len(shared) == INSTANCES
        for port, hits in shared.items():
            assert WATCHED / INTERVAL - 1 <= len(hits) <= WATCHED / INTERVAL + 1, port
            gaps = [b.time - a.time for a, b in itertools.pairwise(hits)]
            # Two replicas probing one instance would leave gaps near 0 (the
            # schedule never puts two probes less than half an interval
            # apart); a skipped interval, a gap of two. A loaded machine
            # delays single probes, within those bounds.
            assert min(gaps) > INTERVAL * 0.4, (port, gaps)
            assert max(gaps) < INTERVAL * 2, (port, gaps)
        probers = {prober_pid(h) for hits in shared.values() for h in hits}
        assert probers == {a.process.pid, b.process.pid}

        # Kill one: the other takes over its probes once their leases expire.
        a.kill()
        killed = trio.current_time()
        with trio.fail_after(WAIT):
            await a.process.wait()
        await wait_until(target, killed, 2)
        end = trio.current_time()

    # The last probe by the killed replica began before it died; any later
    # hit is the survivor's.
    after = hits_between(target, killed + 0.1, end)
    assert {prober_pid(h) for hits in after.values() for h in hits} == {b.process.pid}
    # The last claim of the killed replica came at most an interval after
    # its last probe, and its lease lasts TIMEOUT + LEASE from the claim;
    # then the survivor's scheduler wakes for it (a second of slack for a
    # loaded machine).
    takeover_limit = INTERVAL + TIMEOUT + LEASE + 1.0
    for port in ports:
        hits = [h for h in target.hits if h.port == port]
        last_before = max(h.time for h in hits if h.time < killed)
        first_after = min(h.time for h in hits if h.time >= killed)
        assert first_after - last_before < takeover_limit, port
        later = [h.time for h in hits if h.time >= first_after]
        gaps = [y - x for x, y in itertools.pairwise(later)]
        assert min(gaps) > INTERVAL * 0.4, (port, gaps)
