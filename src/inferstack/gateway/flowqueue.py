"""The flow-control policy as a pure, synchronous queue: the live gateway (`flowcontrol.py`, which
adds asyncio futures and timers) and the simulator (virtual time) run this same code.

Rules: pass straight through while the pool has room and nobody of equal or higher priority waits;
otherwise shed priority < 0 (429 ``shed``), refuse beyond ``max_queued`` (429 ``queue_full``) or when
the measured drain rate says the wait would exceed the queue timeout (429 ``queue_timeout``, at
once), else queue in the request's priority band. `release` hands out waiters, highest band first
and, inside a band, the flow with the least virtual time (weighted fair sharing), as many as the
pool has room for; each holds a reservation until `routed`. The clock is injected.

NOTE (shedding at once): `DrainRate` measures how fast the queue empties (releases per second while
it is non-empty). A newcomer behind N requests of its priority or higher expects to wait N / rate;
above half of `queue_timeout_s` (QUEUE_HEADROOM) it is refused now, with that wait as Retry-After,
instead of 429 after the timeout. Half, because the rate is measured over a few releases of requests
that may each run for tens of seconds: queued against the full timeout, one in eight requests of the
README stack at 8x its capacity still waited 30 s for a 429; the engines' own queues keep them busy
either way.

NOTE (refusing the hopeless later): the rate at admission can look fast (a burst of completions) and
then slow down, so the queue is re-checked against the current rate at most once a second
(`hopeless`): walking the waiters in the order `release` would hand them out, one whose time already
waited plus position / rate exceeds the full `queue_timeout_s` is refused then, instead of at the
timeout; removing it moves everyone behind it forward. Before the busy period's first release this
check assumes only what it has seen (one release per busy-so-far, not per window): these requests were
let in, and a short timeout must not turn one slow release into refusals. The timeout stays as the
backstop.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inferstack.config.schema import FlowControlConfig

T = TypeVar("T")
QUEUE_HEADROOM = 0.5  # queue a request only when its expected wait is at most this share of the timeout


class Rejected(Exception):
    """The gateway answers 429 with this code and Retry-After (seconds)."""

    def __init__(self, code: str, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class DrainRate:
    """Releases per second from a queue, over the last `window_s` seconds in which it was busy."""

    def __init__(self, window_s: float = 10.0, now: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._now = now
        self._releases: deque[float] = deque()
        self._busy_since: float | None = None

    def queue_changed(self, queued: int) -> None:
        if queued and self._busy_since is None:
            self._busy_since = self._now()
        elif not queued:
            self._busy_since = None

    def released(self) -> None:
        self._releases.append(self._now())

    def expected_wait(self, ahead: int, timeout_s: float) -> float | None:
        """Seconds until a request behind ``ahead`` others is released, or None while the queue has been
        busy for under a second. With no release in the window, the rate is taken as one per window
        (`window_s`, not the shorter time since the queue formed): a pool whose requests each run for
        tens of seconds (a CPU engine) releases nothing for that long, and estimating from the first
        seconds let the start of an overload queue up, only to time out after `timeout_s` instead of
        being refused at once."""
        per_release = self.seconds_per_release()
        return None if per_release is None else (ahead + 1) * per_release

    def seconds_per_release(self, assume_window: bool = True) -> float | None:
        """The current interval between releases (see `expected_wait`), or None while unknown. With no
        release yet, ``assume_window=False`` takes only what has been seen: the time the queue has
        been busy (a lower bound), for judging requests that were already let in."""
        if self._busy_since is None:
            return None
        now = self._now()
        start = max(now - self.window_s, self._busy_since)
        while self._releases and self._releases[0] < start:
            self._releases.popleft()
        span = now - start
        if span < 1.0:
            return None
        if not self._releases:  # at most one release per window, or one would have been seen by now
            return self.window_s if assume_window else span
        return span / len(self._releases)


@dataclass
class _Flow(Generic[T]):
    waiters: deque[tuple[T, float]] = field(default_factory=deque)  # (item, queued at)
    vtime: float = 0.0
    weight: float = 1.0


@dataclass
class _Band(Generic[T]):
    flows: dict[str, _Flow[T]] = field(default_factory=dict)
    clock: float = 0.0  # virtual time of the last release, for flows that (re)join

    def __len__(self) -> int:
        return sum(len(f.waiters) for f in self.flows.values())

    def release_order(self) -> list[tuple[float, int, int, _Flow[T]]]:
        """(virtual time, flow index, position in flow, flow) for every waiter, in the order `release`
        hands them out: the k-th waiter of a flow goes at the flow's virtual time + k / weight."""
        return sorted((f.vtime + k / f.weight, i, k, f) for i, f in enumerate(self.flows.values())
                      for k in range(len(f.waiters)))


class FairQueue(Generic[T]):
    """One per pool. ``free_slots`` says how many requests the pool can take now
    (`PoolSnapshot.free_slots` / `pd_free_slots`); ``pending`` are released, not yet routed."""

    def __init__(self, cfg: FlowControlConfig, free_slots: Callable[[], int],
                 now: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.free_slots = free_slots
        self.now = now
        self.drain = DrainRate(now=now)
        self._bands: dict[int, _Band[T]] = {}
        self.queued = 0
        self.pending = 0
        self._next_check = 0.0

    def _waiting_at_or_above(self, priority: int) -> int:
        if not self.queued:  # every admission asks; nothing waits most of the time
            return 0
        return sum(len(b) for p, b in self._bands.items() if p >= priority)

    def depth(self, priority: int) -> int:
        band = self._bands.get(priority)
        return len(band) if band is not None else 0

    def admit(self, item: T, priority: int, flow_id: str, weight: float = 1.0) -> bool:
        """True: route ``item`` now. False: it waits until `release` hands it out. Raises Rejected."""
        if not self.cfg.enabled:
            return True
        ahead = self._waiting_at_or_above(priority)
        if not ahead and self.free_slots() - self.pending > 0:
            return True
        if priority < 0:
            raise Rejected("shed", "The pool is saturated and this request's priority is sheddable.")
        if self.queued >= self.cfg.max_queued:
            raise Rejected("queue_full", "Too many requests are queued at the gateway.")
        wait = self.drain.expected_wait(ahead, self.cfg.queue_timeout_s)
        if wait is not None and wait > self.cfg.queue_timeout_s * QUEUE_HEADROOM:
            raise Rejected("queue_timeout", f"The pool is saturated: the expected wait ({wait:.0f}s) is too close "
                           f"to the queue timeout ({self.cfg.queue_timeout_s:g}s).", min(60, math.ceil(wait)))
        band = self._bands.setdefault(priority, _Band())
        flow = band.flows.get(flow_id)
        if flow is None:
            flow = band.flows[flow_id] = _Flow(vtime=band.clock, weight=weight)
        elif not flow.waiters:
            flow.vtime = max(flow.vtime, band.clock)
        flow.waiters.append((item, self.now()))
        self.queued += 1
        self.drain.queue_changed(self.queued)
        return False

    def release(self) -> list[tuple[T, int]]:
        """The waiters to route now with their priorities, as many as there is room for; each holds
        a reservation until `routed`. Call whenever capacity may have freed up."""
        out: list[tuple[T, int]] = []
        room = self.free_slots() - self.pending if self.queued else 0
        while self.queued and room > 0:
            prio = max(p for p, b in self._bands.items() if len(b))
            band = self._bands[prio]
            flow = min((f for f in band.flows.values() if f.waiters), key=lambda f: f.vtime)
            item, _ = flow.waiters.popleft()
            flow.vtime += 1.0 / flow.weight
            band.clock = flow.vtime
            self.queued -= 1
            self.pending += 1
            self.drain.released()
            out.append((item, prio))
            room -= 1
        self._settle()
        return out

    def routed(self) -> None:
        """A released request now counts in its endpoint's in-flight (or went away)."""
        self.pending -= 1

    def remove(self, item: T, priority: int) -> bool:
        """Take a waiter out (its client gave up or it timed out); False if it was not waiting."""
        band = self._bands.get(priority)
        if band is None:
            return False
        for flow in band.flows.values():
            for i, (waiting, _) in enumerate(flow.waiters):
                if waiting is item or waiting == item:
                    del flow.waiters[i]
                    self.queued -= 1
                    self._settle()
                    return True
        return False

    def hopeless(self) -> list[tuple[T, int, float]]:
        """Take out the waiters that the current drain rate says will not be released before the
        queue timeout, with their expected wait (Retry-After); at most one check per second."""
        now = self.now()
        busy = self.queued and now >= self._next_check
        per_release = self.drain.seconds_per_release(assume_window=False) if busy else None
        if per_release is None:
            return []
        self._next_check = now + 1.0
        out: list[tuple[T, int, float]] = []
        position = 0
        for prio in sorted(self._bands, reverse=True):
            doomed: list[tuple[_Flow[T], int]] = []
            for _, _, k, flow in self._bands[prio].release_order():
                item, queued_at = flow.waiters[k]
                wait = (position + 1) * per_release
                if now - queued_at + wait > self.cfg.queue_timeout_s:
                    out.append((item, prio, wait))
                    doomed.append((flow, k))
                else:
                    position += 1
            for flow, k in sorted(doomed, key=lambda d: d[1], reverse=True):
                del flow.waiters[k]
        self.queued -= len(out)
        self._settle()
        return out

    def expire(self) -> list[tuple[T, int]]:
        """Take out every waiter older than the queue timeout (the simulator's timer; the live
        gateway times each waiter on its own)."""
        now, limit = self.now(), self.cfg.queue_timeout_s
        out: list[tuple[T, int]] = []
        for prio, band in self._bands.items():
            for flow in band.flows.values():
                out += [(item, prio) for item, at in flow.waiters if now - at > limit]
                flow.waiters = deque(w for w in flow.waiters if now - w[1] <= limit)
        self.queued -= len(out)
        self._settle()
        return out

    def _settle(self) -> None:
        self.drain.queue_changed(self.queued)
        for p in [p for p, b in self._bands.items() if not len(b)]:
            del self._bands[p]  # bounded memory: idle bands and their flows go
