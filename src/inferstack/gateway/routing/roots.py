"""Which shared prompts each endpoint keeps warm: the roots (first prefix block) of the prompts routed
there more than once within the last `horizon` routing decisions of the pool.

An engine's prefix cache holds a bounded number of prompts; an endpoint that is sent more distinct shared
prompts than it can hold evicts the rarest of them again and again (every request of those then prefills
cold), while another endpoint with fewer has room. The gateway does not know an engine's capacity, but it
can keep the counts even: a prompt nobody holds yet goes where the fewest shared prompts live
(`scorers.prefix_spread`). A root routed only once is not counted, so a workload of distinct prompts
(nothing to keep warm) leaves every count at 0 and the spread neutral. Pure data; bounded by the horizon.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

# Routing decisions a root stays counted after its last use: far longer than a steady tenant's gap between
# requests (the rarest of 32 Zipf(1.1) tenants at 60 req/s comes every ~160 decisions), short enough that a
# tenant gone quiet stops counting while the engine's cache has most likely dropped it anyway.
ROOT_HORIZON = 2048


@dataclass
class ReusedRoots:
    horizon: int = ROOT_HORIZON
    clock: int = 0
    # endpoint -> root -> (decision of its last use, uses), least recently used first
    _seen: dict[str, OrderedDict[int, tuple[int, int]]] = field(default_factory=dict)
    _reused: dict[str, int] = field(default_factory=dict)  # endpoint -> its roots with uses >= 2

    def record(self, endpoint: str, root: int) -> None:
        """A request whose prompt starts with ``root`` was routed to ``endpoint``."""
        self.clock += 1
        seen = self._seen.get(endpoint)
        if seen is None:
            seen = self._seen[endpoint] = OrderedDict()
            self._reused[endpoint] = 0
        last = seen.pop(root, None)
        uses = 1 if last is None else last[1] + 1
        seen[root] = (self.clock, uses)
        if uses == 2:
            self._reused[endpoint] += 1
        self._expire(endpoint, seen)

    def counts(self) -> dict[str, int]:
        """Per endpoint, the shared prompts it keeps warm now (0 for endpoints never routed to: absent)."""
        for endpoint, seen in self._seen.items():
            self._expire(endpoint, seen)
        return self._reused

    def any_reused(self) -> bool:
        return any(self._reused.values())

    def forget(self, endpoint: str) -> None:
        self._seen.pop(endpoint, None)
        self._reused.pop(endpoint, None)

    def _expire(self, endpoint: str, seen: OrderedDict[int, tuple[int, int]]) -> None:
        oldest = self.clock - self.horizon
        while seen:
            root, (at, uses) = next(iter(seen.items()))
            if at > oldest:
                return
            del seen[root]
            if uses >= 2:
                self._reused[endpoint] -= 1
