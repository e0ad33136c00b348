"""Offline batch API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from inferstack.engine.builder import BuiltEngine, build_engine
from inferstack.engine.config import EngineConfig
from inferstack.engine.outputs import FinishReason, TokenLogprob
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0


def expand_choices(request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float,
                   eos: frozenset[int], priority: int = 0, cache_salt: str | None = None,
                   kv_transfer_params: dict | None = None) -> list[Request]:
    """One engine request per choice; seeded choices get distinct, reproducible seeds."""
    n = params.n
    return [
        Request(request_id=request_id if n == 1 else f"{request_id}#{i}", prompt_token_ids=list(prompt_ids),
                sampling_params=replace(params, n=1, seed=None if params.seed is None else params.seed + i),
                arrival_time=arrival, eos_token_ids=eos, priority=priority, cache_salt=cache_salt, index=i,
                kv_transfer_params=dict(kv_transfer_params) if kv_transfer_params else None)
        for i in range(n)
    ]


class LLM:
    def __init__(self, model: str, **engine_kwargs) -> None:
        self.engine: BuiltEngine = build_engine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | None = None) -> list[GenerationResult]:
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        core = self.engine.core
        results: dict[str, GenerationResult] = {}
        order: list[str] = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
            rid = uuid.uuid4().hex
            order.append(rid)
            results[rid] = GenerationResult(rid, ids, [CompletionOutput(i) for i in range(params.n)])
            for request in expand_choices(rid, ids, params, time.monotonic(), self.engine.eos_token_ids):
                core.add_request(request)
        while core.has_unfinished():
            for out in core.step():
                parent = out.request_id.split("#", 1)[0]
                result = results[parent]
                choice = result.outputs[out.index]
                choice.text += out.new_text
                choice.token_ids.extend(out.new_token_ids)
                if out.logprobs:
                    choice.logprobs = (choice.logprobs or []) + out.logprobs
                result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
                if out.finished:
                    choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
        return [results[rid] for rid in order]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> GenerationResult:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.generate([ids], sampling_params)[0]
