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

from collections import deque
from dataclasses import dataclass, field
from itertools import islice

# Decisions a reused root stays counted after its last use: far longer than a steady tenant's gap between
# requests (the rarest of 32 Zipf(1.1) tenants at 60 req/s comes every ~160 decisions), short enough that a
# tenant gone quiet stops counting while the engine's cache has most likely dropped it anyway.
REUSED_HORIZON = 2048
# Decisions a root routed once stays counted: a burst of new prompts spreads instead of piling onto the
# endpoint that had the fewest reused ones. Short: counted longer, the hottest tenants (the first to
# arrive) would be placed by count before their load shows, and two of them could share an engine.
SINGLE_HORIZON = 16


@dataclass(slots=True)
class _Use:
    last: int             # the decision of its last use
    reused: bool = False  # routed to this endpoint twice or more


@dataclass
class ReusedRoots:
    """Every (endpoint, root) routed within the horizon with its `_Use`, and one event per decision in order,
    so expiry costs O(1) per decision and the counts never scan old roots."""

    reused_horizon: int = REUSED_HORIZON
    single_horizon: int = SINGLE_HORIZON
    clock: int = 0
    _entries: dict[tuple[str, int], _Use] = field(default_factory=dict)
    _events: deque[tuple[int, tuple[str, int]]] = field(default_factory=deque)  # (decision, key), oldest first
    _reused: dict[str, int] = field(default_factory=dict)  # endpoint -> its reused roots
    _reused_total: int = 0

    def record(self, endpoint: str, root: int) -> None:
        """A request whose prompt starts with ``root`` was routed to ``endpoint``."""
        self.clock += 1
        key = (endpoint, root)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Use(self.clock)
            self._reused.setdefault(endpoint, 0)
        else:
            entry.last = self.clock
            if not entry.reused:
                entry.reused = True
                self._reused[endpoint] += 1
                self._reused_total += 1
        self._events.append((self.clock, key))
        self._expire()

    def counts(self) -> dict[str, int]:
        """Per endpoint (absent: never routed to), the prompts it keeps warm now."""
        out = dict(self._reused)
        entries = self._entries
        for at, key in islice(reversed(self._events), self.single_horizon):
            entry = entries.get(key)
            if entry is not None and not entry.reused and entry.last == at:   # routed once, just now
                out[key[0]] += 1
        return out

    def sharing(self) -> bool:
        """Some endpoint was sent the same prompt root twice within the horizon (prompts are shared)."""
        return self._reused_total > 0

    def forget(self, endpoint: str) -> None:
        for key in [k for k in self._entries if k[0] == endpoint]:
            if self._entries.pop(key).reused:
                self._reused_total -= 1
        self._reused.pop(endpoint, None)

    def _expire(self) -> None:
        """Drop the roots whose last use is `reused_horizon` decisions old (a root routed once is remembered as
        long, so a second use promotes it)."""
        oldest = self.clock - self.reused_horizon
        events, entries = self._events, self._entries
        while events and events[0][0] <= oldest:
            at, key = events.popleft()
            entry = entries.get(key)
            if entry is None or entry.last != at:
                continue  # used again since: a later event stands for it
            del entries[key]
            if entry.reused:
                self._reused[key[0]] -= 1
                self._reused_total -= 1
