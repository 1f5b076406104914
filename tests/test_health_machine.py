"""The status machine and the deregistration guard, without I/O.

The scenarios run a small prober loop on Trio's mock clock (autojump): it
sleeps until each probe is due, asks the scenario whether the target is up
at that virtual time, and feeds the outcome to the machine, so every time
below is exact to the tick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from registry.health_machine import (
    DeregistrationGuard,
    GuardReason,
    Policy,
    ProbeDefaults,
    ProbeState,
    next_due,
    observe,
    policy_for,
)
from registry.model import CheckKind, HealthCheck, Status

POLICY = Policy(
    interval=10.0,
    timeout=1.0,
    failure_threshold=3,
    success_threshold=1,
    deregister_after=600.0,
    backoff_max=60.0,
)


@dataclass
class Run:
    """What happened to one simulated instance, at virtual times from 0."""

    probes: list[float] = field(default_factory=list)
    transitions: list[tuple[float, Status, Status]] = field(default_factory=list)
    deregistered_at: float | None = None
    held: list[float] = field(default_factory=list)
    state: ProbeState = field(default_factory=lambda: ProbeState(Status.PENDING))


async def simulate(
    policy: Policy,
    up: Callable[[float], bool],
    *,
    until: float,
    status: Status = Status.PENDING,
    guard_holds: Callable[[float], bool] = lambda now: False,
    drain_at: float | None = None,
) -> Run:
    """Probe as the scheduler does, from virtual time 0 until `until` or
    deregistration. `drain_at`: the service asks to drain then."""
    start = trio.current_time()
    run = Run(state=ProbeState(status))
    due = 0.0
    while due <= until:
        await trio.sleep_until(start + due)
        now = trio.current_time() - start
        if drain_at is not None and now >= drain_at > (run.probes or [-1])[-1]:
            run.transitions.append((now, run.state.status, Status.DRAINING))
            run.state = ProbeState(
                Status.DRAINING,
                run.state.successes,
                run.state.failures,
                run.state.down_since,
            )
        run.probes.append(now)
        step = observe(run.state, up(now), now, policy, guard_holds=guard_holds(now))
        if step.transition is not None:
            run.transitions.append((now, *step.transition))
        if step.held:
            run.held.append(now)
        if step.deregister:
            run.deregistered_at = now
            return run
        run.state = step.state
        due = next_due(run.state, due=due, started=now, policy=policy)
    return run


def up_until(t: float) -> Callable[[float], bool]:
    return lambda now: now < t


async def test_pending_instance_becomes_active_after_m_successes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = Policy(10.0, 1.0, 3, 2, 600.0, 60.0)

    run = await simulate(policy, lambda now: True, until=30)

    assert run.probes == [0, 10, 20, 30]
    assert run.transitions == [(10, Status.PENDING, Status.ACTIVE)]


async def test_pending_instance_that_never_answers_goes_inactive_after_n_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await simulate(POLICY, lambda now: False, until=20)

    assert run.transitions == [(20, Status.PENDING, Status.INACTIVE)]


async def test_active_instance_goes_inactive_at_the_nth_failure_exactly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await simulate(POLICY, up_until(25), until=50)

    # Failures at 30, 40 and 50: the third makes it INACTIVE.
    assert run.transitions == [
        (0, Status.PENDING, Status.ACTIVE),
        (50, Status.ACTIVE, Status.INACTIVE),
    ]
    assert run.state == ProbeState(Status.INACTIVE, failures=3, down_since=50)


async def test_failures_short_of_the_threshold_change_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Down from 25 to 45: two failed probes (30, 40), then healthy again.
    run = await simulate(POLICY, lambda now: not 25 <= now < 45, until=100)

    assert run.transitions == [(0, Status.PENDING, Status.ACTIVE)]
    assert run.probes == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


async def test_inactive_instance_is_probed_with_doubling_backoff_up_to_the_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await simulate(POLICY, up_until(25), until=400)

    # Inactive at 50; then 10, 20, 40 seconds apart, then 60 (the cap).
    assert run.probes == [
        0, 10, 20, 30, 40, 50,
        60, 80, 120, 180, 240, 300, 360,
    ]  # fmt: skip


async def test_inactive_instance_comes_back_after_m_successes_at_interval_cadence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = Policy(10.0, 1.0, 3, 2, 600.0, 60.0)
    # Down from 25 to 100 (ACTIVE at 10 after two successes, 0 and 10).
    run = await simulate(policy, lambda now: not 25 <= now < 100, until=200)

    assert run.transitions == [
        (10, Status.PENDING, Status.ACTIVE),
        (50, Status.ACTIVE, Status.INACTIVE),
        # Backoff probes at 60, 80 fail; 120 succeeds, and the cadence is
        # one interval again: 130 is the second success.
        (130, Status.INACTIVE, Status.ACTIVE),
    ]
    assert run.probes[5:10] == [50, 60, 80, 120, 130]


async def test_inactive_instance_is_deregistered_exactly_deregister_after_once_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await simulate(POLICY, up_until(25), until=10_000)

    # Down at 50; the backoff probe due at 660 is brought forward to 650.
    assert run.deregistered_at == 650
    assert run.probes[-3:] == [540, 600, 650]


async def test_a_success_while_inactive_does_not_restart_the_deregister_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = Policy(10.0, 1.0, 3, 2, 600.0, 60.0)
    # Down from 25, one good probe at 120 (M is 2), down again after.
    run = await simulate(policy, lambda now: now < 25 or now == 120, until=10_000)

    assert [t for t in run.transitions if t[2] is Status.ACTIVE][-1][0] < 50
    assert run.deregistered_at == 50 + 600


async def test_deregister_after_zero_keeps_an_inactive_instance_forever(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = Policy(10.0, 1.0, 3, 1, 0.0, 60.0)

    run = await simulate(policy, up_until(25), until=100_000)

    assert run.deregistered_at is None
    assert run.state.status is Status.INACTIVE
    # Still probed, once a minute.
    assert run.probes[-2:] == [99_900, 99_960]


async def test_deregistration_waits_while_the_guard_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await simulate(
        POLICY, up_until(25), until=10_000, guard_holds=lambda now: now < 700
    )

    # Due at 650, held at 650, then probed at the capped backoff.
    assert run.held == [650]
    assert run.deregistered_at == 710


async def test_probes_never_move_a_draining_instance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Healthy until 200, draining from 100, gone (not answering) from 200.
    run = await simulate(POLICY, up_until(200), until=10_000, drain_at=100)

    assert run.transitions == [
        (0, Status.PENDING, Status.ACTIVE),
        (100, Status.ACTIVE, Status.DRAINING),
    ]
    # Down at the third failure (200, 210, 220), deregistered 600 s later.
    assert run.deregistered_at == 220 + 600


def test_cadence_holds_through_late_probes_without_bunching() -> None:
    up = ProbeState(Status.ACTIVE, successes=5)

    # Late by under half an interval: the next is due on the grid.
    assert next_due(up, due=100, started=104, policy=POLICY) == 110
    # Later than that: one interval after the late start, never at once.
    assert next_due(up, due=100, started=106, policy=POLICY) == 116
    assert next_due(up, due=100, started=135, policy=POLICY) == 145


def test_policy_takes_each_unset_field_from_the_defaults() -> None:
    defaults = ProbeDefaults(
        interval=10,
        timeout=1,
        failure_threshold=3,
        success_threshold=1,
        deregister_after=600,
        backoff_max=60,
    )

    plain = policy_for(HealthCheck(kind=CheckKind.TCP), defaults)
    tuned = policy_for(
        HealthCheck(
            kind=CheckKind.TCP,
            interval_seconds=120,
            timeout_seconds=5,
            failure_threshold=1,
            success_threshold=4,
            deregister_after_seconds=0.0,
        ),
        defaults,
    )
    fast = policy_for(HealthCheck(kind=CheckKind.TCP, interval_seconds=1), defaults)

    assert plain == Policy(10, 1, 3, 1, 600, 60)
    # deregister_after 0 (keep forever) is kept, not taken as unset; the
    # backoff cap is never below the interval.
    assert tuned == Policy(120, 5, 1, 4, 0.0, 120)
    assert fast.interval == 1
    # A default timeout longer than a short interval is cut to it.
    assert (
        policy_for(
            HealthCheck(kind=CheckKind.TCP, interval_seconds=1),
            ProbeDefaults(timeout=3),
        ).timeout
        == 1
    )


# --- the deregistration guard ------------------------------------------------


def guard(**overrides: float) -> DeregistrationGuard:
    settings = {
        "started_at": 0.0,
        "startup": 60.0,
        "window": 30.0,
        "fraction": 0.5,
        "min_probes": 10,
        "max_hold": 600.0,
        **overrides,
    }
    return DeregistrationGuard(
        started_at=settings["started_at"],
        startup=settings["startup"],
        window=settings["window"],
        fraction=settings["fraction"],
        min_probes=int(settings["min_probes"]),
        max_hold=settings["max_hold"],
    )


def test_guard_holds_for_the_startup_window_and_says_so_once_each_way() -> None:
    g = guard(startup=60)

    on = g.update(0)
    assert on is not None
    assert (on.active, on.reason, on.seconds) == (True, GuardReason.STARTUP, 60)
    assert g.update(59.999) is None
    assert g.active
    off = g.update(60)
    assert off is not None
    assert (off.active, off.reason, off.seconds) == (False, GuardReason.STARTUP, 60)
    assert g.update(61) is None
    assert not g.active


def test_guard_holds_while_most_recent_probes_fail() -> None:
    g = guard(startup=0)
    for t in range(10):
        g.record(t, healthy=True)
    assert g.update(10) is None

    for t in range(10, 19):
        g.record(t, healthy=False)
    # 9 of 19 failed: below half.
    assert g.update(19) is None
    g.record(19, healthy=False)
    on = g.update(19)
    assert on is not None
    assert (on.active, on.reason, on.failed, on.probes) == (
        True,
        GuardReason.MASS_FAILURE,
        10,
        20,
    )

    # Healthy again: off once fewer than half of the window's probes failed.
    changes = []
    for t in range(20, 30):
        g.record(t, healthy=True)
        change = g.update(t)
        if change is not None:
            changes.append((t, change.active, change.seconds, change.failed))
    assert changes == [(20, False, 1, 10)]


def test_guard_says_so_when_mass_failure_starts_during_the_startup_hold() -> None:
    g = guard(startup=60, max_hold=600)
    assert g.update(0) is not None

    for t in range(10, 20):
        g.record(t, healthy=False)
    again = g.update(20)

    assert again is not None
    assert (again.active, again.reason, again.seconds, again.failed) == (
        True,
        GuardReason.MASS_FAILURE,
        600,
        10,
    )
    assert g.update(21) is None
    # The failures age out of the window after the startup hold has ended:
    # off, once.
    off = g.update(61)
    assert off is not None
    assert (off.active, off.reason, off.seconds) == (
        False,
        GuardReason.MASS_FAILURE,
        41,
    )
    assert g.update(62) is None


def test_guard_needs_enough_probes_to_judge() -> None:
    g = guard(startup=0, min_probes=10)
    for t in range(9):
        g.record(t, healthy=False)

    assert g.update(9) is None
    assert not g.active


def test_guard_is_time_boxed_and_rearms_only_after_the_failures_end() -> None:
    g = guard(startup=0, window=10, min_probes=1, max_hold=100)
    t = 0.0

    def fail_until(end: float) -> list[tuple[float, bool]]:
        nonlocal t
        changes = []
        while t < end:
            g.record(t, healthy=False)
            change = g.update(t)
            if change is not None:
                changes.append((t, change.active))
            t += 1
        return changes

    # On at the first failure, off after 100 s however long failures go on.
    assert fail_until(300) == [(0, True), (100, False)]

    # The failures end: once the window has no failures left, a new mass
    # failure holds again.
    for _ in range(20):
        g.record(t, healthy=True)
        assert g.update(t) is None
        t += 1
    assert fail_until(t + 30)[0][1] is True


def test_guard_rejects_a_fraction_outside_zero_to_one() -> None:
    with pytest.raises(ValueError, match="fraction"):
        guard(fraction=1.5)
