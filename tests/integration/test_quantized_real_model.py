"""int8 / int4 / GGUF-native weights on the bundled SmolLM2 GGUF against its fp32 weights."""

from __future__ import annotations

import pytest
import torch

from inferstack.engine.evaluate import DEFAULT_TEXT, perplexity, score_tokens, text_windows
from inferstack.engine.llm import LLM
from inferstack.engine.models.int8_blocks import available
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.weights.loader import load_model
from inferstack.engine.weights.quant_loader import QuantOptions

pytestmark = pytest.mark.slow

# Real English (every Debian/Ubuntu machine has it); a fixed paragraph when it is missing.
FALLBACK = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
            "capital of Germany. Water boils at one hundred degrees Celsius at sea level. ") * 8


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m", dtype="float32")
    text = DEFAULT_TEXT.read_text() if DEFAULT_TEXT.exists() else FALLBACK
    windows = text_windows(lm, text, 192, 192)
    return lm, windows, [score_tokens(lm, w).argmax(-1) for w in windows]


# Issue 14's bar (int8 >= 99 %, int4 >= 95 %) is met on `inferstack model eval`'s held-out prompts (99.5 % /
# 99.7 %). On these 384 GPL-3 positions, with fp32 activations and grouped int8, we measured int8 98.96 %
# and gguf 97.40 % (contended machine, 2 threads); the bounds leave a few positions of margin.
# The int8 × int8 large-step GEMM (opt-in) loses accuracy: 84.4 % top-1 here with every step on it (ninth
# stop, docs/engine.md); the bound pins that level so a regression of the kernel shows.
MIN_TOP1_INT8_GEMM = 0.82
# The int8 block kernel (the file's own codes, activations per 32 columns) measured 96.35 % here: issue
# 14's int4 floor, the file's format.
MIN_TOP1_INT8_BLOCKS = 0.95


@pytest.mark.parametrize(("quantization", "min_top1"), [("int8", 0.98), ("int4", 0.95), ("gguf", 0.96)])
def test_top1_agreement_and_perplexity_against_fp32(reference, quantization, min_top1):
    ref_lm, windows, ref_top = reference
    lm = load_model("smollm2-135m", quant=QuantOptions(quantization, dense_prefill=False))
    agree = sum((score_tokens(lm, w).argmax(-1) == r).sum().item() for w, r in zip(windows, ref_top, strict=True))
    top1 = agree / sum(map(len, windows))
    assert top1 >= min_top1, top1
    assert perplexity(lm, windows) < 1.1 * perplexity(ref_lm, windows)


@pytest.mark.parametrize(("large", "min_top1"), [("float32", 0.995), ("int8", MIN_TOP1_INT8_GEMM),
                                                 ("int8blk", MIN_TOP1_INT8_BLOCKS)])
def test_large_step_copies_against_fp32(reference, large, min_top1):
    """Every step on the large-step copy (crossover 1). The fp32 copy holds the dequantized weights, and its
    steps keep the activations in fp32 from norm to residual (``DecoderLayer.wide_from``): it scores as
    fp32 itself (100 % and the same perplexity measured; 98.96 % when the activations between the norms
    were bf16, ninth stop). int8 rounds the weights per channel and each activation row to 8 bits."""
    ref_lm, windows, ref_top = reference
    if large == "int8blk" and available() is None:
        pytest.skip("the int8 block kernel needs AVX-512 VNNI and the built extension")
    lm = load_model("smollm2-135m", quant=QuantOptions("gguf", crossover_rows=1, large_kernel=large))
    assert lm.quant.large_kernel == large
    agree = sum((score_tokens(lm, w).argmax(-1) == r).sum().item() for w, r in zip(windows, ref_top, strict=True))
    top1 = agree / sum(map(len, windows))
    ppl, ref_ppl = perplexity(lm, windows), perplexity(ref_lm, windows)
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
