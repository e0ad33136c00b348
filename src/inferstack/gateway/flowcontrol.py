"""Flow control while a pool is saturated: strict priority bands, fair sharing between flows
(fairness ids, by default the tenant) inside a band, shedding of priority < 0, shedding at arrival
when the wait would exceed the queue timeout, queue timeouts and a bound on queued requests.

The policy is `flowqueue.FairQueue` (pure, shared with the simulator); this module makes it wait:
each queued request is an asyncio future that `pump()` resolves as capacity frees up (on request
completion and after each metrics refresh). A released request holds a reservation only until it
is routed; from then on it counts in its endpoint's in-flight, which the pool's room already
subtracts (docs/gateway.md, "When flow control queues, and how it releases").
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from inferstack.config.schema import FlowControlConfig
from inferstack.gateway.flowqueue import QUEUE_HEADROOM, FairQueue, Rejected
from inferstack.protocol.errors import APIError


class ClientGone(Exception):
    """The client hung up while its request waited (in the flow-control queue, or held for a replica)."""


class FlowController:
    """One per pool. ``free_slots`` says how many requests may be released right now."""

    def __init__(self, cfg: FlowControlConfig, free_slots: Callable[[], int],
                 on_depth: Callable[[int, int], None] | None = None, now: Callable[[], float] = time.monotonic,
                 prior: Callable[[], float | None] | None = None, engines_full: Callable[[], bool] | None = None):
        """``prior``, ``engines_full``: the engines' own pace, and whether all report themselves full (`FairQueue`)."""
        self.cfg = cfg
        self.on_depth = on_depth
        self.queue: FairQueue[asyncio.Future] = FairQueue(cfg, free_slots, now, prior, engines_full)

    @property
    def queued(self) -> int:
        return self.queue.queued

    @property
    def pending(self) -> int:
        return self.queue.pending

    async def admit(self, priority: int, flow_id: str, weight: float = 1.0,
                    client_gone: asyncio.Future | None = None,
                    free_slots: Callable[[], int] | None = None, timeout_s: float | None = None,
                    promised: float | None = None) -> float | None:
        """Wait until the request may be routed. Returns None if it passed straight through (without
        suspending), else the seconds it waited (then call `routed()` once it holds its endpoint). Raises
        APIError(429), or ClientGone when ``client_gone`` completes first: a departed client's request leaves
        the queue at once instead of taking a slot when its turn comes. ``free_slots``: `FairQueue.admit`;
        ``timeout_s``: the longest wait (None: `queue_timeout_s`); ``promised``: `FairQueue.admit`. Raises whatever
        `evict` hands a waiter."""
        if self.queue.passes(priority, free_slots):  # nearly every request: no future, nothing queued
            return None
        return await self.wait(priority, flow_id, weight, client_gone, free_slots, timeout_s, promised)

    def passes(self, priority: int, free_slots: Callable[[], int] | None = None) -> bool:
        """`admit` would let the request straight through: a plain call, no coroutine (then `admit` is not
        needed; otherwise await `wait`)."""
        return self.queue.passes(priority, free_slots)

    async def wait(self, priority: int, flow_id: str, weight: float = 1.0,
                   client_gone: asyncio.Future | None = None,
                   free_slots: Callable[[], int] | None = None, timeout_s: float | None = None,
                   promised: float | None = None) -> float | None:
        """`admit` for a request that did not pass at once (`passes` said no): the same arguments and answers."""
        # the loop from the client-gone future when there is one: `get_running_loop` is a getpid system call
        loop = client_gone.get_loop() if client_gone is not None else asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        try:  # checks the room again: the same answer (no suspension since), at a queueing request's cost only
            if self.queue.admit(fut, priority, flow_id, weight, free_slots, promised):
                return None
        except Rejected as r:
            raise APIError(429, str(r), code=r.code, headers={"retry-after": str(r.retry_after_s)}) from None
        self._depth(priority)
        start = time.monotonic()
        timeout_s = self.cfg.queue_timeout_s if timeout_s is None else timeout_s
        self.pump()
        waiting = asyncio.shield(fut)
        try:
            done, _ = await asyncio.wait([waiting] if client_gone is None else [waiting, client_gone],
                                         timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._leave(fut, priority, released=_released(fut))
            raise
        if fut.done():
            if (refused := fut.exception()) is not None:  # refused as hopeless by `pump`
                waiting.exception()  # retrieved too, so asyncio logs nothing about it
                raise refused
            return time.monotonic() - start
        self._leave(fut, priority, released=False)
        if client_gone is not None and client_gone in done:
            raise ClientGone
        raise APIError(429, f"Timed out after {timeout_s:g}s waiting for capacity.",
                       code="queue_timeout", headers={"retry-after": "1"})

    def _leave(self, fut: asyncio.Future, priority: int, released: bool) -> None:
        """A waiter that will not be routed: out of the queue, or its reservation given back."""
        if released:
            self.routed()
            return
        if fut.done():  # refused by `pump`: already out of the queue
            return
        fut.cancel()
        self.queue.remove(fut, priority)
        self._depth(priority)

    def routed(self) -> None:
        """A released request now counts in its endpoint's in-flight (or went away)."""
        self.queue.routed()
        self.pump()

    def completed(self) -> None:
        """A request of this pool was served by its endpoint: measure it, then release waiters."""
        self.queue.completed()
        self.pump()

    def freed(self) -> None:
        """A request left its endpoint unserved (failed, refused, cancelled): its slot is free, but it
        says nothing about the pool's pace, so only release waiters."""
        self.pump()

    def evict(self, reason: Callable[[], BaseException]) -> int:
        """Take every waiter out and raise ``reason()`` in each (their endpoint is gone); how many."""
        out = self.queue.take_all()
        for fut, prio in out:
            self._depth(prio)
            if not fut.done():
                fut.set_exception(reason())
        return len(out)

    def pump(self) -> int:
        """Release as many queued requests as there is room for, and refuse those the current drain
        rate says would time out anyway (429 at once instead of after the timeout); returns how many
        were released."""
        if not self.queue.queued:  # nothing waits: nothing to release or refuse (the common case, per request)
            return 0
        released = 0
        while batch := self.queue.release():
            gave_back = False
            for fut, prio in batch:
                self._depth(prio)
                if fut.done():      # its waiter is gone: give the reservation back, release another
                    self.queue.routed()
                    gave_back = True
                    continue
                fut.set_result(None)
                released += 1
            if not gave_back:
                break
        for fut, prio, wait in self.queue.hopeless():
            self._depth(prio)
            if not fut.done():
                fut.set_exception(_hopeless_error(wait, self.cfg))
        return released

    def _depth(self, priority: int) -> None:
        if self.on_depth is not None:
            self.on_depth(priority, self.queue.depth(priority))


def _hopeless_error(wait: float, cfg: FlowControlConfig) -> APIError:
    """The 429 for a waiter `FairQueue.hopeless` took out; an infinite ``wait``: no pace was measured yet."""
    if math.isinf(wait):
        return APIError(429, "The pool is saturated and has not completed a request under load yet, so no wait "
                        f"can be promised; held {cfg.queue_wait_s * QUEUE_HEADROOM:g}s without a free slot.",
                        code="queue_timeout", headers={"retry-after": "1"})
    return APIError(429, f"The pool is saturated: at the current drain rate this request would wait another "
                    f"{wait:.0f}s, past the queue timeout ({cfg.queue_timeout_s:g}s).",
                    code="queue_timeout", headers={"retry-after": str(min(60, max(1, math.ceil(wait))))})


def _released(fut: asyncio.Future) -> bool:
    """The waiter was handed a slot (not cancelled, not refused)."""
    return fut.done() and not fut.cancelled() and fut.exception() is None
