"""Local fan-out of events to watch streams.

The hub holds the revision this replica has fanned out so far and the
attached watchers, indexed by the names they follow. The notifier publishes
events in revision order; publish() is synchronous, so a watcher attached
between two awaits can never miss an event or see one twice.

Each watcher has a bounded buffer. A watcher whose buffer is full when an
event arrives is ended (Ended.BEHIND) instead of growing the replica's memory;
its client resumes from the last revision it received.

Idle streams learn the current revision from Progress items, which tick()
queues behind everything offered before: a stream that sends what it
receives, in order, never reports progress past an event it has not sent.
One ticker for the whole hub, rather than a timeout on every stream's wait,
keeps the per-event cost of a stream to taking an item from its queue.

The hub also keeps the replica's Resolve cache current (registry.cache): each
event it publishes drops its name's answer. A task that cares about some
events only (the probe scheduler: registrations with a health check) waits
for them through noticing(), and is woken by those alone.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from .cache import ResolveCache
from .model import Event


class Ended(enum.Enum):
    # The watcher did not keep up with the events.
    BEHIND = "behind"
    # The replica is draining: the client should resume elsewhere.
    DRAINING = "draining"
    # The replica missed compacted events: the client must take a snapshot.
    COMPACTED = "compacted"


@dataclass(frozen=True, slots=True)
class Progress:
    """Every event up to `revision` that the watcher follows was offered to
    it before this item."""

    revision: int


class Watcher:
    """One watch stream's view of the hub."""

    def __init__(self, names: Iterable[str], buffer: int) -> None:
        self.names = frozenset(names)
        self.ended: Ended | None = None
        # Revision of the newest event offered to this watcher.
        self.cursor = 0
        # Called once when the watcher ends, to wake a stream blocked sending.
        self.on_end: Callable[[], object] | None = None
        # Whether anything was offered since the last tick (or since the
        # watcher was made): only a stream idle for a whole tick gets progress.
        self._busy = True
        # Items offered and not received yet: at most `buffer` events, and
        # ahead of them at most one progress item (a tick queues one only
        # into an empty queue), which does not count against the buffer.
        # A deque rather than a memory channel: offer() runs for every
        # watcher of every event, and a channel tells its length only
        # through a statistics object built on each call.
        self._items: deque[Event | Progress] = deque()
        self._buffer = buffer
        # The stream's task while it waits in receive() for an item.
        self._waiting: trio.lowlevel.Task | None = None

    @property
    def pending(self) -> int:
        """Items offered and not received yet."""
        return len(self._items)

    def offer(self, event: Event) -> None:
        if event.revision <= self.cursor or self.ended is not None:
            return
        items = self._items
        progress_waiting = bool(items) and type(items[0]) is Progress
        if len(items) - progress_waiting >= self._buffer:
            self.end(Ended.BEHIND)
            return
        items.append(event)
        self._wake()
        self.cursor = event.revision
        self._busy = True

    def tick(self, revision: int) -> None:
        """Queue progress at `revision` (every event up to it has been
        offered), if nothing was offered since the last tick and nothing
        waits unsent."""
        busy, self._busy = self._busy, False
        if busy or self.ended is not None or self._items:
            return
        self._items.append(Progress(max(revision, self.cursor)))
        self._wake()

    def end(self, reason: Ended) -> None:
        if self.ended is None:
            self.ended = reason
            self._wake()
            if self.on_end is not None:
                self.on_end()

    async def receive(self) -> Event | Progress | None:
        """The next event or progress; None once the watcher has ended and
        its queue is empty (see `ended` for why). A checkpoint, like a
        channel's receive, whether or not it has to wait."""
        if not self._items and self.ended is None:
            # Woken by offer(), tick() or end(); only this stream's task
            # receives, so what woke it is still there. Parking the task by
            # hand: this runs for every stream of every event, and a
            # ParkingLot costs more per wake-up.
            assert self._waiting is None, "one task receives from a watcher"
            self._waiting = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
        else:
            await trio.lowlevel.checkpoint()
        if self._items:
            return self._items.popleft()
        return None

    def _wake(self) -> None:
        task, self._waiting = self._waiting, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _abort_wait(self, _: object) -> trio.lowlevel.Abort:
        # Cancelled while waiting: nothing was taken.
        self._waiting = None
        return trio.lowlevel.Abort.SUCCEEDED


@dataclass(eq=False)
class _Interest:
    wanted: Callable[[Event], bool]
    found: trio.Event = field(default_factory=trio.Event)


class Hub:
    def __init__(self, revision: int = 0, cache: ResolveCache | None = None) -> None:
        # Every event up to this revision has been offered to the watchers.
        self.revision = revision
        self.cache = ResolveCache(0) if cache is None else cache
        self._attached: set[Watcher] = set()
        # Watchers without a names filter, and the others by name.
        self._everything: set[Watcher] = set()
        self._by_name: dict[str, set[Watcher]] = {}
        self._advanced = trio.Event()
        self._interests: set[_Interest] = set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._attached)

    def attach(self, watcher: Watcher, cursor: int) -> None:
        """Start offering `watcher` the events after `cursor`.

        The caller has delivered everything up to `cursor`, which must be at
        least the hub's revision; a draining hub ends the watcher at once.
        """
        assert cursor >= self.revision, "attach only once caught up"
        watcher.cursor = cursor
        if self.draining:
            watcher.end(Ended.DRAINING)
            return
        self._attached.add(watcher)
        if not watcher.names:
            self._everything.add(watcher)
        for name in watcher.names:
            self._by_name.setdefault(name, set()).add(watcher)

    def detach(self, watcher: Watcher) -> None:
        self._attached.discard(watcher)
        self._everything.discard(watcher)
        for name in watcher.names:
            watchers = self._by_name.get(name)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._by_name[name]

    def publish(self, events: Iterable[Event]) -> None:
        """Offer events, in revision order, to every watcher that follows them."""
        for event in events:
            if event.revision <= self.revision:
                continue
            self.cache.observe(event)
            for watcher in self._everything:
                watcher.offer(event)
            for watcher in self._by_name.get(event.name, ()):
                watcher.offer(event)
            for interest in self._interests:
                if interest.wanted(event):
                    interest.found.set()
            self.revision = event.revision
        self._wake()

    def advance(self, revision: int) -> None:
        """Note that the log has reached `revision` with nothing to publish."""
        if revision > self.revision:
            self.revision = revision
            self._wake()

    def set_live(self, live: bool) -> None:
        """Whether every event reaches the hub as it commits (the notifier
        listens and has caught up); the cache is used only while it does."""
        self.cache.set_live(live)

    def tick(self) -> None:
        """Give every watcher idle since the last tick the current revision."""
        for watcher in self._attached:
            watcher.tick(self.revision)

    def end_all(self, reason: Ended) -> None:
        for watcher in self._attached:
            watcher.end(reason)
        self._attached.clear()
        self._everything.clear()
        self._by_name.clear()

    def drain(self) -> None:
        """End every watch stream and refuse new ones."""
        self.draining = True
        self.end_all(Ended.DRAINING)

    async def wait_for(self, revision: int) -> None:
        """Return once every event up to `revision` has been published."""
        while self.revision < revision:
            await self._advanced.wait()

    @contextmanager
    def noticing(self, wanted: Callable[[Event], bool]) -> Iterator[trio.Event]:
        """Yield a trio.Event, set by the first event published inside the
        block that `wanted` accepts; one published before the caller awaits
        it still counts. Events the hub skips without publishing (compacted
        before this replica read them) set nothing."""
        interest = _Interest(wanted)
        self._interests.add(interest)
        try:
            yield interest.found
        finally:
            self._interests.discard(interest)

    def _wake(self) -> None:
        self._advanced.set()
        self._advanced = trio.Event()


async def tick_every(
    hub: Hub,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Tick `hub` every `interval` seconds, forever: a stream idle for a
    whole interval gets a progress item within the next."""
    task_status.started()
    while True:
        await trio.sleep(interval)
        hub.tick()
