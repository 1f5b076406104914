"""The Registry API: request handlers over the store and the hub."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from . import store, tokens
from ._convert import STATUS_FROM_PB, event_to_pb, instance_to_pb
from ._grpc import Call, Method, Service
from .broker import Broker
from .cache import Answer
from .db import Database
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from .group_commit import Committer
from .health_api import HealthApi
from .health_machine import ProbeDefaults
from .model import Event, Instance, Registration, Status
from .ports import DEFAULT_POLICY, PortPolicy
from .topology import Topology, plan
from .v1 import registry_pb2 as pb
from .validation import (
    validate_instance_id,
    validate_min_revision,
    validate_name,
    validate_registration,
    validate_version,
)
from .watch import Ended, Hub, Progress, Watcher

log = logging.getLogger("registry.service")

SERVICE_NAME = "registry.v1.Registry"


@dataclass(frozen=True, slots=True)
class WatchSettings:
    # Events a stream may hold unsent before it is ended as too slow.
    buffer: int = 1024
    # Events read from the log per query while replaying.
    page_size: int = 500
    # How long a read with min_revision waits when the call has no deadline.
    max_revision_wait: float = 30.0


class _EventResponses:
    """Each event's WatchResponse, built and serialized once for all the
    streams it goes to: done per stream, it cost a replica fanning out to 500
    watchers about as much CPU as sending them. Per replica, since a revision
    names one event of one database."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._built: dict[int, bytes] = {}

    def of(self, event: Event) -> bytes:
        response = self._built.get(event.revision)
        if response is None:
            response = pb.WatchResponse(event=event_to_pb(event)).SerializeToString()
            if len(self._built) >= self._size:
                # The oldest first: dicts keep their insertion order.
                del self._built[next(iter(self._built))]
            self._built[event.revision] = response
        return response


class RegistryService:
    def __init__(
        self,
        db: Database,
        hub: Hub,
        settings: WatchSettings,
        probe_defaults: ProbeDefaults | None = None,
        *,
        ports: PortPolicy = DEFAULT_POLICY,
        broker: Broker | None = None,
        events_exchange: str = "registry.events",
        committer: Committer | None = None,
    ) -> None:
        self._db = db
        self._hub = hub
        # Registrations are stored in batches through it, when running.
        self._committer = committer
        self._settings = settings
        self._ports = ports
        # None: no broker is configured, and broker features are off.
        self._broker = broker
        self._events_exchange = events_exchange
        # Heartbeat, Drain and History.
        self._health = HealthApi(db, probe_defaults or ProbeDefaults(), hub.cache)
        self._event_responses = _EventResponses()

    def service(self) -> Service:
        return Service(
            SERVICE_NAME,
            {
                "Register": Method(pb.RegisterRequest, self.register),
                "Deregister": Method(pb.DeregisterRequest, self.deregister),
                "Resolve": Method(pb.ResolveRequest, self.resolve),
                "List": Method(pb.ListRequest, self.list),
                "Watch": Method(pb.WatchRequest, self.watch, streaming=True),
                **self._health.methods(),
            },
        )

    async def register(
        self, request: pb.RegisterRequest, call: Call
    ) -> pb.RegisterResponse:
        registration = validate_registration(
            request, new_instance_id=lambda: uuid.uuid4().hex
        )
        # The queues first: a registration whose topology cannot be declared
        # is not stored.
        topology = plan(registration, self._events_exchange)
        await self._declare(registration, topology)
        registration = dataclasses.replace(registration, brokers=topology.brokers)

        # Until the registry probes it, an instance without a check is taken
        # at its word; one with a check waits to be proven healthy.
        status = Status.ACTIVE if registration.check is None else Status.PENDING
        secret, secret_hash = tokens.new_secret()
        instance = await store.put_instance(
            self._db,
            registration,
            status,
            secret_hash,
            ports=self._ports,
            events_queue=topology.events_queue,
            committer=self._committer,
        )
        self._hub.cache.forget(instance.name)
        log.info(
            "registered %s/%s generation %d (%s) at revision %d",
            instance.name,
            instance.instance_id,
            instance.generation,
            instance.status,
            instance.revision,
            extra={
                "instance": f"{instance.name}/{instance.instance_id}",
                "revision": instance.revision,
            },
        )
        return pb.RegisterResponse(
            instance=instance_to_pb(instance),
            revision=instance.revision,
            token=tokens.format_token(instance.generation, secret),
            queues=topology.queues,
        )

    async def _declare(self, registration: Registration, topology: Topology) -> None:
        if not topology.bindings:
            return
        if self._broker is None:
            field = "brokers" if registration.brokers else "follows"
            raise FailedPrecondition(
                f"{field}: this registry runs without a broker (REGISTRY_AMQP_URL "
                "is unset), so it declares no queues; register without brokers "
                "and follows, or have the registry configured with a broker"
            )
        await self._broker.declare(topology.bindings)

    async def deregister(
        self, request: pb.DeregisterRequest, call: Call
    ) -> pb.DeregisterResponse:
        name = validate_name("name", request.name)
        instance_id = validate_instance_id("instance_id", request.instance_id)
        token = tokens.parse_token(request.token)
        revision = None
        while revision is None:
            current = await store.credentials(self._db, name, instance_id)
            if current is None:
                raise NotFound(f"no instance {instance_id!r} of {name!r} is registered")
            tokens.check_token(token, *current)
            # None: it changed between the two reads; look again.
            revision = await store.delete_instance(
                self._db, name, instance_id, token.generation, token.secret_hash
            )
        self._hub.cache.forget(name)
        log.info(
            "deregistered %s/%s generation %d at revision %d",
            name,
            instance_id,
            token.generation,
            revision,
            extra={"instance": f"{name}/{instance_id}", "revision": revision},
        )
        return pb.DeregisterResponse(revision=revision)

    async def resolve(self, request: pb.ResolveRequest, call: Call) -> bytes:
        """The ResolveResponse, serialized: from the cache when the hub has
        reached min_revision, else read (and cached) at min_revision or later."""
        name = validate_name("name", request.name)
        min_revision = validate_min_revision("min_revision", request.min_revision)
        cache = self._hub.cache
        answer = cache.get(name) if min_revision <= self._hub.revision else None
        if answer is not None:
            # Still cached, so current at the hub's revision.
            revision = max(answer.read_at, self._hub.revision)
        else:
            fill = cache.begin(name)
            read_at, instances = await self._select(min_revision, names=[name])
            answer = _resolve_answer(name, instances, read_at)
            if fill is not None:
                cache.put(fill, answer)
            # Read just now: the hub may have gone past it meanwhile.
            revision = read_at
        if answer.error is not None:
            kind, message = answer.error
            raise kind(message)
        return answer.body + pb.ResolveResponse(revision=revision).SerializeToString()

    async def list(self, request: pb.ListRequest, call: Call) -> pb.ListResponse:
        names = [validate_name("name", request.name)] if request.name else []
        status = STATUS_FROM_PB.get(request.status)
        if status is None and request.status != pb.STATUS_UNSPECIFIED:
            # proto3 enums are open: an unknown number must not mean "any".
            raise InvalidArgument(
                f"status: {request.status!r} is not a status; use STATUS_PENDING, "
                "STATUS_ACTIVE, STATUS_INACTIVE or STATUS_DRAINING, or leave it unset"
            )
        if request.version:
            validate_version("version", request.version)
        if request.revision_only:
            min_revision = validate_min_revision("min_revision", request.min_revision)
            # As _select: a revision committed by any replica is there at once.
            while (head := await store.head_revision(self._db)) < min_revision:
                await self._wait_for_revision(min_revision)
            return pb.ListResponse(revision=head)
        revision, instances = await self._select(
            request.min_revision, names=names, status=status, version=request.version
        )
        return pb.ListResponse(
            instances=[instance_to_pb(i) for i in instances], revision=revision
        )

    async def watch(self, request: pb.WatchRequest, call: Call) -> None:
        names = [validate_name(f"names[{i}]", n) for i, n in enumerate(request.names)]
        from_revision = validate_min_revision("from_revision", request.from_revision)
        if self._hub.draining:
            raise Unavailable("this replica is shutting down; watch another one")
        watcher = Watcher(names, self._settings.buffer)
        try:
            if request.snapshot:
                cursor = await self._send_snapshot(call, names)
            elif from_revision:
                await self._check_not_ahead(from_revision)
                cursor = await self._replay(call, names, from_revision)
            else:
                cursor = self._hub.revision
            # No await between catching up and attaching: nothing slips by.
            self._hub.attach(watcher, max(cursor, self._hub.revision))
            await self._stream_live(call, watcher)
        finally:
            self._hub.detach(watcher)

    async def _check_not_ahead(self, from_revision: int) -> None:
        """Refuse a revision the log has not reached: a cursor from another
        registry, or from before its database was restored. Following it would
        skip every event up to it in silence."""
        if from_revision <= self._hub.revision:
            return
        head = await store.head_revision(self._db)
        if from_revision > head:
            raise OutOfRange(
                f"from_revision: {from_revision} is ahead of the newest revision, "
                f"{head}; the cursor belongs to another registry or to its "
                "database before a restore: watch with a snapshot instead"
            )

    async def _send_snapshot(self, call: Call, names: Sequence[str]) -> int:
        revision, instances = await store.select_instances(self._db, names=names)
        for instance in instances:
            await call.send(pb.WatchResponse(snapshot=instance_to_pb(instance)))
        await call.send(
            pb.WatchResponse(snapshot_end=pb.SnapshotEnd(revision=revision))
        )
        return await self._replay(call, names, revision)

    async def _replay(self, call: Call, names: Sequence[str], after: int) -> int:
        """Send the logged events after `after` until caught up with the hub;
        return the revision sent up to."""
        cursor = after
        while cursor < self._hub.revision:
            page = await store.events_after(
                self._db, cursor, names=names, limit=self._settings.page_size
            )
            if page.compacted > cursor:
                raise OutOfRange(
                    f"revision {cursor + 1} has been compacted; the oldest revision "
                    f"held is {page.compacted + 1}; watch with a snapshot instead"
                )
            for event in page.events:
                await call.send(self._event_responses.of(event))
                cursor = event.revision
            if len(page.events) < self._settings.page_size:
                cursor = max(cursor, page.head)
        return cursor

    async def _stream_live(self, call: Call, watcher: Watcher) -> None:
        sent = watcher.cursor
        with trio.CancelScope() as ended:
            # A stream stuck sending to a slow client must still learn that
            # it has ended.
            watcher.on_end = ended.cancel
            while (item := await watcher.receive()) is not None:
                if isinstance(item, Progress):
                    # The hub's ticker found the stream idle: every event
                    # up to this revision that it follows has been sent.
                    await call.send(
                        pb.WatchResponse(progress=pb.Progress(revision=item.revision))
                    )
                    continue
                await call.send(self._event_responses.of(item))
                sent = item.revision
        if watcher.ended is Ended.BEHIND:
            raise ResourceExhausted(
                f"the watcher fell behind the events at revision {sent}; "
                f"resume with from_revision={sent} and read faster"
            )
        if watcher.ended is Ended.COMPACTED:
            raise OutOfRange(
                f"this replica lost events after revision {sent} to compaction; "
                "watch again with a snapshot"
            )
        # Ended.DRAINING: end the stream cleanly, the client resumes elsewhere.

    async def _select(
        self,
        min_revision: int,
        *,
        names: Sequence[str],
        status: Status | None = None,
        version: str = "",
    ) -> tuple[int, Sequence[Instance]]:
        """Matching instances, read at `min_revision` or later.

        Replicas share the database, so a revision committed by any of them is
        there at the first read; only one not committed yet waits, until this
        replica's notifier sees it.
        """
        validate_min_revision("min_revision", min_revision)
        while True:
            revision, instances = await store.select_instances(
                self._db, names=names, status=status, version=version
            )
            if revision >= min_revision:
                return revision, instances
            await self._wait_for_revision(min_revision)

    async def _wait_for_revision(self, min_revision: int) -> None:
        if min_revision <= self._hub.revision:
            return
        log.debug(
            "waiting for revision %d; this replica is at %d",
            min_revision,
            self._hub.revision,
        )
        with trio.move_on_after(self._settings.max_revision_wait):
            await self._hub.wait_for(min_revision)
            return
        raise DeadlineExceeded(
            f"this replica has not seen revision {min_revision} yet "
            f"(it is at {self._hub.revision}); retry, or ask another replica"
        )


def _resolve_answer(name: str, instances: Sequence[Instance], read_at: int) -> Answer:
    if not instances:
        message = f"no instance of {name!r} is registered"
        return Answer(read_at, error=(NotFound, message))
    active = [i for i in instances if i.status is Status.ACTIVE]
    if not active:
        counts = Counter(i.status.value for i in instances)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        return Answer(
            read_at, error=(Unavailable, f"{name!r} has no active instance: {summary}")
        )
    # The instances alone: a serialized message followed by another is read
    # as one with the fields of both, so the revision is appended per call.
    body = pb.ResolveResponse(instances=[instance_to_pb(i) for i in active])
    return Answer(read_at, body=body.SerializeToString())
