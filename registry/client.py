"""The Python client of the registry, for Trio.

    async with registry.client.connect(["10.0.0.5:50051", "10.0.0.6:50051"]) as client:
        async with client.registered(request) as me:  # heartbeats, then deregisters
            print(me.instance_id, me.ports["grpc"], me.queues)
            billing = await client.resolve("billing")  # reads its own writes
            async with client.watch(["billing"], from_revision=me.revision) as events:
                async for item in events:  # survives replicas dying
                    ...

Endpoints are tried in order. A call that cannot reach its endpoint, loses
its connection, is refused by a replica that is shutting down (GOAWAY,
REFUSED_STREAM), or is answered UNAVAILABLE (the replica lost its database)
moves on to the next, each endpoint once per call (and the same one again
if a connection it had open turns out to be gone); every registry call is
safe to repeat, and an empty instance_id is filled in here (a random one)
so that a repeated Register replaces its own entry. Any other status from a
live replica is the call's answer and is raised at once, as is Resolve's
"no active instance", which every replica would give. Each call has a
timeout (the client's default, or the call's `timeout`), sent to the server
as grpc-timeout and enforced here too.

The client remembers the revision of its own last write, and reads (resolve,
list, and the cache) at that revision or later, on any replica.

Errors, all raised from ClientError, whose `code` is the gRPC status name:

    ClientError
    ├── InvalidArgument      INVALID_ARGUMENT: a malformed request; nothing stored
    ├── NotFound             NOT_FOUND: no such name or instance
    ├── AlreadyExists        ALREADY_EXISTS: a port the request names is held
    │                        by another instance
    ├── FailedPrecondition   FAILED_PRECONDITION: the registry is not set up
    │                        for the request (brokers without a broker)
    ├── Unauthorized         UNAUTHENTICATED, PERMISSION_DENIED: a missing,
    │                        malformed or outdated instance token
    ├── Unavailable          UNAVAILABLE: no endpoint could be reached, or
    │   │                    the replica could not serve the call (its
    │   │                    database is down)
    │   └── NoActiveInstance Resolve of a name whose instances are all
    │                        pending, inactive or draining
    ├── DeadlineExceeded     DEADLINE_EXCEEDED: the call's timeout passed,
    │                        here or on the server
    ├── OutOfRange           OUT_OF_RANGE: a watch from a compacted revision
    │                        (Watch handles it itself with a snapshot)
    ├── ResourceExhausted    RESOURCE_EXHAUSTED: a request or an answer over
    │                        the size limit
    └── CallFailed           any other status: INTERNAL, UNIMPLEMENTED, ...

Misuse (a malformed endpoint, a client used after its block) raises
ValueError or RuntimeError.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

import trio
from purerpc.grpclib.status import StatusCode

from ._client_transport import Call, Channel, ConnectionFailed, RpcError, hold_channel
from .backoff import Backoff
from .v1 import registry_pb2 as pb

__all__ = [
    "AlreadyExists",
    "Cache",
    "CallFailed",
    "Client",
    "ClientError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NoActiveInstance",
    "NotFound",
    "OutOfRange",
    "Registration",
    "ResourceExhausted",
    "Resynced",
    "Snapshot",
    "Unauthorized",
    "Unavailable",
    "Watch",
    "connect",
    "parse_endpoints",
]

log = logging.getLogger("registry.client")

SERVICE = "registry.v1.Registry"
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


# --- errors ------------------------------------------------------------------


class ClientError(Exception):
    """Base of every error the client raises for a failed call."""

    def __init__(self, message: str, *, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        # The gRPC status code's name: "NOT_FOUND", "UNAVAILABLE"...
        self.code = code


class InvalidArgument(ClientError):
    pass


class NotFound(ClientError):
    pass


class AlreadyExists(ClientError):
    pass


class FailedPrecondition(ClientError):
    pass


class Unauthorized(ClientError):
    pass


class Unavailable(ClientError):
    pass


class NoActiveInstance(Unavailable):
    """The name is registered, but none of its instances is ACTIVE; the
    message counts them by status."""


class DeadlineExceeded(ClientError):
    pass


class OutOfRange(ClientError):
    pass


class ResourceExhausted(ClientError):
    pass


class CallFailed(ClientError):
    pass


_ERRORS: dict[StatusCode, type[ClientError]] = {
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.NOT_FOUND: NotFound,
    StatusCode.ALREADY_EXISTS: AlreadyExists,
    StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    StatusCode.UNAUTHENTICATED: Unauthorized,
    StatusCode.PERMISSION_DENIED: Unauthorized,
    StatusCode.UNAVAILABLE: Unavailable,
    StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    StatusCode.OUT_OF_RANGE: OutOfRange,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


# How the server's UNAVAILABLE for a Resolve says that the name has instances
# but none of them is ACTIVE.
_NO_ACTIVE_INSTANCE = "has no active instance"


def _error(exc: RpcError) -> ClientError:
    """The one place where a gRPC status becomes a ClientError."""
    return _ERRORS.get(exc.code, CallFailed)(str(exc), code=exc.code.name)


# --- endpoints ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Endpoint:
    text: str
    host: str
    port: int


def parse_endpoints(endpoints: str | Iterable[str]) -> list[str]:
    """Endpoints from a list, or from one comma-separated string, checked:
    each is HOST:PORT ([v6-address]:PORT for IPv6)."""
    return [e.text for e in _parse_endpoints(endpoints)]


def _parse_endpoints(endpoints: str | Iterable[str]) -> list[_Endpoint]:
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = []
    for item in items:
        text = item.strip()
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(
                f"endpoint {text!r} is not HOST:PORT (a port of 1-65535); "
                "separate several endpoints with commas"
            )
        parsed.append(
            _Endpoint(text, host.removeprefix("[").removesuffix("]"), int(port))
        )
    if not parsed:
        raise ValueError("no endpoint given; pass at least one HOST:PORT")
    return parsed


# --- the client --------------------------------------------------------------


@asynccontextmanager
async def connect(
    endpoints: str | Iterable[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> AsyncIterator[Client]:
    """A client of the registry at `endpoints` ("host:port", a list of them,
    or a comma-separated string), for the duration of the block.

    `timeout` is the default of every call; `connect_timeout` bounds each
    connection attempt. Connections are opened when first needed, and all
    of them are closed when the block ends.
    """
    parsed = _parse_endpoints(endpoints)
    async with _helper_nursery() as nursery:
        client = Client(
            nursery,
            parsed,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_message_bytes=max_message_bytes,
        )
        try:
            yield client
        finally:
            client._close()


class Client:
    """A connection to the registry; made by connect()."""

    def __init__(
        self,
        nursery: trio.Nursery,
        endpoints: Sequence[_Endpoint],
        *,
        timeout: float,
        connect_timeout: float,
        max_message_bytes: int,
    ) -> None:
        self._nursery = nursery
        self._endpoints = list(endpoints)
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_message_bytes = max_message_bytes
        # The channel new calls go to, and every channel not closed yet.
        self._current: Channel | None = None
        self._channels: set[Channel] = set()
        # Index of the endpoint the next channel connects to.
        self._next = 0
        # How many channels were opened so far.
        self._opens = 0
        self._connecting = trio.Lock()
        self._closed = False
        # The revision of this client's last write, overall and per name.
        self._written = 0
        self._written_by_name: dict[str, int] = {}

    @property
    def endpoints(self) -> list[str]:
        return [e.text for e in self._endpoints]

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now (or will, once connected)."""
        if self._current is not None and self._current.usable:
            return self._current.endpoint
        return self._endpoints[self._next % len(self._endpoints)].text

    @property
    def revision(self) -> int:
        """The revision of this client's last write; reads wait for it."""
        return self._written

    # --- writes ---

    async def register(
        self, request: pb.RegisterRequest, *, timeout: float | None = None
    ) -> pb.RegisterResponse:
        """Store or replace one instance. An empty instance_id is filled in
        with a random one first (see the response's instance), so that a
        call repeated after a lost answer replaces its own entry."""
        request = _with_instance_id(request)
        response: pb.RegisterResponse = await self._unary(
            "Register", request, pb.RegisterResponse, timeout
        )
        self._wrote(request.name, response.revision)
        return response

    async def deregister(
        self, name: str, instance_id: str, token: str, *, timeout: float | None = None
    ) -> int:
        """Remove an instance; returns the revision of the removal."""
        request = pb.DeregisterRequest(name=name, instance_id=instance_id, token=token)
        response = await self._unary(
            "Deregister", request, pb.DeregisterResponse, timeout
        )
        self._wrote(name, response.revision)
        return int(response.revision)

    async def drain(
        self, name: str, instance_id: str, token: str, *, timeout: float | None = None
    ) -> int:
        """Mark an instance DRAINING; returns the revision of the change."""
        request = pb.DrainRequest(name=name, instance_id=instance_id, token=token)
        response = await self._unary("Drain", request, pb.DrainResponse, timeout)
        self._wrote(name, response.revision)
        return int(response.revision)

    async def heartbeat(
        self, name: str, instance_id: str, token: str, *, timeout: float | None = None
    ) -> pb.HeartbeatResponse:
        """Renew an instance with a TTL check."""
        request = pb.HeartbeatRequest(name=name, instance_id=instance_id, token=token)
        response: pb.HeartbeatResponse = await self._unary(
            "Heartbeat", request, pb.HeartbeatResponse, timeout
        )
        return response

    def _wrote(self, name: str, revision: int) -> None:
        self._written = max(self._written, revision)
        self._written_by_name[name] = max(self._written_by_name.get(name, 0), revision)

    # --- reads ---

    async def resolve(
        self, name: str, *, min_revision: int = 0, timeout: float | None = None
    ) -> pb.ResolveResponse:
        """The ACTIVE instances of `name`, read at `min_revision` or later
        and never before this client's own last write. NotFound when no
        instance of the name is registered, NoActiveInstance when none is
        active."""
        request = pb.ResolveRequest(
            name=name, min_revision=max(min_revision, self._written)
        )
        try:
            response: pb.ResolveResponse = await self._unary(
                "Resolve", request, pb.ResolveResponse, timeout
            )
        except Unavailable as exc:
            # TODO: the server says "no active instance" only in the text of
            # its UNAVAILABLE message, which is also its status for a lost
            # database; a machine-readable detail (trailing metadata) would
            # let the client tell them apart without reading the text.
            if _NO_ACTIVE_INSTANCE not in str(exc):
                raise
            raise NoActiveInstance(str(exc), code=exc.code) from None
        return response

    async def list(
        self,
        *,
        name: str = "",
        status: str = "",
        version: str = "",
        min_revision: int = 0,
        timeout: float | None = None,
    ) -> pb.ListResponse:
        """Instances of any status; each non-empty argument filters (status
        is "pending", "active", "inactive" or "draining")."""
        request = pb.ListRequest(
            name=name,
            status=_status(status) if status else "STATUS_UNSPECIFIED",
            version=version,
            min_revision=max(min_revision, self._written),
        )
        response: pb.ListResponse = await self._unary(
            "List", request, pb.ListResponse, timeout
        )
        return response

    async def head_revision(self, *, timeout: float | None = None) -> int:
        """The registry's newest revision (at least this client's own last
        write's), without reading any instance."""
        request = pb.ListRequest(revision_only=True, min_revision=self._written)
        response: pb.ListResponse = await self._unary(
            "List", request, pb.ListResponse, timeout
        )
        return int(response.revision)

    async def history(
        self,
        name: str,
        *,
        instance_id: str = "",
        limit: int = 0,
        timeout: float | None = None,
    ) -> pb.HistoryResponse:
        """The recorded status transitions of a name, or of one of its
        instances, newest first (`limit` 0 takes the server's default)."""
        request = pb.HistoryRequest(name=name, instance_id=instance_id, limit=limit)
        response: pb.HistoryResponse = await self._unary(
            "History", request, pb.HistoryResponse, timeout
        )
        return response

    # --- lifetimes ---

    @asynccontextmanager
    async def registered(
        self, request: pb.RegisterRequest, *, shutdown_timeout: float | None = None
    ) -> AsyncIterator[Registration]:
        """Hold a registration for the duration of the block.

        Registers at once (an empty instance_id gets a random one); with a
        TTL check, sends a heartbeat every TTL/3 and registers again (a new
        generation, on the ports it was given) if the registry lost the
        entry. Leaving the block, however it is left, cancellation included,
        drains the instance and deregisters it, shielded, within
        `shutdown_timeout` (default: the client's timeout).

        If another process registers the same instance id, the registry
        refuses this one's heartbeats (its generation is outdated): the
        block then ends with Unauthorized rather than take the entry back.
        """
        registration = Registration(self, _with_instance_id(request))
        try:
            await registration._register()
            async with _helper_nursery() as nursery:
                if registration.ttl is not None:
                    nursery.start_soon(registration._keep_alive)
                yield registration
        finally:
            if registration.token:
                await registration._leave(
                    self.timeout if shutdown_timeout is None else shutdown_timeout
                )

    @asynccontextmanager
    async def watch(
        self,
        names: Iterable[str] = (),
        *,
        from_revision: int = 0,
        snapshot: bool = False,
    ) -> AsyncIterator[Watch]:
        """Follow the events of `names` (every name if empty) for the
        duration of the block; see Watch.

        The stream starts before the block does, on the first endpoint that
        takes it within the client's timeout: Unavailable (or
        DeadlineExceeded) if none does. Once started, it resumes by itself.
        """
        watch = Watch(self, names, from_revision=from_revision, snapshot=snapshot)
        try:
            if not from_revision and not snapshot:
                # "From now on" is pinned to a revision, read once, so that
                # a resume cannot skip what happened meanwhile.
                watch.revision = await self.head_revision()
            await watch._start()
            yield watch
        finally:
            watch._close()

    @asynccontextmanager
    async def cache(self, names: Iterable[str] = ()) -> AsyncIterator[Cache]:
        """A local copy of the instances of `names` (every name if empty),
        kept current by a watch for the duration of the block; ready (its
        first snapshot in) when the block starts. See Cache."""
        cache = Cache(self, names)
        async with (
            self.watch(cache.names, snapshot=True) as watch,
            _helper_nursery() as nursery,
        ):
            with trio.move_on_after(self.timeout) as starting:
                await nursery.start(cache._follow, watch)
            if starting.cancelled_caught:
                raise Unavailable(
                    f"no snapshot for the cache within {self.timeout}s: "
                    f"{watch.last_failure or 'no answer'}",
                    code="UNAVAILABLE",
                )
            yield cache

    # --- calls ---

    async def _unary(
        self, method: str, request: Any, response_type: Any, timeout: float | None
    ) -> Any:
        timeout = self.timeout if timeout is None else timeout
        failures: list[str] = []
        # Each endpoint once; and once more if a connection opened before
        # this call turns out to be gone (a replica restarted since).
        attempts = len(self._endpoints)
        stale_retried = False
        with trio.move_on_after(timeout):
            while len(failures) < attempts:
                opens = self._opens
                channel: Channel | None = None
                try:
                    channel = await self._channel()
                    call = await channel.start_call(
                        SERVICE,
                        method,
                        request,
                        response_type,
                        deadline_header=_remaining(),
                    )
                    try:
                        return await call.receive_one()
                    finally:
                        call.close()
                except ConnectionFailed as exc:
                    failures.append(str(exc))
                    log.debug("%s failed: %s", method, exc)
                    if channel is not None and opens == self._opens:
                        if not stale_retried:
                            attempts += 1
                        stale_retried = True
                except RpcError as exc:
                    # A live replica answered. UNAVAILABLE from it means it
                    # cannot serve now (it lost its database): another
                    # replica may, if there is one left to try. Any other
                    # status is the answer, as is "no active instance",
                    # which every replica would give.
                    if (
                        exc.code is not StatusCode.UNAVAILABLE
                        or _NO_ACTIVE_INSTANCE in str(exc)
                        or len(failures) + 1 >= attempts
                    ):
                        raise _error(exc) from None
                    assert channel is not None
                    failures.append(f"{channel.endpoint}: {exc}")
                    log.debug("%s on %s: %s", method, channel.endpoint, exc)
                    channel.retire()
            raise Unavailable("; ".join(dict.fromkeys(failures)), code="UNAVAILABLE")
        raise DeadlineExceeded(
            f"no answer from {self.endpoint} within {timeout}s",
            code="DEADLINE_EXCEEDED",
        )

    async def _start_stream(
        self, method: str, request: Any, response_type: Any
    ) -> tuple[Channel, Call]:
        """A streaming call, started on the current channel (no retry)."""
        with trio.move_on_after(self.timeout):
            channel = await self._channel()
            call = await channel.start_call(
                SERVICE, method, request, response_type, deadline_header=None
            )
            return channel, call
        raise ConnectionFailed(f"no answer from {self.endpoint} within {self.timeout}s")

    async def _channel(self) -> Channel:
        if self._closed:
            raise RuntimeError(
                "the client is closed; use it inside `async with connect(...)`"
            )
        async with self._connecting:
            current = self._current
            if current is not None and current.usable:
                return current
            endpoint = self._endpoints[self._next % len(self._endpoints)]
            self._next += 1
            channel: Channel = await self._nursery.start(
                partial(
                    hold_channel,
                    endpoint.text,
                    endpoint.host,
                    endpoint.port,
                    nursery=self._nursery,
                    connect_timeout=min(self._connect_timeout, _remaining()),
                    max_message_bytes=self._max_message_bytes,
                )
            )
            if current is not None:
                current.retire()
            self._channels = {c for c in self._channels if c.failure is None}
            self._channels.add(channel)
            self._current = channel
            self._opens += 1
            log.debug("connected to %s", endpoint.text)
            return channel

    def _close(self) -> None:
        self._closed = True
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._current = None


def _remaining() -> float:
    deadline = trio.current_effective_deadline()
    return max(0.0, deadline - trio.current_time()) if deadline != math.inf else 3600.0


def _with_instance_id(request: pb.RegisterRequest) -> pb.RegisterRequest:
    if request.instance_id:
        return request
    filled = pb.RegisterRequest()
    filled.CopyFrom(request)
    filled.instance_id = uuid.uuid4().hex
    return filled


def _status(name: str) -> str:
    """The pb.Status name of a status such as "active"."""
    if name not in ("pending", "active", "inactive", "draining"):
        raise ValueError(
            f"status {name!r} is not one of pending, active, inactive, draining"
        )
    return "STATUS_" + name.upper()


# --- lifetimes ---------------------------------------------------------------


class Registration:
    """A registration held by Client.registered(). Its fields follow the
    entry through re-registrations."""

    def __init__(self, client: Client, request: pb.RegisterRequest) -> None:
        self._client = client
        self._request = request
        self.name: str = request.name
        self.instance_id: str = request.instance_id
        # The answer of the last Register.
        self.response = pb.RegisterResponse()
        # As the registry last reported it (pb.Status).
        self.status: int = pb.STATUS_UNSPECIFIED
        self.heartbeats = 0
        self.drained = False
        # Set once the block is left: the revision of the deregistration, or
        # why the registration could not be removed.
        self.deregistered_revision: int | None = None
        self.leave_error: str | None = None
        check = request.check
        self.ttl: float | None = (
            check.ttl.ttl.ToTimedelta().total_seconds()
            if check.WhichOneof("kind") == "ttl"
            else None
        )

    @property
    def token(self) -> str:
        return str(self.response.token)

    @property
    def generation(self) -> int:
        return int(self.response.instance.generation)

    @property
    def revision(self) -> int:
        """The revision of the last Register."""
        return int(self.response.revision)

    @property
    def instance(self) -> pb.Instance:
        """The entry as the last Register stored it (a pb.Instance)."""
        return self.response.instance

    @property
    def ports(self) -> Mapping[str, int]:
        """The port of each API, by name, as assigned."""
        return {api.name: api.port for api in self.response.instance.apis}

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues declared for the instance: one per broker entry, then
        its events queue if it follows names."""
        return tuple(self.response.queues)

    async def drain(self, *, timeout: float | None = None) -> int:
        """Announce the shutdown now: the instance is DRAINING, no longer
        resolved; it stays registered until the block ends."""
        revision = await self._client.drain(
            self.name, self.instance_id, self.token, timeout=timeout
        )
        self.drained = True
        self.status = pb.STATUS_DRAINING
        return revision

    async def _register(self) -> None:
        request = pb.RegisterRequest()
        request.CopyFrom(self._request)
        if self.response.token:
            # Again: keep the ports the service already listens on.
            assigned = self.ports
            for api in request.apis:
                if api.port == 0:
                    api.port = assigned.get(api.name, 0)
        # Shielded: once sent, the Register may commit, and only its answer
        # carries the token that lets leaving remove the entry. The call's
        # timeout is the deadline.
        with trio.CancelScope(shield=True):
            self.response = await self._client.register(
                request, timeout=self._client.timeout
            )
        self.status = self.response.instance.status

    async def _keep_alive(self) -> None:
        assert self.ttl is not None
        await _heartbeat_loop(
            f"{self.name}/{self.instance_id}",
            self.ttl,
            self._heartbeat,
            self._register_again,
        )

    async def _heartbeat(self) -> float:
        response = await self._client.heartbeat(
            self.name,
            self.instance_id,
            self.token,
            timeout=min(self._client.timeout, self.ttl or math.inf),
        )
        self.heartbeats += 1
        self.status = response.status
        return float(response.ttl.ToTimedelta().total_seconds())

    async def _register_again(self) -> None:
        await self._register()
        log.info(
            "registered %s/%s again, generation %d",
            self.name,
            self.instance_id,
            self.generation,
        )

    async def _leave(self, timeout: float) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(timeout) as deadline:
            await self._drain_and_deregister(timeout)
        if deadline.cancelled_caught:
            self.leave_error = (
                f"could not deregister {self.name}/{self.instance_id} within "
                f"{timeout}s; with a TTL check the registry expires it"
            )
            log.warning("%s", self.leave_error)

    async def _drain_and_deregister(self, timeout: float) -> None:
        name, instance_id = self.name, self.instance_id
        if not self.drained:
            try:
                # Half the time at most: a replica that hangs must leave the
                # other half to the deregistration, which is what matters.
                await self.drain(timeout=timeout / 2)
            except (NotFound, Unauthorized) as exc:
                log.info("%s/%s is already gone: %s", name, instance_id, exc)
                return
            except ClientError as exc:
                # Deregistering is what matters; a registry without Drain
                # (or one failing it) still gets that.
                log.warning("could not drain %s/%s: %s", name, instance_id, exc)
        try:
            self.deregistered_revision = await self._client.deregister(
                name, instance_id, self.token
            )
        except (NotFound, Unauthorized) as exc:
            log.info("%s/%s is already gone: %s", name, instance_id, exc)
        except ClientError as exc:
            self.leave_error = f"could not deregister {name}/{instance_id}: {exc}"
            log.warning("%s", self.leave_error)


async def _heartbeat_loop(
    who: str,
    ttl: float,
    heartbeat: Callable[[], Awaitable[float]],
    register_again: Callable[[], Awaitable[None]],
) -> None:
    """Keep `who` alive: `heartbeat()` every TTL/3, counted from the start of
    the previous one; it returns the TTL the registry answered (0 if none),
    which then sets the pace. The first is sent at once: it is what makes
    the instance ACTIVE.

    NotFound (the registry lost the entry: it expired or was removed) calls
    `register_again()`, at once the first time, then with a backoff. Other
    failures are retried with a backoff, within TTL/3. Unauthorized ends
    the loop with that error: the entry belongs to a newer registration of
    the same instance id, and taking it back would make the two overwrite
    each other forever.
    """
    backoff = Backoff(min(0.5, ttl / 3), ttl / 3)
    lost = False
    losses = 0
    next_at = trio.current_time()
    while True:
        await trio.sleep_until(next_at)
        started = trio.current_time()
        try:
            if lost:
                await register_again()
                lost = False
            answered = await heartbeat()
        except NotFound as exc:
            log.warning("the registry lost %s (%s); registering it again", who, exc)
            next_at = trio.current_time() + (backoff.next() if losses else 0.0)
            lost = True
            losses += 1
            continue
        except Unauthorized as exc:
            raise Unauthorized(
                f"the registry refused the heartbeat of {who} ({exc}): a newer "
                "registration of the same instance id owns the entry; this one "
                "stopped sending heartbeats",
                code=exc.code,
            ) from None
        except InvalidArgument:
            raise
        except ClientError as exc:
            if exc.code == "UNIMPLEMENTED":
                log.warning(
                    "the registry does not implement Heartbeat; %s is not kept alive",
                    who,
                )
                return
            delay = backoff.next()
            log.warning(
                "heartbeat of %s failed: %s; trying again in %.1fs", who, exc, delay
            )
            next_at = trio.current_time() + delay
            continue
        backoff.reset()
        losses = 0
        if answered > 0:
            ttl = answered
        next_at = started + ttl / 3


# --- watch -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The instances the watch follows, as they were at `revision`; the
    events that follow are those after it."""

    instances: tuple[pb.Instance, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class Resynced(Snapshot):
    """The events after the watch's last revision were compacted away before
    it could read them: here is the state at `revision` instead. Replace
    what was known; events go on from `revision`."""


# A watch's failures it resumes from (on another endpoint, after a backoff).
_RESUMABLE = {
    StatusCode.UNAVAILABLE,
    StatusCode.RESOURCE_EXHAUSTED,
    StatusCode.CANCELLED,
    StatusCode.DEADLINE_EXCEEDED,
    StatusCode.ABORTED,
    StatusCode.INTERNAL,
    StatusCode.UNKNOWN,
}


class Watch:
    """An async iterator of the events of some names, made by Client.watch().

    Yields pb.Event items, in revision order, each once; and Snapshot items:
    first, when asked for a snapshot, and as a Resynced whenever the events
    it had to resume from were compacted. Progress messages are not yielded:
    they move `revision` on.

    It survives replicas: on a lost connection, a draining replica or a
    stream ended as too slow, it resumes (from `revision`, on the next
    endpoint, after a jittered backoff) and drops what it already yielded.
    It ends only when its block does, or raises a ClientError that retrying
    cannot fix (an invalid name, say).

    With neither from_revision nor snapshot, it follows the events after the
    revision current when its block began. (Revision 0 cannot be asked for:
    a watch begun on a registry that never saw an event, whose stream then
    breaks before its first message, resumes from that moment.)
    """

    def __init__(
        self,
        client: Client,
        names: Iterable[str],
        *,
        from_revision: int,
        snapshot: bool,
    ) -> None:
        self._client = client
        self.names = tuple(names)
        # Every event up to here has been yielded (or was in a snapshot).
        self.revision = from_revision
        # Why the last attempt to follow failed, for error messages.
        self.last_failure: str | None = None
        self._want_snapshot = snapshot
        self._resyncing = False
        self._channel: Channel | None = None
        self._call: Call | None = None
        self._pending: list[pb.Instance] = []
        self._backoff = Backoff(0.1, 5.0)
        self._closed = False

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> pb.Event | Snapshot:
        while True:
            if self._closed:
                raise RuntimeError("the watch is closed; iterate inside its block")
            if self._call is None:
                await self._open()
            assert self._call is not None
            try:
                response = await self._call.receive()
            except ConnectionFailed as exc:
                await self._resume(str(exc))
                continue
            except RpcError as exc:
                await self._failed(exc)
                continue
            if response is None:
                # The replica is shutting down and ended the stream cleanly.
                # Still a backoff: one that ends every stream at once must
                # not be called in a hot loop. (The backoff restarts with
                # each message, so a stream that served waits little.)
                endpoint = self._drop_call()
                delay = self._backoff.next()
                log.info(
                    "%s ended the watch; resuming from %d in %.1fs",
                    endpoint,
                    self.revision,
                    delay,
                )
                await trio.sleep(delay)
                continue
            self._backoff.reset()
            item = self._take(response)
            if item is not None:
                return item

    def _take(self, response: pb.WatchResponse) -> pb.Event | Snapshot | None:
        kind = response.WhichOneof("kind")
        if kind == "snapshot":
            self._pending.append(response.snapshot)
        elif kind == "snapshot_end":
            kind_of = Resynced if self._resyncing else Snapshot
            snapshot = kind_of(tuple(self._pending), response.snapshot_end.revision)
            self._pending = []
            self._want_snapshot = self._resyncing = False
            self.revision = snapshot.revision
            return snapshot
        elif kind == "progress":
            self.revision = max(self.revision, response.progress.revision)
        elif kind == "event" and response.event.revision > self.revision:
            self.revision = response.event.revision
            return response.event
        return None

    async def _start(self) -> None:
        """Open the first stream: each endpoint once, within the client's
        timeout."""
        client = self._client
        failures: list[str] = []
        with trio.move_on_after(client.timeout):
            while len(failures) < len(client._endpoints):
                failure = await self._try_open()
                if failure is None:
                    return
                failures.append(failure)
            raise Unavailable("; ".join(dict.fromkeys(failures)), code="UNAVAILABLE")
        raise DeadlineExceeded(
            f"no watch stream started within {client.timeout}s"
            + (f" ({self.last_failure})" if self.last_failure else ""),
            code="DEADLINE_EXCEEDED",
        )

    async def _open(self) -> None:
        while (failure := await self._try_open()) is not None:
            delay = self._backoff.next()
            log.warning("cannot watch: %s; trying again in %.1fs", failure, delay)
            await trio.sleep(delay)

    async def _try_open(self) -> str | None:
        """Start the stream; None once started, else why it could not."""
        request = pb.WatchRequest(
            names=self.names,
            from_revision=0 if self._want_snapshot else self.revision,
            snapshot=self._want_snapshot,
        )
        try:
            self._channel, self._call = await self._client._start_stream(
                "Watch", request, pb.WatchResponse
            )
        except ConnectionFailed as exc:
            self.last_failure = str(exc)
            return self.last_failure
        except RpcError as exc:
            if exc.code not in _RESUMABLE:
                raise _error(exc) from None
            self.last_failure = str(exc)
            return self.last_failure
        self._pending = []
        return None

    async def _resume(self, failure: str) -> None:
        self._drop_call()
        self.last_failure = failure
        delay = self._backoff.next()
        log.warning(
            "watch interrupted: %s; resuming from %d in %.1fs",
            failure,
            self.revision,
            delay,
        )
        await trio.sleep(delay)

    async def _failed(self, exc: RpcError) -> None:
        if exc.code is StatusCode.OUT_OF_RANGE:
            log.warning("%s; taking a snapshot", exc)
            self._drop_call()
            self._want_snapshot = self._resyncing = True
            return
        if exc.code not in _RESUMABLE:
            self._drop_call()
            raise _error(exc) from None
        if exc.code is StatusCode.UNAVAILABLE and self._channel is not None:
            # This replica cannot serve: the next attempt goes elsewhere.
            self._channel.retire()
        await self._resume(str(exc))

    def _drop_call(self) -> str:
        endpoint = self._channel.endpoint if self._channel is not None else "?"
        if self._call is not None:
            self._call.close()
        self._call = None
        self._channel = None
        return endpoint

    def _close(self) -> None:
        self._drop_call()
        self._closed = True


# --- cache -------------------------------------------------------------------


class Cache:
    """The instances of some names, kept current by a watch; made by
    Client.cache().

    resolve() answers from memory. After a write by its own client, it waits
    until the cache has seen that write's revision, so the client reads its
    own writes through the cache as well.
    """

    def __init__(self, client: Client, names: Iterable[str]) -> None:
        self._client = client
        self.names = frozenset(names)
        # Every event up to here (of the names followed) has been applied.
        self.revision = 0
        self._instances: dict[str, dict[str, pb.Instance]] = {}
        self._advanced = trio.Event()

    def follows(self, name: str) -> bool:
        return not self.names or name in self.names

    async def resolve(
        self, name: str, *, timeout: float | None = None
    ) -> list[pb.Instance]:
        """The ACTIVE instances of `name` (pb.Instance), by instance id; an
        empty list when there is none."""
        if not self.follows(name):
            raise ValueError(
                f"the cache follows {sorted(self.names)}, not {name!r}; "
                "resolve it with the client"
            )
        await self.wait_for(self._client._written_by_name.get(name, 0), timeout=timeout)
        instances = self._instances.get(name, {})
        return [
            instances[key]
            for key in sorted(instances)
            if instances[key].status == pb.STATUS_ACTIVE
        ]

    async def wait_for(self, revision: int, *, timeout: float | None = None) -> None:
        """Return once the cache has applied every event up to `revision` of
        the names it follows."""
        timeout = self._client.timeout if timeout is None else timeout
        with trio.move_on_after(timeout):
            while self.revision < revision:
                await self._advanced.wait()
            return
        raise DeadlineExceeded(
            f"the cache has not seen revision {revision} within {timeout}s "
            f"(it is at {self.revision})",
            code="DEADLINE_EXCEEDED",
        )

    async def _follow(
        self,
        watch: Watch,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        ready = False
        async for item in watch:
            if isinstance(item, Snapshot):
                self._instances = {}
                for instance in item.instances:
                    self._instances.setdefault(instance.name, {})[
                        instance.instance_id
                    ] = instance
            else:
                instance = item.instance
                if item.type == pb.EVENT_TYPE_DEREGISTERED:
                    self._instances.get(instance.name, {}).pop(
                        instance.instance_id, None
                    )
                else:
                    self._instances.setdefault(instance.name, {})[
                        instance.instance_id
                    ] = instance
            self.revision = watch.revision
            self._advanced.set()
            self._advanced = trio.Event()
            if not ready:
                ready = True
                task_status.started()


# --- helpers -----------------------------------------------------------------


@asynccontextmanager
async def _helper_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for the helper tasks of a block: they are cancelled when
    the block ends, and an exception of the block leaves it as itself, not
    wrapped in an ExceptionGroup, so that `except NotFound` still works
    around it."""
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        _reraise(group.exceptions[0])


def _reraise(exc: BaseException) -> NoReturn:
    # Raised as it was: keep its own context rather than the group's.
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
