"""Summaries of measured samples: percentiles, and a figure's median and
spread over rounds. No I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (0 < fraction <= 1) of unsorted samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Spread:
    """One figure over the rounds: its median, lowest and highest value."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        return cls(statistics.median(finite), min(finite), max(finite), len(finite))

    def format(self, unit: str = "", digits: int = 0) -> str:
        def number(value: float) -> str:
            return f"{value:,.{digits}f}"

        text = f"{number(self.median)}{unit}"
        if self.rounds > 1:
            text += f" ({number(self.low)}-{number(self.high)})"
        return text


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Round-by-round ratios: figures measured in the same round are compared
    with each other, never with another round's, since the machine's load
    drifts between rounds. A system measured in no round gives none."""
    if len(numerators) != len(denominators):
        return []
    return [
        n / d
        for n, d in zip(numerators, denominators, strict=True)
        if math.isfinite(n) and math.isfinite(d) and d > 0
    ]
