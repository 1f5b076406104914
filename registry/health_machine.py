"""How probe outcomes become statuses: the status machine and the
deregistration guard, as plain logic without I/O.

Times are plain floats in seconds, on whatever clock the caller uses (the
prober passes Postgres time as epoch seconds); nothing here reads a clock.

The status machine, one instance at a time:

    PENDING  --M successes-->  ACTIVE  --N failures-->  INACTIVE
    PENDING  --N failures-->   INACTIVE  --M successes-->  ACTIVE
    DRAINING  stays DRAINING: probes go on, but never move it

An instance is *down* from the probe that completes N consecutive failures
(the one that makes it INACTIVE, or would if it were not draining) until M
consecutive successes. A down instance is probed with a delay that doubles
from the interval up to a cap, and is deregistered once down for
`deregister_after` seconds (0 keeps it forever), unless the guard holds.

The guard keeps a replica from deregistering the fleet after its own
trouble: it holds right after the replica starts, and while most recent
probes fail (the replica's network being the likelier cause), for at most
`max_hold` seconds in a row.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, replace

from .model import HealthCheck, Status

__all__ = [
    "DeregistrationGuard",
    "GuardChange",
    "Policy",
    "ProbeDefaults",
    "ProbeState",
    "Step",
    "next_due",
    "observe",
    "policy_for",
]

# Beyond this many doublings the delay is at its cap anyway.
_MAX_DOUBLINGS = 32


@dataclass(frozen=True, slots=True)
class ProbeDefaults:
    """What an instance's check leaves unset."""

    interval: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    # Seconds down before deregistration; 0 keeps instances forever.
    deregister_after: float = 600.0
    # The longest delay between probes of a down instance.
    backoff_max: float = 60.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The timings and thresholds in force for one instance."""

    interval: float
    timeout: float
    failure_threshold: int
    success_threshold: int
    deregister_after: float
    backoff_max: float


def policy_for(check: HealthCheck, defaults: ProbeDefaults) -> Policy:
    interval = check.interval_seconds or defaults.interval
    # A probe must end before the next one starts, whatever the defaults say.
    timeout = min(check.timeout_seconds or defaults.timeout, interval)
    deregister_after = check.deregister_after_seconds
    return Policy(
        interval=interval,
        timeout=timeout,
        failure_threshold=check.failure_threshold or defaults.failure_threshold,
        success_threshold=check.success_threshold or defaults.success_threshold,
        deregister_after=(
            defaults.deregister_after if deregister_after is None else deregister_after
        ),
        backoff_max=max(defaults.backoff_max, interval),
    )


@dataclass(frozen=True, slots=True)
class ProbeState:
    status: Status
    # Consecutive outcomes; one of the two is always 0.
    successes: int = 0
    failures: int = 0
    # When the instance went down; None while it is up.
    down_since: float | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """What one probe outcome does."""

    state: ProbeState
    # (from, to) when the status changes.
    transition: tuple[Status, Status] | None = None
    deregister: bool = False
    # Deregistration was due, but the guard held it.
    held: bool = False


def observe(
    state: ProbeState,
    healthy: bool,
    now: float,
    policy: Policy,
    *,
    guard_holds: bool = False,
) -> Step:
    """The effect of one probe outcome at `now`."""
    status = state.status
    if healthy:
        successes = state.successes + 1
        down_since = state.down_since
        if successes >= policy.success_threshold:
            down_since = None
            if status in (Status.PENDING, Status.INACTIVE):
                status = Status.ACTIVE
        new = ProbeState(status, successes=successes, down_since=down_since)
        return _step(state, new)

    failures = state.failures + 1
    down_since = state.down_since
    if failures >= policy.failure_threshold:
        if down_since is None:
            down_since = now
        if status in (Status.PENDING, Status.ACTIVE):
            status = Status.INACTIVE
    new = ProbeState(status, failures=failures, down_since=down_since)
    if not _deregistration_due(new, now, policy):
        return _step(state, new)
    if guard_holds:
        return replace(_step(state, new), held=True)
    return replace(_step(state, new), deregister=True)


def _step(old: ProbeState, new: ProbeState) -> Step:
    changed = old.status is not new.status
    return Step(new, transition=(old.status, new.status) if changed else None)


def _deregistration_due(state: ProbeState, now: float, policy: Policy) -> bool:
    return (
        state.down_since is not None
        and policy.deregister_after > 0
        and now - state.down_since >= policy.deregister_after
    )


def next_due(state: ProbeState, *, due: float, started: float, policy: Policy) -> float:
    """When to probe next, after a probe that was `due` and `started` then.

    Up instances keep a steady cadence of one probe per interval, whatever
    the delays of single probes; but a probe that started over half an
    interval late is followed one interval after its start, not at once.
    Down and failing ones back off from `started`, but are probed again
    right when their deregistration falls due.
    """
    if state.down_since is None or state.failures == 0:
        following = due + policy.interval
        if following < started + policy.interval / 2:
            following = started + policy.interval
        return following

    doublings = min(state.failures - policy.failure_threshold, _MAX_DOUBLINGS)
    delay = min(policy.interval * 2.0 ** max(doublings, 0), policy.backoff_max)
    following = started + delay
    if policy.deregister_after > 0:
        deadline = state.down_since + policy.deregister_after
        if started < deadline < following:
            return deadline
    return following


# --- the deregistration guard ------------------------------------------------


class GuardReason(enum.Enum):
    STARTUP = "the replica started recently"
    MASS_FAILURE = "most probes are failing"


@dataclass(frozen=True, slots=True)
class GuardChange:
    """The guard turned on or off."""

    active: bool
    # Why it holds (when turned on), or why it held (when turned off).
    reason: GuardReason
    # When turned on: the longest it will hold. When turned off: how long it held.
    seconds: float
    # The failed and all probes in the window, when the change was decided.
    failed: int
    probes: int


class DeregistrationGuard:
    """Decides, from one replica's recent probe outcomes, whether its
    deregistrations wait.

    Feed every outcome to record(), call update() after that (and now and
    then when there are no outcomes: the window slides with time), and ask
    `active`. update() returns a GuardChange when the guard turns on or off,
    once each way, for the log, and when it goes on holding for another
    reason (a change that is on again, with the new reason).
    """

    def __init__(
        self,
        *,
        started_at: float,
        startup: float,
        window: float,
        fraction: float,
        min_probes: int,
        max_hold: float,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self._startup_ends = started_at + startup
        self._window = window
        self._fraction = fraction
        self._min_probes = min_probes
        self.max_hold = max_hold
        # (time, healthy) of the outcomes within the window, oldest first.
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque()
        self._failed = 0
        # When the failure rate went above the fraction; None while below.
        self._mass_since: float | None = None
        self.active = False
        self.reason: GuardReason | None = None
        self._since = started_at

    @property
    def failed(self) -> int:
        return self._failed

    @property
    def probes(self) -> int:
        return len(self._outcomes)

    def record(self, now: float, healthy: bool) -> None:
        self._outcomes.append((now, healthy))
        if not healthy:
            self._failed += 1

    def update(self, now: float) -> GuardChange | None:
        self._forget_before(now - self._window)
        mass = (
            self.probes >= self._min_probes
            and self._failed >= self._fraction * self.probes
        )
        if not mass:
            # Only a failure rate that fell below the fraction re-arms the
            # guard after its time box ran out.
            self._mass_since = None
        elif self._mass_since is None:
            self._mass_since = now

        reason = None
        if self._mass_since is not None and now - self._mass_since < self.max_hold:
            reason = GuardReason.MASS_FAILURE
        elif now < self._startup_ends:
            reason = GuardReason.STARTUP

        # Still on, but for another reason now (most probes began failing
        # during the startup hold, say), is reported as turning on again.
        if (reason is not None) == self.active and reason in (None, self.reason):
            return None
        self.active = reason is not None
        if reason is not None:
            self.reason = reason
            self._since = now
            hold = (
                self._startup_ends - now
                if reason is GuardReason.STARTUP
                else self.max_hold
            )
            return GuardChange(True, reason, hold, self._failed, self.probes)
        assert self.reason is not None
        held = now - self._since
        return GuardChange(False, self.reason, held, self._failed, self.probes)

    def _forget_before(self, horizon: float) -> None:
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, healthy = self._outcomes.popleft()
            if not healthy:
                self._failed -= 1
