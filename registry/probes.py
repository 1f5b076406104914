"""The probe scheduler: claims due probes, runs them, records the outcomes.

Replicas share the probing through registry.probes. Each replica's scheduler
leases as many due rows as it has free probe slots (FOR UPDATE SKIP LOCKED,
so no row goes to two replicas), runs each probe in a task of its own, and
records the outcome in one transaction that also releases the lease and
sets the next due time (registry.probe_store). A replica that dies keeps
its leases only until they expire; then another replica claims the rows.

Between claims the scheduler sleeps until the next row falls due, at most
the poll interval, and wakes early for a new generation of an instance with
a health check, so that a new registration is probed at once. Other events
(registrations without a check, status changes, deregistrations) bring no
row due, and leave it asleep: waking on each would cost every replica two
queries per write.

The replica's deregistration guard (registry.health_machine) sees every
outcome this replica records; while it holds, a probe that would deregister
an instance leaves it INACTIVE instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass, field

import trio

from . import probe_store
from .checks import Checker, ProbeResult
from .config import Config, env_name
from .db import Database
from .errors import InvalidArgument, Unavailable
from .health_machine import (
    DeregistrationGuard,
    GuardChange,
    GuardReason,
    Policy,
    ProbeDefaults,
    policy_for,
)
from .metrics import Metrics
from .model import CheckKind, Event, EventType, HealthCheck
from .watch import Hub

__all__ = ["ProbeSettings", "Prober", "replica_id"]

log = logging.getLogger("registry.probes")

# The shortest sleep between two claims, so that rows due but locked by
# another replica's claim in flight cannot make the scheduler spin.
_MIN_SLEEP = 0.01
# How long a stopping replica tries to give its leases back.
_RELEASE_TIMEOUT = 2.0


def brings_probe_due(event: Event) -> bool:
    """Whether `event` may have put a probe row in place or brought one
    forward: a registration, or a new generation, of an instance with a
    health check (registry.sync_probe starts its row afresh; a TTL check's
    first deadline is one TTL away, and the scheduler's sleep must know it)."""
    return (
        event.type in (EventType.REGISTERED, EventType.UPDATED)
        and event.instance.check is not None
    )


def replica_id() -> str:
    """Unique among the replicas of a registry, readable by an operator."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    defaults: ProbeDefaults = field(default_factory=ProbeDefaults)
    max_concurrent: int = 100
    # Seconds a claimed probe stays leased beyond its own timeout.
    lease: float = 10.0
    poll_interval: float = 1.0
    kubeconfig: str = ""
    # The deregistration guard.
    guard_startup: float = 60.0
    guard_window: float = 30.0
    guard_fraction: float = 0.5
    guard_min_probes: int = 10
    guard_max_hold: float = 600.0

    @classmethod
    def from_config(cls, config: Config) -> ProbeSettings:
        """The settings of `config`; InvalidArgument names a bad one."""
        _check_settings(config)
        return cls(
            defaults=ProbeDefaults(
                interval=config.probe_interval,
                timeout=config.probe_timeout,
                failure_threshold=config.failure_threshold,
                success_threshold=config.success_threshold,
                deregister_after=config.deregister_after,
                backoff_max=config.probe_backoff_max,
            ),
            max_concurrent=config.max_probes,
            lease=config.probe_lease,
            poll_interval=config.probe_poll_interval,
            kubeconfig=config.kubeconfig,
            guard_startup=config.guard_startup,
            guard_window=config.guard_window,
            guard_fraction=config.guard_fraction,
            guard_min_probes=config.guard_min_probes,
            guard_max_hold=config.guard_max_hold,
        )


def _check_settings(config: Config) -> None:
    positive = (
        "probe_interval",
        "probe_timeout",
        "probe_backoff_max",
        "probe_lease",
        "probe_poll_interval",
        "guard_window",
    )
    at_least_zero = (
        "deregister_after",
        "max_probes",
        "guard_startup",
        "guard_min_probes",
        "guard_max_hold",
        "history_retention",
    )
    at_least_one = ("failure_threshold", "success_threshold")
    for name, low, rule in (
        *((n, 0.0, "more than 0") for n in positive),
        *((n, 0.0, "0 or more") for n in at_least_zero),
        *((n, 1.0, "1 or more") for n in at_least_one),
    ):
        value = getattr(config, name)
        if value < low or (name in positive and value == 0):
            raise InvalidArgument(f"{env_name(name)}={value!r}: use {rule}")
    if not 0 < config.guard_fraction <= 1:
        raise InvalidArgument(
            f"{env_name('guard_fraction')}={config.guard_fraction!r}: use a share "
            "above 0 and at most 1, such as 0.5"
        )


class Prober:
    def __init__(
        self,
        db: Database,
        hub: Hub,
        settings: ProbeSettings,
        *,
        replica: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._hub = hub
        self._settings = settings
        self._metrics = metrics
        self.replica = replica or replica_id()
        # 0 turns probing off on this replica; a limiter needs one token.
        self._limiter = trio.CapacityLimiter(max(settings.max_concurrent, 1))
        self._slot_freed = trio.Event()
        self._claims = 0
        self._checker: Checker | None = None
        self.guard = DeregistrationGuard(
            started_at=trio.current_time(),
            startup=settings.guard_startup,
            window=settings.guard_window,
            fraction=settings.guard_fraction,
            min_probes=settings.guard_min_probes,
            max_hold=settings.guard_max_hold,
        )
        # For operators and tests: probes run, and outcomes recorded.
        self.probes_run = 0
        self.probes_recorded = 0

    @property
    def guard_active(self) -> bool:
        """Whether this replica's deregistrations wait."""
        return self.guard.active

    def policy(self, check: HealthCheck) -> Policy:
        return policy_for(check, self._settings.defaults)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Probe forever; started once the clients are open."""
        if self._settings.max_concurrent == 0:
            log.info("probing is off on this replica (max_probes is 0)")
            task_status.started()
            await trio.sleep_forever()
        self._update_guard()
        async with Checker.open(
            user_agent=f"registry-probe ({self.replica})",
            kubeconfig=self._settings.kubeconfig,
        ) as checker:
            self._checker = checker
            try:
                async with trio.open_nursery() as probes:
                    task_status.started()
                    await self._schedule(probes)
            finally:
                with trio.CancelScope(shield=True):
                    await self._release_leases()

    async def _schedule(self, probes: trio.Nursery) -> None:
        unavailable = False
        while True:
            self._update_guard()
            free = int(self._limiter.available_tokens)
            if not free:
                await self._slot_freed.wait()
                continue
            # Noticed from before the claim reads the table: a registration
            # committed meanwhile still cuts the sleep short.
            with self._hub.noticing(brings_probe_due) as brought:
                try:
                    claims = await probe_store.claim_due(
                        self._db,
                        self._next_owner(),
                        free,
                        default_timeout=self._settings.defaults.timeout,
                        lease=self._settings.lease,
                    )
                    delay = None
                    if len(claims) < free:
                        delay = await probe_store.seconds_to_next_due(self._db)
                except Unavailable as exc:
                    if not unavailable:
                        log.warning("cannot claim probes (%s); retrying", exc)
                    unavailable = True
                    await trio.sleep(self._settings.poll_interval)
                    continue
                if unavailable:
                    log.info("claiming probes again")
                    unavailable = False

                for claim in claims:
                    borrower = object()
                    self._limiter.acquire_on_behalf_of_nowait(borrower)
                    probes.start_soon(self._probe, claim, borrower)
                if len(claims) == free:
                    continue

                wait = self._settings.poll_interval
                if delay is not None:
                    wait = min(max(delay, _MIN_SLEEP), wait)
                with trio.move_on_after(wait):
                    await brought.wait()

    def _next_owner(self) -> str:
        # A lease per claim: a late record of an expired lease is dropped
        # even if this replica has claimed the row again since.
        self._claims += 1
        return f"{self.replica}/{self._claims}"

    async def _probe(self, claim: probe_store.Claim, borrower: object) -> None:
        try:
            policy = self.policy(claim.check)
            result: ProbeResult | None = None
            if claim.check.kind is not CheckKind.TTL:
                assert self._checker is not None
                result = await self._checker.probe(
                    claim.check, claim.target, policy.timeout
                )
                self.probes_run += 1
                self._observe_metrics(claim.check.kind, result)
            self._update_guard()
            recorded = await probe_store.record(
                self._db, claim, result, policy, guard_holds=self.guard.active
            )
            if recorded is None:
                return
            self.probes_recorded += 1
            if result is None:
                self.probes_run += 1
                self._observe_metrics(claim.check.kind, recorded.result)
            self.guard.record(trio.current_time(), recorded.result.healthy)
            self._update_guard()
            self._log(claim, recorded)
        except Unavailable as exc:
            log.warning(
                "cannot record the probe of %s/%s (%s); another probe follows "
                "when its lease expires",
                claim.name,
                claim.instance_id,
                exc,
                extra={"instance": f"{claim.name}/{claim.instance_id}"},
            )
        finally:
            self._limiter.release_on_behalf_of(borrower)
            self._slot_freed.set()
            self._slot_freed = trio.Event()

    def _observe_metrics(self, kind: CheckKind, result: ProbeResult) -> None:
        if self._metrics is None:
            return
        self._metrics.probes.labels(kind=kind.value).inc()
        if not result.healthy:
            self._metrics.probe_failures.labels(kind=kind.value).inc()
        if kind is not CheckKind.TTL:
            self._metrics.probe_duration.labels(kind=kind.value).observe(result.latency)

    def _log(self, claim: probe_store.Claim, recorded: probe_store.Recorded) -> None:
        who = f"{claim.name}/{claim.instance_id}"
        context = {"instance": who, "revision": recorded.revision}
        result, step = recorded.result, recorded.step
        why = "healthy" if result.healthy else result.error
        if step.deregister:
            log.info(
                "deregistered %s at revision %s: down for %.0fs; last probe: %s",
                who,
                recorded.revision,
                self.policy(claim.check).deregister_after,
                why,
                extra=context,
            )
        elif step.transition is not None:
            before, after = step.transition
            log.info(
                "%s is %s (was %s) at revision %s; last probe: %s",
                who,
                after.value,
                before.value,
                recorded.revision,
                why,
                extra=context,
            )
        elif step.held:
            log.debug(
                "not deregistering %s: the deregistration guard holds",
                who,
                extra={"instance": who},
            )

    def _update_guard(self) -> None:
        change = self.guard.update(trio.current_time())
        if change is None:
            return
        if self._metrics is not None:
            self._metrics.mass_failure_guard.set(1 if change.active else 0)
        _log_guard(change)

    async def _release_leases(self) -> None:
        with trio.move_on_after(_RELEASE_TIMEOUT):
            try:
                released = await probe_store.release_leases(
                    self._db, f"{self.replica}/"
                )
            except Unavailable:
                return
            if released:
                log.info("gave back %d probe leases", released)


def _log_guard(change: GuardChange) -> None:
    if change.active and change.reason is GuardReason.STARTUP:
        log.info(
            "deregistration guard on: %s; deregistrations wait %.0fs",
            change.reason.value,
            change.seconds,
        )
    elif change.active:
        log.warning(
            "deregistration guard on: %s (%d of the last %d probes failed); "
            "deregistrations wait at most %.0fs",
            change.reason.value,
            change.failed,
            change.probes,
            change.seconds,
        )
    else:
        log.info(
            "deregistration guard off after %.1fs (%d of the last %d probes "
            "failed); deregistrations go ahead",
            change.seconds,
            change.failed,
            change.probes,
        )
