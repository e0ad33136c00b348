"""Forecasters for the planner and the `slo` policy: a series' value (request rate, input and output lengths)
some intervals ahead from its history. Pure: a forecaster is its parameters, the history is passed in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Forecaster(Protocol):
    name: str

    def next(self, history: Sequence[float]) -> float: ...

    def ahead(self, history: Sequence[float], steps: float) -> float: ...


@dataclass(frozen=True)
class Constant:
    """The last value (Dynamo's default predictor)."""

    name: str = "constant"

    def next(self, history: Sequence[float]) -> float:
        return self.ahead(history, 1)

    def ahead(self, history: Sequence[float], steps: float) -> float:
        return history[-1] if history else 0.0


@dataclass(frozen=True)
class Holt:
    """Holt's linear (double exponential) smoothing: level and trend, carried ``steps`` intervals ahead."""

    alpha: float = 0.5
    beta: float = 0.3
    name: str = "holt"

    def next(self, history: Sequence[float]) -> float:
        return self.ahead(history, 1)

    def ahead(self, history: Sequence[float], steps: float) -> float:
        if len(history) < 2:
            return history[-1] if history else 0.0
        level, trend = history[0], history[1] - history[0]
        for x in history[1:]:
            prev = level
            level = self.alpha * x + (1 - self.alpha) * (level + trend)
            trend = self.beta * (level - prev) + (1 - self.beta) * trend
        return max(0.0, level + steps * trend)


@dataclass(frozen=True)
class Kalman:
    """A local-level Kalman filter: process noise q, measurement noise r (relative to the level)."""

    q: float = 0.1
    r: float = 1.0
    name: str = "kalman"

    def next(self, history: Sequence[float]) -> float:
        return self.ahead(history, 1)

    def ahead(self, history: Sequence[float], steps: float) -> float:
        """A local level has no trend: the same value at any horizon."""
        if not history:
            return 0.0
        x, p = history[0], 1.0
        for z in history[1:]:
            p += self.q
            k = p / (p + self.r)
            x += k * (z - x)
            p *= 1 - k
        return max(0.0, x)


FORECASTERS: dict[str, type] = {"constant": Constant, "holt": Holt, "kalman": Kalman}
