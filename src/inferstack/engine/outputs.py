"""What the engine hands back per step: token deltas for each live request."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

GRAMMAR_FAILED = "grammar: "   # stop_reason prefix of a request whose grammar failed while generating


class FinishReason(StrEnum):
    STOP = "stop"          # EOS, a stop string or a stop token id
    LENGTH = "length"      # max_tokens or the context limit
    ABORT = "abort"        # client went away or the request was cancelled
    ERROR = "error"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token id, logprob), best first


@dataclass
class RequestOutput:
    """New output of one sequence (choice ``index``) since its previous RequestOutput."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None      # the stop string or token id that matched
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0                # prompt tokens served from the prefix cache
    num_external_cached_tokens: int = 0        # of those, tokens loaded from a KV tier or peer
    num_output_tokens: int = 0                # cumulative
    metrics: dict[str, float] = field(default_factory=dict)
    kv_transfer_params: dict | None = None    # final output of a PD prefill: where its KV is held

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
