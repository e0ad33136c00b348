"""Which shared prompts each endpoint keeps warm: the roots (first prefix block) of the prompts routed
there, counted per endpoint over the pool's recent routing decisions.

An engine's prefix cache holds a bounded number of prompts; an endpoint that is sent more distinct shared
prompts than it can hold evicts the rarest of them again and again (every request of those then prefills
cold), while another endpoint with fewer has room. The gateway does not know an engine's capacity, but it
can keep the counts even: a prompt nobody holds yet goes where the fewest prompts live
(`scorers.prefix_spread`). A root routed there twice or more stays counted for `REUSED_HORIZON` decisions
after its last use; one routed once counts only for `SINGLE_HORIZON` decisions (a new tenant's prompt, not
reused yet, still counts while more new ones arrive in the same burst), and is remembered as long as a
reused one, so a second use promotes it. While no root is reused anywhere (a workload of distinct
prompts: nothing to keep warm) the spread is neutral (`sharing`). Pure data; bounded by the horizons.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

# Decisions a reused root stays counted after its last use: far longer than a steady tenant's gap between
# requests (the rarest of 32 Zipf(1.1) tenants at 60 req/s comes every ~160 decisions), short enough that a
# tenant gone quiet stops counting while the engine's cache has most likely dropped it anyway.
REUSED_HORIZON = 2048
# Decisions a root routed once stays counted: a burst of new prompts spreads instead of piling onto the
# endpoint that had the fewest reused ones. Short: counted longer, the hottest tenants (the first to
# arrive) would be placed by count before their load shows, and two of them could share an engine.
SINGLE_HORIZON = 16


@dataclass
class _Warm:
    """One endpoint's roots, each with the decision of its last use, least recently used first."""

    single: OrderedDict[int, int] = field(default_factory=OrderedDict)
    reused: OrderedDict[int, int] = field(default_factory=OrderedDict)


@dataclass
class ReusedRoots:
    reused_horizon: int = REUSED_HORIZON
    single_horizon: int = SINGLE_HORIZON
    clock: int = 0
    _warm: dict[str, _Warm] = field(default_factory=dict)
    _reused: int = 0  # reused roots over every endpoint, not yet expired (an endpoint's expire when it is read)

    def record(self, endpoint: str, root: int) -> None:
        """A request whose prompt starts with ``root`` was routed to ``endpoint``."""
        self.clock += 1
        warm = self._warm.get(endpoint)
        if warm is None:
            warm = self._warm[endpoint] = _Warm()
        if root in warm.reused:
            warm.reused.move_to_end(root)
        elif warm.single.pop(root, None) is None:
            warm.single[root] = self.clock
            self._expire(warm)
            return
        else:
            self._reused += 1
        warm.reused[root] = self.clock
        self._expire(warm)

    def counts(self) -> dict[str, int]:
        """Per endpoint (absent: never routed to), the prompts it keeps warm now."""
        out = {}
        newest = self.clock - self.single_horizon
        for endpoint, warm in self._warm.items():
            self._expire(warm)
            fresh = 0
            for at in reversed(warm.single.values()):  # routed once, in order: the latest are last
                if at <= newest:
                    break
                fresh += 1
            out[endpoint] = len(warm.reused) + fresh
        return out

    def sharing(self) -> bool:
        """Some endpoint was sent the same prompt root twice within the horizon (prompts are shared). O(1) while
        nothing is shared, so a workload of distinct prompts (every request cold) pays nothing per endpoint."""
        if self._reused:
            for warm in self._warm.values():
                self._expire(warm)
        return self._reused > 0

    def forget(self, endpoint: str) -> None:
        warm = self._warm.pop(endpoint, None)
        if warm is not None:
            self._reused -= len(warm.reused)

    def _expire(self, warm: _Warm) -> None:
        oldest = self.clock - self.reused_horizon  # a root routed once is remembered as long (a second use)
        single, reused = warm.single, warm.reused
        while single and next(iter(single.values())) <= oldest:
            single.popitem(last=False)
        while reused and next(iter(reused.values())) <= oldest:
            reused.popitem(last=False)
            self._reused -= 1
