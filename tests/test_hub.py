"""The watch bookkeeping (Hub, Watcher) and Backoff, without any I/O."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from harness import sample_event as event
from registry.backoff import Backoff
from registry.model import Event
from registry.watch import Ended, Hub, Progress, Watcher


async def received(watcher: Watcher) -> list[tuple[int, str]]:
    """Everything the watcher holds, as (revision, name); ends the watcher."""
    if watcher.ended is None:
        watcher.end(Ended.DRAINING)
    events = []
    while (item := await watcher.receive()) is not None:
        events.append((item.revision, item.name))
    return events


def attached(hub: Hub, names: list[str], buffer: int = 16) -> Watcher:
    watcher = Watcher(names, buffer)
    hub.attach(watcher, hub.revision)
    return watcher


async def test_hub_offers_each_event_once_to_each_watcher_of_its_name() -> None:
    hub = Hub()
    everything = attached(hub, [])
    billing = attached(hub, ["billing"])
    orders = attached(hub, ["orders"])
    both = attached(hub, ["billing", "orders"])

    hub.publish([event(1, "billing"), event(2, "orders"), event(3, "billing")])
    # Published again with newer ones, as after a notifier's overlapping read.
    hub.publish([event(3, "billing"), event(4, "payments"), event(5, "orders")])

    assert hub.revision == 5
    assert await received(everything) == [
        (1, "billing"),
        (2, "orders"),
        (3, "billing"),
        (4, "payments"),
        (5, "orders"),
    ]
    assert await received(billing) == [(1, "billing"), (3, "billing")]
    assert await received(orders) == [(2, "orders"), (5, "orders")]
    assert await received(both) == [
        (1, "billing"),
        (2, "orders"),
        (3, "billing"),
        (5, "orders"),
    ]


async def test_hub_skips_events_at_or_below_a_watchers_cursor() -> None:
    hub = Hub()
    watcher = Watcher([], 16)
    # The stream replayed the log up to revision 3 before attaching.
    hub.attach(watcher, 3)

    hub.publish([event(n) for n in range(1, 6)])
    watcher.offer(event(5))

    assert watcher.cursor == 5
    assert [revision for revision, _ in await received(watcher)] == [4, 5]


async def test_hub_stops_offering_to_a_detached_watcher() -> None:
    hub = Hub()
    kept = attached(hub, ["billing"])
    gone = attached(hub, ["billing"])
    everything = attached(hub, [])

    hub.detach(gone)
    hub.detach(everything)
    hub.publish([event(1)])

    assert len(hub) == 1
    assert await received(kept) == [(1, "billing")]
    assert await received(gone) == []
    assert await received(everything) == []


async def test_watcher_with_a_full_buffer_is_ended_behind() -> None:
    hub = Hub()
    watcher = attached(hub, [], buffer=2)
    ends: list[Ended | None] = []
    watcher.on_end = lambda: ends.append(watcher.ended)

    hub.publish([event(1), event(2), event(3)])
    hub.publish([event(4)])

    assert watcher.ended is Ended.BEHIND
    assert ends == [Ended.BEHIND]
    # The cursor says where its client resumes: after what it was given.
    assert watcher.cursor == 2
    assert await received(watcher) == [(1, "billing"), (2, "billing")]


async def test_hub_drain_ends_every_watcher_and_any_later_one() -> None:
    hub = Hub()
    first = attached(hub, [])
    second = attached(hub, ["orders"])
    ends: list[Watcher] = []
    first.on_end = lambda: ends.append(first)
    second.on_end = lambda: ends.append(second)

    hub.drain()

    assert (first.ended, second.ended) == (Ended.DRAINING, Ended.DRAINING)
    assert len(ends) == 2
    assert set(ends) == {first, second}
    assert len(hub) == 0

    late = attached(hub, [])
    assert late.ended is Ended.DRAINING
    assert len(hub) == 0
    hub.publish([event(1)])
    assert await received(late) == []


async def test_hub_wait_for_returns_when_the_revision_is_reached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub()

    async def feed() -> None:
        await trio.sleep(1)
        hub.publish([event(1)])
        await trio.sleep(2)
        hub.advance(4)
        # A lower revision never moves the hub back.
        hub.advance(2)
        await trio.sleep(3)
        hub.publish([event(5)])

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        await hub.wait_for(1)
        assert trio.current_time() - start == 1
        await hub.wait_for(3)
        assert trio.current_time() - start == 3
        assert hub.revision == 4
        await hub.wait_for(4)
        assert trio.current_time() - start == 3
        await hub.wait_for(5)
        assert trio.current_time() - start == 6


async def test_hub_noticing_is_set_only_by_an_accepted_event_of_its_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub()

    def billing(e: Event) -> bool:
        return e.name == "billing"

    hub.publish([event(1, "billing")])
    with hub.noticing(billing) as noticed:
        # Neither events from before the block count, nor those `wanted`
        # rejects.
        hub.publish([event(2, "orders")])
        assert not noticed.is_set()
        # One published before anybody waits is kept for the wait.
        hub.publish([event(3, "orders"), event(4, "billing")])
        assert noticed.is_set()

    with hub.noticing(billing) as noticed:

        async def feed() -> None:
            await trio.sleep(2)
            hub.publish([event(5, "orders")])
            await trio.sleep(3)
            hub.publish([event(6, "billing")])

        start = trio.current_time()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                await noticed.wait()
        assert trio.current_time() - start == 5


def test_backoff_doubles_up_to_its_cap_with_jitter_below_each_bound() -> None:
    backoff = Backoff(0.1, 1.0, rng=random.Random(7))
    bounds = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]

    delays = [backoff.next() for _ in bounds]

    for delay, bound in zip(delays, bounds, strict=True):
        assert bound / 2 <= delay <= bound
    # Jittered: not simply the bounds.
    assert delays != bounds
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1


def test_backoffs_with_different_seeds_do_not_retry_in_lockstep() -> None:
    first = Backoff(1.0, 8.0, rng=random.Random(1))
    second = Backoff(1.0, 8.0, rng=random.Random(2))

    assert [first.next() for _ in range(5)] != [second.next() for _ in range(5)]


@pytest.mark.parametrize(("initial", "cap"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_backoff_refuses_bounds_out_of_order(initial: float, cap: float) -> None:
    with pytest.raises(ValueError, match="need 0 < initial <= cap"):
        Backoff(initial, cap)


async def test_hub_ticks_progress_only_to_watchers_idle_for_a_whole_tick() -> None:
    hub = Hub()
    billing = attached(hub, ["billing"])
    orders = attached(hub, ["orders"])

    # Attached just now: not idle for a whole tick yet.
    hub.tick()
    hub.publish([event(1, "billing")])
    hub.tick()
    assert await billing.receive() == event(1, "billing")
    assert await orders.receive() == Progress(1)

    # Idle since: progress at the hub's revision, once per tick.
    hub.publish([event(2, "orders")])
    hub.tick()
    assert await billing.receive() == Progress(2)
    assert await orders.receive() == event(2, "orders")


async def test_watcher_gets_no_progress_while_events_wait_in_its_buffer() -> None:
    hub = Hub()
    watcher = attached(hub, ["billing"])
    hub.tick()
    hub.publish([event(1)])
    hub.tick()
    hub.publish([event(2)])

    # Idle for a tick since, but with events unsent: they say more than a
    # progress item would, which waits until they are taken.
    hub.tick()
    hub.tick()
    assert watcher.pending == 2
    assert [await watcher.receive(), await watcher.receive()] == [event(1), event(2)]
    hub.tick()
    assert watcher.pending == 1
    assert await watcher.receive() == Progress(2)


def test_watcher_queued_progress_takes_no_event_slot() -> None:
    hub = Hub()
    watcher = attached(hub, ["billing"], buffer=2)
    hub.tick()
    hub.tick()
    assert watcher.pending == 1

    # The progress item is still there: two events still fit.
    hub.publish([event(1), event(2)])
    assert watcher.ended is None
    hub.publish([event(3)])
    assert watcher.ended is Ended.BEHIND


async def test_watcher_wakes_a_waiting_stream_for_an_event_and_for_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub()
    watcher = attached(hub, ["billing"])
    got: list[Event | Progress | None] = []

    async def stream() -> None:
        while True:
            item = await watcher.receive()
            got.append(item)
            if item is None:
                return

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            await trio.testing.wait_all_tasks_blocked()
            hub.publish([event(1)])
            await trio.testing.wait_all_tasks_blocked()
            assert got == [event(1)]

            # Waiting again: the end alone wakes it.
            watcher.end(Ended.DRAINING)
    assert got == [event(1), None]


async def test_watcher_hands_over_what_was_offered_before_its_end() -> None:
    watcher = attached(Hub(), [])
    watcher.offer(event(1))
    watcher.end(Ended.DRAINING)
    watcher.offer(event(2))
    assert [await watcher.receive(), await watcher.receive()] == [event(1), None]


@pytest.mark.parametrize("offer_first", [True, False])
async def test_watcher_loses_no_event_to_a_receive_cancelled_as_it_arrives(
    autojump_clock: trio.testing.MockClock, offer_first: bool
) -> None:
    watcher = Watcher([], 16)
    got: list[Event | Progress | None] = []
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                got.append(await watcher.receive())

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            # In one step, in either order: the event arrives and the
            # waiting receive is cancelled.
            if offer_first:
                watcher.offer(event(1))
            nursery.cancel_scope.cancel()
            if not offer_first:
                watcher.offer(event(1))
        if offer_first:
            # Woken before the cancel: the receive returns the event.
            assert (got, watcher.pending) == ([event(1)], 0)
        else:
            # Cancelled first: the event waits for the next receive.
            assert got == []
            assert await watcher.receive() == event(1)


async def test_watcher_keeps_its_event_for_a_receive_cancelled_before_waiting() -> None:
    watcher = Watcher([], 16)
    watcher.offer(event(1))
    with trio.CancelScope() as scope:
        scope.cancel()
        await watcher.receive()
    assert watcher.pending == 1
    assert await watcher.receive() == event(1)
