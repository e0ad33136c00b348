"""Drive a real EngineCore request by request (with kv_transfer_params), for KV connector tests."""

from __future__ import annotations

import time
import uuid

from inferstack.engine.core import EngineCore
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams


def run_request(core: EngineCore, prompt: list[int], max_tokens: int, kv_transfer_params: dict | None = None,
                cache_salt: str | None = None) -> tuple[list[int], dict | None]:
    """Greedy-generate one request to completion; returns (tokens, response kv_transfer_params)."""
    request = Request(uuid.uuid4().hex, list(prompt),
                      SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), time.monotonic(),
                      cache_salt=cache_salt, kv_transfer_params=kv_transfer_params)
    core.add_request(request)
    tokens: list[int] = []
    params = None
    while core.has_unfinished():
        for out in core.step():
            tokens.extend(out.new_token_ids)
            if out.finished:
                params = out.kv_transfer_params
    return tokens, params


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` tokens that differ from their first token on."""
    out = []
    for k in range(n):
        text = " ".join(f"Note {k}-{i}: replica {k} logs line {i} about cache tier {i % 7}."
                        for i in range(length // 8))
        ids = tokenizer.encode(text)
        assert len(ids) >= length, "prompt text too short"
        out.append(ids[:length])
    return out
