"""The executor interface: the scheduler decides, an executor computes (torch) or pretends (emulated)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from inferstack.engine.outputs import TokenLogprob
from inferstack.engine.scheduler import SchedulerOutput


@dataclass
class ExecutorOutput:
    sampled: dict[str, int] = field(default_factory=dict)            # request id -> next token id
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # only for requests that asked


class Executor(Protocol):
    """Runs one scheduled step. Implementations own the KV cache memory (``num_kv_blocks`` of
    ``block_size`` tokens) and must write the K/V of every scheduled token into the blocks named by
    the scheduler before any attention reads them."""

    num_kv_blocks: int
    block_size: int

    def execute(self, batch: SchedulerOutput) -> ExecutorOutput: ...

    def release(self, request_id: str) -> None:
        """Forget per-request state (e.g. a seeded sampler) once the request finished."""
