"""The built-in engine on the bundled SmolLM2 GGUF against HF transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from inferstack.engine.llm import LLM
from inferstack.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash function is in one sentence.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Describe the color blue to someone who cannot see.",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llm() -> LLM:
    # one torch thread, as every test process (tests/conftest.py); the batch cap is left unset (8 per thread)
    return LLM("smollm2-135m", dtype="float32", num_threads=1)


def hf_greedy(model, ids: list[int], ours: list[int]) -> list[int]:
    """transformers' greedy continuation of ``ids``, as far as it agrees with ``ours`` plus one token.

    One forward over prompt + our tokens gives transformers' argmax after every prefix of ours; while
    those equal our tokens the prefixes are the same as in transformers' own greedy decode, so up to and
    including the first difference this is exactly its greedy output (32 decode steps of generate() cost
    ~30x more). Past a difference the prefixes differ and nothing is compared, as before."""
    with torch.inference_mode():
        nxt = model(torch.tensor([ids + ours[:-1]])).logits[0, len(ids) - 1:].argmax(-1).tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours, nxt, strict=True)) if a != b), len(ours))
    return nxt[:same + 1]


def assert_same_or_near_tie(ours, theirs: list[int]) -> None:
    """Token-for-token equal, or the first divergence is a near-tie in our own logits."""
    for i, (a, b) in enumerate(zip(ours.token_ids, theirs, strict=False)):
        if a != b:
            top = ours.logprobs[i].top
            assert top[0][1] - top[1][1] < 1e-3, f"diverged at token {i}: {a} vs {b}, gap {top[0][1] - top[1][1]}"
            return


def test_greedy_chat_matches_transformers(llm, hf_smollm2):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]))
               for p in PROMPTS]
    results = llm.generate(prompts, params)
    exact = 0
    for ids, res in zip(prompts, results, strict=True):
        theirs = hf_greedy(hf_smollm2, ids, res.outputs[0].token_ids)
        assert_same_or_near_tie(res.outputs[0], theirs)
        exact += res.outputs[0].token_ids == theirs
    assert exact >= 8


def test_greedy_completion_matches_transformers(llm, hf_smollm2):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    results = llm.generate(PROMPTS, params)
    exact = 0
    for res in results:
        theirs = hf_greedy(hf_smollm2, res.prompt_token_ids, res.outputs[0].token_ids)
        assert_same_or_near_tie(res.outputs[0], theirs)
        exact += res.outputs[0].token_ids == theirs
    assert exact >= 8


def test_chat_answer_is_sensible(llm):
    res = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                   SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in res.outputs[0].text
    assert res.outputs[0].finish_reason.value == "stop"


def test_prefix_cache_reuses_512_tokens(llm):
    shared = "You are a careful assistant. " * 120
    first = llm.generate([shared + "Question one?"], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(first.prompt_token_ids) > 560
    second = llm.generate([shared + "A different question two?"], SamplingParams(temperature=0, max_tokens=4))[0]
    common = 0
    for a, b in zip(first.prompt_token_ids, second.prompt_token_ids, strict=False):
        if a != b:
            break
        common += 1
    assert second.num_cached_tokens >= 512
    assert second.num_cached_tokens == common // 16 * 16
    stats = llm.engine.core.stats()
    assert stats.prefix_cache_hits >= 512


def test_preemption_keeps_greedy_outputs(llm):
    prompts = [f"Count slowly from {i} to {i + 30}:" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ample = llm
    scarce = LLM("smollm2-135m", dtype="float32", num_threads=1, max_num_seqs=16, num_kv_blocks=8,
                 max_num_batched_tokens=64)
    want = [r.outputs[0].token_ids for r in ample.generate(prompts, params)]
    got = [r.outputs[0].token_ids for r in scarce.generate(prompts, params)]
    assert scarce.engine.core.stats().num_preemptions > 0
    assert got == want


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=16, n=2, ignore_eos=True)
    a = llm.generate(["Tell me a story."], params)[0]
    b = llm.generate(["Tell me a story.", "Unrelated other prompt"], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids


def test_stop_string_truncates(llm):
    res = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=30, stop=[" 7"]))[0]
    out = res.outputs[0]
    assert out.finish_reason.value == "stop" and out.stop_reason == " 7"
    assert " 7" not in out.text


def test_cpu_engine_caps_its_running_batch(llm):
    """Unset --max-num-seqs on CPU: 8 sequences per torch thread (engine/config.py, cpu_max_num_seqs; this
    engine has one); the rest wait in the engine's queue, where the gateway's flow control sees them (issue 21)."""
    scheduler = llm.engine.core.scheduler
    assert scheduler.config.max_num_seqs == 8
    peak = 0
    schedule = scheduler.schedule

    def watched():
        nonlocal peak
        out = schedule()
        peak = max(peak, len(scheduler.running))
        return out

    scheduler.schedule = watched
    try:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        results = llm.generate([f"Count to {i}:" for i in range(24)], params)
    finally:
        del scheduler.schedule
    assert len(results) == 24 and all(len(r.outputs[0].token_ids) == 3 for r in results)
    assert peak == 8
