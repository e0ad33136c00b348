"""--kv-cache-dtype int8 on the bundled SmolLM2: memory, accuracy against the same weights with an fp32
cache, prefix caching, and prefill→decode transfer of int8 blocks (two engines in this process)."""

from __future__ import annotations

import pytest
import torch

from inferstack.engine.evaluate import score_tokens
from inferstack.engine.llm import LLM
from support.kv_engine import prompts, run_request

pytestmark = pytest.mark.slow

KV_BYTES = 64 << 20
PROMPT_LEN, NEW_TOKENS = 100, 16     # 6 full blocks + 4 tokens


@pytest.fixture(scope="module")
def engines():
    torch.set_num_threads(1)
    common = {"dtype": "float32", "num_threads": 1, "kv_cache_bytes": KV_BYTES, "kv_cache_dtype": "int8"}
    prefill = LLM("smollm2-135m", kv_role="prefill", **common)
    decode = LLM("smollm2-135m", kv_role="decode", kv_transfer_peers=("127.0.0.1",), **common)
    return prefill, decode


def test_int8_cache_holds_3_7x_the_tokens_of_fp32_and_names_its_key_space(engines):
    _, decode = engines
    executor = decode.engine.core.executor
    cache = executor.kv_caches[0]
    assert cache.dtype == torch.uint8 and cache.shape[-1] == 64 + 4        # codes, then a float32 scale
    # fp32 rows are 256 bytes per (token, KV head), int8 rows 68
    per_block_fp32 = 2 * 30 * 16 * 3 * 64 * 4
    assert executor.num_kv_blocks == KV_BYTES // (per_block_fp32 * 68 // 256)
    assert decode.engine.core.scheduler.kv.key_space.dtype == "float32+kv-int8"


def test_int8_cache_keeps_the_fp32_cache_top1_and_prefix_reuse(engines):
    _, decode = engines
    core = decode.engine.core
    ids = prompts(decode.tokenizer, 1, PROMPT_LEN)[0]
    first, _ = run_request(core, ids, NEW_TOKENS)
    again = decode.generate([ids], _greedy())[0]
    assert again.num_cached_tokens >= 96 and again.outputs[0].token_ids == first
    # the same weights with an fp32 cache, teacher-forced over prompt + answer: same next token almost everywhere
    lm, fmt = core.executor.lm, core.executor.kv_format
    seq = ids + first
    with_int8 = score_tokens(lm, seq, fmt).argmax(-1)
    with_fp32 = score_tokens(lm, seq).argmax(-1)
    assert (with_int8 == with_fp32).float().mean().item() >= 0.97


def test_decode_engine_continues_from_int8_blocks_it_pulled(engines):
    prefill, decode = engines
    ids = prompts(prefill.tokenizer, 2, PROMPT_LEN)[1]
    colocated, params = run_request(prefill.engine.core, ids, NEW_TOKENS, kv_transfer_params={"do_remote_decode": True})
    core = decode.engine.core
    before = core.stats().external_prefix_cache_hits
    tokens, _ = run_request(core, ids, NEW_TOKENS, params)
    assert tokens == colocated
    assert core.stats().external_prefix_cache_hits - before == 96


def _greedy():
    from inferstack.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
