"""Per-request engine state: tokens, progress through the prompt, and lifecycle status."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from inferstack.engine.outputs import FinishReason
from inferstack.engine.sampling_params import SamplingParams


class RequestStatus(Enum):
    WAITING = auto()
    WAITING_FOR_REMOTE_KVS = auto()     # blocks allocated, a peer's KV being READ into them (vLLM's name)
    RUNNING = auto()
    PREEMPTED = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0                       # vLLM meaning: lower value is served first
    cache_salt: str | None = None
    index: int = 0                          # choice index when a request asks for n > 1
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0            # tokens whose KV is in this request's blocks
    num_cached_tokens: int = -1             # prefix-cache hit at first scheduling (-1: not yet scheduled)
    num_external_cached_tokens: int = 0     # of the prompt, tokens loaded from a KV tier or a peer
    block_hashes: list[bytes] = field(default_factory=list)   # chained hashes of full blocks, grown lazily
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    scheduled_time: float | None = None
    first_token_time: float | None = None
    kv_transfer_params: dict | None = None  # PD: in, where to pull KV from; out (prefill), where it is held

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, float]:
        """Priority-policy order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
