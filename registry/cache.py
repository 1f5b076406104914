"""Resolve answers held between events, as plain logic.

Resolve is the call a fleet makes most, and its answer for a name changes
only with an event of that name. The cache keeps the answer of each name
recently resolved, and drops it when the hub publishes an event of the name,
so an answer served from it is the one the database would give at the hub's
revision. It is only a cache: a replica that loses it loses nothing, and the
database stays the one place where state lives.

Filling races with events. A fill reads the database at some revision R,
which is at least the hub's revision when the read starts (the hub only
publishes what the database holds). An event of the name after R can thus
only be published once the read has started; every event of the name drops
the fill under way, so an answer the database has already moved past is
never stored.

The replica's own writes drop their name's answer as soon as they commit,
so a client reads its writes from the replica it wrote through. Another
replica's write reaches the cache with its event, a notification later:
a client that must read it passes the write's revision as min_revision.

While the notifier is not listening the hub may miss events for a while
(it reads them on reconnecting), so the cache is emptied and bypassed until
the hub is live again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .errors import RegistryError
from .model import Event

__all__ = ["Answer", "Fill", "ResolveCache"]


@dataclass(frozen=True, slots=True)
class Answer:
    """What Resolve answers for a name, short of the revision: the
    serialized instances, or the error to raise (its kind and message, so
    that each call raises an exception of its own)."""

    # The revision the database was read at.
    read_at: int
    body: bytes = b""
    error: tuple[type[RegistryError], str] | None = None


class Fill:
    """A read of one name's answer under way; see ResolveCache.begin()."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class ResolveCache:
    """The answers of up to `size` names, the least recently used dropped
    first; a size of 0 holds none."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        self._fills: dict[str, Fill] = {}
        self._live = False

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def live(self) -> bool:
        return self._live

    def set_live(self, live: bool) -> None:
        """Whether the hub receives every event as it commits; while it does
        not, the cache holds nothing."""
        self._live = live
        if not live:
            self._answers.clear()
            self._fills.clear()

    def get(self, name: str) -> Answer | None:
        answer = self._answers.get(name)
        if answer is not None:
            self._answers.move_to_end(name)
        return answer

    def begin(self, name: str) -> Fill | None:
        """Start reading the answer of `name` from the database; None when
        there is nothing to fill (the cache is off or not live)."""
        if not self._live or self._size == 0:
            return None
        fill = self._fills[name] = Fill(name)
        return fill

    def put(self, fill: Fill, answer: Answer) -> None:
        """Keep `answer`, read since `fill` began, unless an event of its
        name came meanwhile (or the cache went off)."""
        if self._fills.get(fill.name) is not fill:
            return
        del self._fills[fill.name]
        self._answers[fill.name] = answer
        self._answers.move_to_end(fill.name)
        while len(self._answers) > self._size:
            self._answers.popitem(last=False)

    def observe(self, event: Event) -> None:
        """An event was published: its name's answer is no longer current."""
        self.forget(event.name)

    def forget(self, name: str) -> None:
        """Drop the answer of `name`, and any fill under way. Called by the
        replica's own writes once they commit, before they answer: a client
        that resolves after its write then reads it from this replica, even
        before the notifier brings the write's event."""
        self._answers.pop(name, None)
        self._fills.pop(name, None)
