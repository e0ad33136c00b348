"""int8 / int4 / GGUF-native weights on the bundled SmolLM2 GGUF against its fp32 weights."""

from __future__ import annotations

import pytest
import torch

from inferstack.engine.evaluate import DEFAULT_TEXT, TextScore, score_text, text_windows
from inferstack.engine.llm import LLM
from inferstack.engine.models.int8_blocks import available
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.weights.loader import load_model
from inferstack.engine.weights.quant_loader import QuantOptions

pytestmark = pytest.mark.slow

# Real English (every Debian/Ubuntu machine has it); a fixed paragraph when it is missing.
FALLBACK = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
            "capital of Germany. Water boils at one hundred degrees Celsius at sea level. ") * 8


WINDOW = 192
SHORT_WINDOWS = 2          # 384 positions: the formats whose floors sit far from their measured level
LONG_TOKENS = 2048         # the int8blk check (see MIN_TOP1_INT8_BLOCKS)


@pytest.fixture(scope="module")
def reference() -> tuple[list[list[int]], TextScore]:
    """The fp32 model's top-1 and perplexity on every window, scored once for the whole module."""
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m", dtype="float32")
    text = DEFAULT_TEXT.read_text() if DEFAULT_TEXT.exists() else FALLBACK
    windows = text_windows(lm, text, WINDOW, LONG_TOKENS)
    return windows, score_text(lm, windows)


def score_against(lm, reference, windows: int) -> tuple[float, float, float]:
    """``(top-1 agreement, perplexity, fp32 perplexity)`` on the first ``windows`` windows."""
    texts, ref = reference
    score, ref = score_text(lm, texts[:windows]), ref.first(windows)
    return score.agreement(ref), score.perplexity, ref.perplexity


# Issue 14's bar (int8 >= 99 %, int4 >= 95 %) is met on `inferstack model eval`'s held-out prompts (99.5 % /
# 99.7 %). On these 384 GPL-3 positions, with fp32 activations and grouped int8, we measured int8 98.96 %
# and gguf 97.40 % (contended machine, 2 threads); the bounds leave a few positions of margin.
# The int8 × int8 large-step GEMM (opt-in) loses accuracy: 84.4 % top-1 here with every step on it (ninth
# stop, docs/engine.md); the bound pins that level so a regression of the kernel shows.
MIN_TOP1_INT8_GEMM = 0.82
# The int8 block kernel (the file's own codes, activations rounded to 8 bits per 32 columns) is scored on
# 2,048 positions, not 384: its int8 activation codes flip under 1-ulp changes anywhere before them and the
# flips cascade through the layers, so one score is one draw of that noise
# (benchmarks/int8blk_top1_spread.py, 10 seeds of 1-ulp noise on SiLU's output). On 384 positions the
# seeds gave 0.945-0.977 (sd 0.0097) around the old 0.95 floor; on 2,048 they give 0.9556-0.9624 (mean
# 0.9587, sd 0.0023) and the unperturbed kernel 0.9531. The floor sits 3.5 sd below the lowest of those
# and 6 sd below the seeds' mean, so a 1-ulp change of the numerics cannot fail it by chance while a kernel
# error (a wrong scale or block costs whole points, like the int8 GEMM's 0.88) still does.
MIN_TOP1_INT8_BLOCKS = 0.945


@pytest.mark.parametrize(("quantization", "min_top1"), [("int8", 0.98), ("int4", 0.95), ("gguf", 0.96)])
def test_top1_agreement_and_perplexity_against_fp32(reference, quantization, min_top1):
    lm = load_model("smollm2-135m", quant=QuantOptions(quantization, dense_prefill=False))
    top1, ppl, ref_ppl = score_against(lm, reference, SHORT_WINDOWS)
    assert top1 >= min_top1, top1
    assert ppl < 1.1 * ref_ppl


@pytest.mark.parametrize(("large", "min_top1", "windows"), [
    ("float32", 0.995, SHORT_WINDOWS), ("int8", MIN_TOP1_INT8_GEMM, SHORT_WINDOWS),
    ("int8blk", MIN_TOP1_INT8_BLOCKS, None)])
def test_large_step_copies_against_fp32(reference, large, min_top1, windows):
    """Every step on the large-step copy (crossover 1). The fp32 copy holds the dequantized weights, and its
    steps keep the activations in fp32 from norm to residual (``DecoderLayer.wide_from``): it scores as
    fp32 itself (100 % and the same perplexity measured; 98.96 % when the activations between the norms
    were bf16, ninth stop). int8 rounds the weights per channel and each activation row to 8 bits."""
    if large == "int8blk" and available() is None:
        pytest.skip("the int8 block kernel needs AVX-512 VNNI and the built extension")
    lm = load_model("smollm2-135m", quant=QuantOptions("gguf", crossover_rows=1, large_kernel=large))
    assert lm.quant.large_kernel == large
    top1, ppl, ref_ppl = score_against(lm, reference, windows or len(reference[0]))
    print(f"{large} large steps: top-1 {top1:.4f}, perplexity {ppl:.3f} vs fp32 {ref_ppl:.3f}")
    assert top1 >= min_top1, top1
    assert ppl < 1.1 * ref_ppl


def test_int4_engine_answers_and_switches_kernels():
    """The served path: the bf16 copy for the prompt (crossover 8 rows), int4 for each decode step."""
    llm = LLM("smollm2-135m", quantization="gguf", quant_crossover_rows=8, num_threads=1,
              kv_cache_bytes=64 << 20)
    lm = llm.engine.core.executor.lm
    assert lm.quant.crossover == {"int4": 8, "int8": 8} and lm.dtype == torch.float32
    assert lm.quant.formats == {"int4 g32": 30 * 4, "int8 g32": 1}    # the Q8_0 LM head stays 8-bit
    res = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                   SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in res.outputs[0].text


def test_greedy_steps_take_the_heads_argmax_without_logits(monkeypatch):
    """Greedy steps on the int8 block copy take their tokens from the LM head's fused argmax (no logits), and they
    are the tokens the logits give; a step that wants logprobs still computes the logits."""
    if available() is None:
        pytest.skip("no AVX-512 VNNI or extension")
    llm = LLM("smollm2-135m", quantization="gguf", quant_crossover_rows=8, quant_large_kernel="int8blk",
              num_threads=1, kv_cache_bytes=64 << 20, max_num_seqs=16)
    model = llm.engine.core.executor.lm.model
    prompts = [[100 + 37 * i + j for j in range(12 + i)] for i in range(10)]   # 10 rows per decode step: int8blk
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    calls = {"fused": 0, "logits": 0}

    def counted(name, fn):
        def wrapper(hidden):
            calls[name] += 1
            return fn(hidden)
        return wrapper

    monkeypatch.setattr(model, "greedy_tokens", counted("fused", model.greedy_tokens))
    monkeypatch.setattr(model, "compute_logits", counted("logits", model.compute_logits))
    fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert calls["fused"] >= 8 and calls["logits"] == 0
    monkeypatch.setattr(model, "greedy_tokens", lambda hidden: None)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == fused
    assert calls["logits"] >= 8
    calls["logits"] = 0
    with_logprobs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1))
    assert [o.outputs[0].token_ids for o in with_logprobs] == fused and calls["logits"] >= 8
