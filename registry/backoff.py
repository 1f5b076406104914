"""Exponential backoff with full jitter, as plain arithmetic."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from `initial` up to `cap`, each drawn at random
    below its bound so that replicas losing the same dependency do not
    retry in lockstep."""

    def __init__(
        self, initial: float, cap: float, *, rng: random.Random | None = None
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"need 0 < initial <= cap, got {initial!r} and {cap!r}")
        self.initial = initial
        self.cap = cap
        self._bound = initial
        self._rng = rng or random.Random()

    def next(self) -> float:
        delay = self._rng.uniform(self._bound / 2, self._bound)
        self._bound = min(self._bound * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._bound = self.initial
