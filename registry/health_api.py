"""The health RPCs of the Registry service: Heartbeat, Drain and History."""

from __future__ import annotations

import logging

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from . import probe_store, tokens
from ._convert import STATUS_TO_PB
from ._grpc import Call, Method
from .cache import ResolveCache
from .db import Database
from .errors import InvalidArgument
from .health_machine import Policy, ProbeDefaults, policy_for
from .model import HealthCheck
from .v1 import registry_pb2 as pb
from .validation import validate_instance_id, validate_name

__all__ = ["DEFAULT_HISTORY", "MAX_HISTORY", "HealthApi"]

log = logging.getLogger("registry.health_api")

DEFAULT_HISTORY = 20
MAX_HISTORY = 1000


class HealthApi:
    def __init__(
        self, db: Database, defaults: ProbeDefaults, cache: ResolveCache
    ) -> None:
        self._db = db
        self._defaults = defaults
        # Each status change made here drops its name's Resolve answer.
        self._cache = cache

    def methods(self) -> dict[str, Method]:
        return {
            "Heartbeat": Method(pb.HeartbeatRequest, self.heartbeat),
            "Drain": Method(pb.DrainRequest, self.drain),
            "History": Method(pb.HistoryRequest, self.history),
        }

    async def heartbeat(
        self, request: pb.HeartbeatRequest, call: Call
    ) -> pb.HeartbeatResponse:
        name = validate_name("name", request.name)
        instance_id = validate_instance_id("instance_id", request.instance_id)
        token = tokens.parse_token(request.token)
        beat = await probe_store.heartbeat(
            self._db, name, instance_id, token, self._policy
        )
        if beat.revision is not None:
            self._cache.forget(name)
            log.info(
                "%s/%s is %s after a heartbeat, at revision %d",
                name,
                instance_id,
                beat.status.value,
                beat.revision,
                extra={"instance": f"{name}/{instance_id}", "revision": beat.revision},
            )
        return pb.HeartbeatResponse(
            status=STATUS_TO_PB[beat.status], ttl=_duration(beat.ttl)
        )

    async def drain(self, request: pb.DrainRequest, call: Call) -> pb.DrainResponse:
        name = validate_name("name", request.name)
        instance_id = validate_instance_id("instance_id", request.instance_id)
        token = tokens.parse_token(request.token)
        revision, before = await probe_store.drain(self._db, name, instance_id, token)
        self._cache.forget(name)
        log.info(
            "%s/%s is draining (was %s) at revision %d",
            name,
            instance_id,
            before.value,
            revision,
            extra={"instance": f"{name}/{instance_id}", "revision": revision},
        )
        return pb.DrainResponse(revision=revision)

    async def history(
        self, request: pb.HistoryRequest, call: Call
    ) -> pb.HistoryResponse:
        name = validate_name("name", request.name)
        instance_id = request.instance_id
        if instance_id:
            validate_instance_id("instance_id", instance_id)
        limit = request.limit or DEFAULT_HISTORY
        if limit > MAX_HISTORY:
            raise InvalidArgument(
                f"limit: {limit!r} is too many; ask for at most {MAX_HISTORY}, "
                f"or 0 for the last {DEFAULT_HISTORY}"
            )
        transitions = await probe_store.history(self._db, name, instance_id, limit)
        return pb.HistoryResponse(
            transitions=[_transition_to_pb(t) for t in transitions]
        )

    def _policy(self, check: HealthCheck) -> Policy:
        return policy_for(check, self._defaults)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _transition_to_pb(transition: probe_store.Transition) -> pb.Transition:
    time = Timestamp()
    time.FromDatetime(transition.time)
    message = pb.Transition(
        name=transition.name,
        instance_id=transition.instance_id,
        from_status=STATUS_TO_PB[transition.from_status],
        to_status=STATUS_TO_PB[transition.to_status],
        time=time,
        revision=transition.revision,
    )
    if transition.probe is not None:
        message.probe.CopyFrom(
            pb.ProbeResult(
                healthy=transition.probe.healthy,
                code=transition.probe.code,
                error=transition.probe.error,
                latency=_duration(transition.probe.latency),
            )
        )
    return message
