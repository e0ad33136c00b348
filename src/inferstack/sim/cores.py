"""Replicas that share one machine's cores (`--fleet HW:MODEL=N@HOST`): each slows the others while it steps.

A step's modelled time (`sim.perf_model`) is its *work*: what it takes with the host to itself. While m
other replicas of the host are mid-step it progresses at 1/(1 + c·m) of that speed (c: its profile's
`colocation_slowdown`, fitted by `engine calibrate --served-steps` on engines that served side by side;
`sim.calibrate`). The share is time-weighted, not decided at a step's start: the engines' step logs fit it
better (docs/simulator.md). Every start or end of a step on the host moves the ends of the steps in progress
whose speed changed; each end carries a token, and an end event whose token is not the current one is stale.
The host's own speed drifts (`HostSpeed`: other load on the machine, frequency): a step's work is scaled by the
host's speed factor of the window it starts in. Steps are 50-150 ms against windows of seconds, so the start
decides; the factor's spread, not its mean (1), is what moves latency percentiles (docs/simulator.md).

Pure bookkeeping over virtual times: no clock, no events of its own (the simulation schedules what
`start` and `end` return), so a seeded run stays bit-for-bit repeatable.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R", bound=Hashable)


class HostSpeed:
    """A host's speed factor over virtual time: log-normal with mean 1 and spread ``sigma``, constant over
    windows of ``window_s`` seconds, consecutive windows correlated ``corr`` (a first-order autoregression of
    the log). Drawn window by window from ``seed`` (the run's seed and the host's name), so a run is
    repeatable whatever order the factors are asked in."""

    def __init__(self, sigma: float, window_s: float, corr: float, seed: str) -> None:
        self._sigma, self._window, self._corr = sigma, window_s, corr
        self._rng = random.Random(seed)
        self._logs: list[float] = []     # standardised log factor of each window drawn so far

    def factor(self, now: float) -> float:
        if self._sigma == 0.0:
            return 1.0
        i = int(now // self._window)
        while len(self._logs) <= i:
            z = self._rng.gauss(0.0, 1.0)
            self._logs.append(self._corr * self._logs[-1] + math.sqrt(1.0 - self._corr ** 2) * z
                              if self._logs else z)
        return math.exp(self._sigma * self._logs[i] - self._sigma ** 2 / 2.0)


@dataclass(eq=False, slots=True)
class _Step:
    began: float
    base: float          # modelled seconds of the step alone on the host at its nominal speed
    work: float          # the same at the host's speed when it began
    left: float          # work not done yet
    rate: float          # work done per virtual second now
    token: int
    slowed: bool = False  # ran off its nominal time (a neighbour, the host's speed): else it took exactly ``base``


class CoreShare(Generic[R]):
    """The steps in progress on one host, in the order they began (deterministic retiming order). Methods that
    move ends return (replica, its step's new virtual end, the token of that end) for each."""

    def __init__(self, speed: HostSpeed | None = None) -> None:
        self._speed = speed
        self._steps: dict[R, tuple[_Step, float]] = {}    # replica -> (its step, its slowdown c)
        self._since = 0.0
        self._tokens = itertools.count(1)

    def start(self, rep: R, work: float, slowdown: float, now: float) -> list[tuple[R, float, int]]:
        """``rep`` begins a step of ``work`` modelled seconds; returns every step whose end is (re)set, its own
        included (first when it is the only one)."""
        self._advance(now)
        scaled = work * self._speed.factor(now) if self._speed is not None else work
        self._steps[rep] = (_Step(now, work, scaled, scaled, 0.0, 0, scaled != work), slowdown)
        return self._retime(now)

    def end(self, rep: R, now: float) -> tuple[float, list[tuple[R, float, int]]]:
        """``rep``'s step is over (or lost in a crash): (the seconds its neighbours and the host's speed added
        to it, the others' new ends)."""
        self._advance(now)
        step, _ = self._steps.pop(rep)
        return (now - step.began) - step.base if step.slowed else 0.0, self._retime(now)

    def token(self, rep: R) -> int | None:
        """The token of ``rep``'s current step end (None: no step in progress)."""
        entry = self._steps.get(rep)
        return entry[0].token if entry is not None else None

    def _advance(self, now: float) -> None:
        dt = now - self._since
        if dt > 0:
            for step, _ in self._steps.values():
                step.left -= dt * step.rate
        self._since = now

    def _retime(self, now: float) -> list[tuple[R, float, int]]:
        others = len(self._steps) - 1
        moved = []
        for rep, (step, slowdown) in self._steps.items():
            rate = 1.0 / (1.0 + slowdown * others)
            if rate != step.rate:
                step.rate, step.token = rate, next(self._tokens)
                step.slowed |= rate < 1.0
                # a step starting alone ends at exactly now + work, as an unshared replica's step does
                moved.append((rep, now + max(0.0, step.left) / rate, step.token))
        return moved
