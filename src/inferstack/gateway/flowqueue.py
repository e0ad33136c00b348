"""The flow-control policy as a pure, synchronous queue: the live gateway (`flowcontrol.py`, which
adds asyncio futures and timers) and the simulator (virtual time) run this same code.

Rules: pass straight through while the pool has room and nobody of equal or higher priority waits;
otherwise shed priority < 0 (429 ``shed``), refuse beyond ``max_queued`` (429 ``queue_full``) or when
the measured service rate says the wait would exceed the budget (429 ``queue_timeout``, at once),
else queue in the request's priority band. `release` hands out waiters, highest band first
and, inside a band, the flow with the least virtual time (weighted fair sharing), as many as the
pool has room for; each holds a reservation until `routed`. The clock is injected.

NOTE (deadline-aware admission): a queued request is a promise to serve it before `queue_timeout_s`,
so the wait is predicted at arrival and the request refused *then* (429 ``queue_timeout``, the wait as
Retry-After) when the prediction exceeds the budget, half the timeout (QUEUE_HEADROOM: room for a
rate that wobbles). The prediction is `admission_wait`: the waiters ahead of it (its priority or
higher) + 1, times the pool's measured seconds per completion while the queue waits (`ServiceRate`):
then each completion frees the slot the next waiter takes, so that is the queue's release interval.
Completions, not releases, because a burst of completions can empty the queue and hand its other
slots straight to arrivals, which a count of releases would miss (the rate looked 2-3x slower).

NOTE (why the rate is measured over busy time and many completions): CPU engines finish their
running batch together, every tens of seconds, so completions come in bursts. The previous estimate
(releases per wall second over the last 10 s of the current busy period) swung with every burst: a
burst made the rate look fast, the arrivals after it were queued, and when the window slid past the
burst they were refused 3-20 s later; and each new busy period started with no evidence and assumed
one release per 10 s, shedding requests the pool served moments later. `ServiceRate` keeps its
history across busy periods and averages the busy time between the last `min_samples` completions
(at least 32, and all of the last 60 s of busy time), plus the time since the latest one while the
queue still waits: a stall raises the estimate at once, a burst cannot shrink it below the average
over the bursts.

NOTE (refusing the hopeless later, only on a stall): once the pool has completed nothing for longer
than the admission budget and than twice its longest interval between completions seen (a pool that
finishes a batch every 20 s is not stalled after 16 s), it broke the promise made to the waiters,
and the queue is re-checked at most once a second (`hopeless`): walking the waiters in the order
`release` would hand them out, one whose time already waited plus its predicted wait exceeds the
full `queue_timeout_s` is refused then instead of at the timeout; everyone behind moves forward.
Not before: on a pool whose completions come in bursts, "waited so far + position x mean interval"
overstates the wait just before the next burst, and an earlier version of this check refused,
3-20 s after they arrived, requests the next burst would have served. Before the pool's first
completion under load ever there is no rate: the first second of that queue is let in, then the
busy time so far is a lower bound of one interval. The timeout stays as the backstop.

NOTE (no promise without evidence): until the queue has seen a completion, its wait is unknown. Two
sources stand in. First the engines' own pace (`prior`: their seconds per completion while full, measured
from their counters on every scrape, `EngineDrain`), which a stack that served anything while full,
a warm-up included, already has; admission then predicts with it at arrival. Without that either, and
before the pool completed any request (a cold CPU engine takes 10-200 s for its first prefill), while
every engine reports itself full (`engines_full`: requests waiting there, or its batch at its cap), a
queued request is held at most half of `queue_wait_s` (1 s) and refused then (`hopeless`, Retry-After 1).
Before this rule such a queue was judged only by the stall re-check, ~15 s after it formed, so its
refusals came up to 16 s late. It cannot starve a healthy pool: the engines stay full (the gateway
releases into them as before), an engine with room is not held against, and the hold ends for good with
the pool's first completion. The simulator injects no `engines_full` and so never holds.
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
QUEUE_HEADROOM = 0.5  # queue a request only when its predicted wait is at most this share of the timeout


class Rejected(Exception):
    """The gateway answers 429 with this code and Retry-After (seconds)."""

    def __init__(self, code: str, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


def admission_wait(ahead: int, per_release_s: float | None, budget_s: float) -> float | None:
    """The admission decision for a request that must queue: its predicted wait when that exceeds
    ``budget_s`` (refuse it now), else None (queue it). ``ahead``: waiters released before it;
    ``per_release_s``: the pool's measured seconds per release, None while unknown (queue it)."""
    if per_release_s is None:
        return None
    wait = (ahead + 1) * per_release_s
    return wait if wait > budget_s else None


class ServiceRate:
    """Seconds per release of one pool's queue: the busy time (the queue non-empty) between the pool's
    completions in it."""

    def __init__(self, now: Callable[[], float] = time.monotonic, min_samples: int = 32,
                 window_s: float = 60.0, max_kept: int = 4096):
        self._now = now
        self.min_samples = min_samples
        self.window_s = window_s            # of busy time: at high rates, average over this much
        self.max_kept = max_kept            # bounded memory at thousands of completions a second
        self._gaps: deque[float] = deque()  # busy seconds before each completion (since the previous one)
        self._gap_sum = 0.0
        self._busy_since: float | None = None
        self._since_completion = 0.0         # busy seconds since the latest completion, closed periods

    def queue_changed(self, queued: int) -> None:
        now = self._now()
        if queued and self._busy_since is None:
            self._busy_since = now
        elif not queued and self._busy_since is not None:
            self._since_completion += now - self._busy_since
            self._busy_since = None

    def stalled_s(self) -> float:
        """Busy seconds since the latest completion (or since the first busy period began)."""
        return self._since_completion + (self._now() - self._busy_since if self._busy_since is not None else 0.0)

    def stalled(self, budget_s: float) -> bool:
        """No completion for longer than ``budget_s`` and than twice the longest interval kept: the
        pool stopped, rather than being between two of its usual bursts."""
        open_s = self.stalled_s()
        return open_s > budget_s and open_s > 2 * max(self._gaps, default=0.0)

    def completed(self) -> None:
        """A request of the pool finished; counted only while the queue waits (busy). One while the queue
        is empty is no sample, but it ends the open interval: the busy time before it was no stall."""
        if self._busy_since is None:
            self._since_completion = 0.0
            return
        gap = self.stalled_s()
        self._since_completion = 0.0
        self._busy_since = self._now()
        self._gaps.append(gap)
        self._gap_sum += gap
        while len(self._gaps) > self.min_samples and (
                self._gap_sum - self._gaps[0] >= self.window_s or len(self._gaps) > self.max_kept):
            self._gap_sum -= self._gaps.popleft()

    def measured(self) -> bool:
        """At least one completion was seen while the queue waited."""
        return bool(self._gaps)

    def seconds_per_release(self) -> float | None:
        """The mean busy interval between the kept completions, the current open one included (a stall
        raises it at once): the queue's seconds per release. Before any completion under load: the
        busy time so far as a lower bound, None for its first second."""
        open_s = self.stalled_s() if self._busy_since is not None else 0.0
        if not self._gaps:
            return None if open_s < 1.0 else open_s
        return (self._gap_sum + open_s) / len(self._gaps)


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
    (`PoolSnapshot.free_slots` / `pd_free_slots`); ``pending`` are released, not yet routed.
    ``prior`` gives the engines' own seconds per release of the pool (None: unmeasured), used until the
    queue measures its own; ``engines_full`` says every engine reports itself full (module NOTE
    "no promise without evidence"; None: never, as in the simulator)."""

    def __init__(self, cfg: FlowControlConfig, free_slots: Callable[[], int],
                 now: Callable[[], float] = time.monotonic,
                 prior: Callable[[], float | None] | None = None,
                 engines_full: Callable[[], bool] | None = None) -> None:
        self.cfg = cfg
        self.free_slots = free_slots
        self.prior = prior
        self.engines_full = engines_full
        self.now = now
        self.rate = ServiceRate(now=now)
        self._bands: dict[int, _Band[T]] = {}
        self.queued = 0
        self.pending = 0
        self.completions_seen = False
        self._refused_unproven = False  # the hold refused someone before the first completion
        self._next_check = 0.0

    def _waiting_at_or_above(self, priority: int) -> int:
        if not self.queued:  # every admission asks; nothing waits most of the time
            return 0
        return sum(len(b) for p, b in self._bands.items() if p >= priority)

    def depth(self, priority: int) -> int:
        band = self._bands.get(priority)
        return len(band) if band is not None else 0

    def admit(self, item: T, priority: int, flow_id: str, weight: float = 1.0,
              free_slots: Callable[[], int] | None = None, promised: float | None = None) -> bool:
        """True: route ``item`` now. False: it waits until `release` hands it out. Raises Rejected.
        ``free_slots``: the pool's room as this request's own snapshot counts it (the live gateway's routing
        then reuses that snapshot, `pipeline/admit.py`); None: the queue's ``free_slots``. ``promised``: when
        the request arrived, if it already waited in the pool's queue, whose admission promised it service
        within the timeout (module NOTE "deadline-aware admission"): an endpoint's hold queue takes it without
        predicting its wait again, so it is not refused late for a promise made elsewhere, and counts its
        wait from then (the timeout and `hopeless` cover its whole wait); the bound on queued requests holds."""
        if self.passes(priority, free_slots):
            return True
        ahead = self._waiting_at_or_above(priority)
        if priority < 0:
            raise Rejected("shed", "The pool is saturated and this request's priority is sheddable.")
        if self.queued >= self.cfg.max_queued:
            raise Rejected("queue_full", "Too many requests are queued at the gateway.")
        budget = self.cfg.queue_timeout_s * QUEUE_HEADROOM
        wait = None if promised is not None else admission_wait(ahead, self.per_release(), budget)
        if wait is not None:
            raise Rejected("queue_timeout", f"The pool is saturated: the expected wait ({wait:.0f}s) is too close "
                           f"to the queue timeout ({self.cfg.queue_timeout_s:g}s).", min(60, math.ceil(wait)))
        band = self._bands.setdefault(priority, _Band())
        flow = band.flows.get(flow_id)
        if flow is None:
            flow = band.flows[flow_id] = _Flow(vtime=band.clock, weight=weight)
        elif not flow.waiters:
            flow.vtime = max(flow.vtime, band.clock)
        flow.waiters.append((item, self.now() if promised is None else promised))
        self.queued += 1
        self.rate.queue_changed(self.queued)
        return False

    def passes(self, priority: int, free_slots: Callable[[], int] | None = None) -> bool:
        """A request of ``priority`` goes straight through now: nobody of equal or higher priority waits
        and there is room beyond the reservations (what `admit` checks first, without queueing anything)."""
        if not self.cfg.enabled:
            return True
        return not self._waiting_at_or_above(priority) and (free_slots or self.free_slots)() - self.pending > 0

    def per_release(self) -> float | None:
        """The queue's seconds per release: measured once it saw a completion; before that the engines'
        own pace (`prior`) or, without it, the busy time so far (a lower bound; None in its first second)."""
        bound = self.rate.seconds_per_release()
        if self.rate.measured() or self.prior is None:
            return bound
        prior = self.prior()
        return bound if prior is None else max(prior, bound or 0.0)

    def evidence(self) -> bool:
        """Something to promise a wait by: the pool completed a request (its queue's rate then measures or
        bounds the pace; a completion while the queue was empty still proves the pool serves), or the
        engines measured their own pace (`prior`)."""
        return self.completions_seen or (self.prior is not None and self.prior() is not None)

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
            out.append((item, prio))
            room -= 1
        self._settle()
        return out

    def routed(self) -> None:
        """A released request now counts in its endpoint's in-flight (or went away)."""
        self.pending -= 1

    def completed(self) -> None:
        """A request of the pool finished at its endpoint (the service rate's sample); then `release`."""
        if not self.completions_seen and self._refused_unproven and not self.queued:
            # the hold emptied the queue of a pool that stayed full: its first completion still measures the
            # busy time before it (else the next queue starts with no history and the lower bound misleads)
            self.rate.queue_changed(1)
        self.completions_seen = True
        self.rate.completed()

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
        """While the pool is stalled (`ServiceRate.stalled`: no completion for longer than the admission
        budget and than its usual bursts), take out the waiters the current rate says will not be
        released before the queue timeout, with their expected wait (Retry-After); at most one check
        per second. Without any evidence of a pace (`evidence`), the waiters held past half of
        `queue_wait_s`, with an infinite wait (no promise could be made)."""
        now = self.now()
        if self.queued and not self.evidence() and (held := self._unproven(now)):
            return held  # else the stall re-check below still applies (an engine with room that stalls)
        busy = self.queued and now >= self._next_check
        stalled = busy and self.rate.stalled(self.cfg.queue_timeout_s * QUEUE_HEADROOM)
        per_release = self.rate.seconds_per_release() if stalled else None
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

    def _unproven(self, now: float) -> list[tuple[T, int, float]]:
        """Waiters held longer than half of `queue_wait_s` (the other half: the pump's cadence and the
        answer's way back, so the refusal reaches the client within `queue_wait_s`), taken out while every
        engine reports itself full (`engines_full`) and nothing measures the pace (`hopeless`)."""
        if self.engines_full is None or not self.engines_full():
            return []  # an engine has room: what waits now goes there soon, hold on
        out = [(item, prio, math.inf)
               for item, prio in self._older_than(self.cfg.queue_wait_s * QUEUE_HEADROOM, now)]
        self._refused_unproven = self._refused_unproven or bool(out)
        return out

    def take_all(self) -> list[tuple[T, int]]:
        """Take every waiter out (their endpoint left the pool or turned unhealthy: they route again)."""
        return self._older_than(-math.inf, self.now())

    def expire(self) -> list[tuple[T, int]]:
        """Take out every waiter older than the queue timeout (the simulator's timer; the live
        gateway times each waiter on its own)."""
        return self._older_than(self.cfg.queue_timeout_s, self.now())

    def _older_than(self, limit: float, now: float) -> list[tuple[T, int]]:
        """Take out the waiters queued more than ``limit`` seconds ago."""
        out: list[tuple[T, int]] = []
        for prio, band in self._bands.items():
            for flow in band.flows.values():
                out += [(item, prio) for item, at in flow.waiters if now - at > limit]
                flow.waiters = deque(w for w in flow.waiters if now - w[1] <= limit)
        self.queued -= len(out)
        self._settle()
        return out

    def _settle(self) -> None:
        self.rate.queue_changed(self.queued)
        for p in [p for p, b in self._bands.items() if not len(b)]:
            del self._bands[p]  # bounded memory: idle bands and their flows go
