"""Per-request grammar state in the engine and the batch's token bitmask for each step.

One int32 bitmask ``[rows, ceil(vocab / 32)]`` per step (vLLM's layout): a row per sampled sequence,
all ones for unconstrained ones; llguidance fills the constrained rows with the GIL released (in
parallel for large batches). A step without constrained requests does no grammar work at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING

import llguidance

from inferstack.engine.structured.compiler import CompiledGrammar, GrammarCompiler

if TYPE_CHECKING:
    import torch

# Below this many constrained rows the masks are filled on the engine thread: a row takes tens of
# microseconds, and the parallel executor's worker threads spin between steps, which costs a small
# machine more CPU than they save (vLLM also fills in parallel only for large batches).
PARALLEL_FILL_ROWS = 32


@dataclass(frozen=True)
class GrammarBitmask:
    """One step's allowed tokens: bit ``t % 32`` of ``words[row, t // 32]``; only ``rows`` constrain
    (every other row is all ones and is left alone)."""

    words: torch.Tensor      # int32 [N, ceil(V / 32)]
    rows: list[int]


class Advance(Enum):
    OK = auto()
    TERMINATED = auto()     # the grammar is complete: the request finishes with "stop"
    REJECTED = auto()       # the token breaks the grammar (only if a sampler ignored the mask)


class StructuredOutputManager:
    def __init__(self, compiler: GrammarCompiler, max_num_seqs: int) -> None:
        self.compiler = compiler
        self.words = (compiler.vocab_size + 31) // 32
        self._max_num_seqs = max_num_seqs
        self._mask: torch.Tensor | None = None    # made on the first constrained step (see bitmask)
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._fill: llguidance.LLExecutor | None = None       # made on the first large batch

    @property
    def active(self) -> bool:
        return bool(self._matchers)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def start(self, request_id: str, grammar: CompiledGrammar) -> None:
        self._matchers[request_id] = grammar.new_matcher()

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def bitmask(self, sampled_ids: list[str]) -> GrammarBitmask | None:
        """The mask for this step's sampled rows (in order), or None when none is constrained."""
        pairs = [(m, i) for i, rid in enumerate(sampled_ids) if (m := self._matchers.get(rid)) is not None]
        if not pairs:
            return None
        n = len(sampled_ids)
        if self._mask is None or n > self._mask.shape[0]:
            # torch is imported here, not at start: an emulated engine (no torch otherwise) starts in
            # a fraction of the time, and only pays for it once a request asks for a grammar.
            import torch

            self._mask = torch.full((max(n, self._max_num_seqs), self.words), -1, dtype=torch.int32)
        mask = self._mask[:n]
        mask.fill_(-1)
        if len(pairs) >= PARALLEL_FILL_ROWS:
            self._fill = self._fill or llguidance.LLExecutor(num_threads=2)
            self._fill.unsafe_compute_mask_ptr(pairs, mask.data_ptr(), self.words * 4, n)
        else:
            for matcher, row in pairs:
                matcher.unsafe_compute_mask_ptr(mask[row].data_ptr(), self.words * 4)
        return GrammarBitmask(mask, [i for _, i in pairs])

    def advance(self, request_id: str, token: int) -> Advance:
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return Advance.OK
        if not matcher.consume_token(token):
            return Advance.REJECTED
        return Advance.TERMINATED if matcher.is_stopped() else Advance.OK

    def rollback(self, request_id: str, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (the engine discarded them)."""
        matcher = self._matchers.get(request_id)
        if matcher is not None and num_tokens > 0:
            matcher.rollback(num_tokens)

    def error(self, request_id: str) -> str:
        matcher = self._matchers.get(request_id)
        return matcher.get_error() if matcher is not None else ""
