"""What-if: top-1 agreement with fp32 if every large-step GEMM input were rounded to int8 per block of columns.

    PYTHONPATH=src python benchmarks/int8_activation_blocks.py [--blocks 0,32,64,-1] [--threads 1]

The bundled GGUF runs every step on its fp32 large-step copy (the dequantized, exact Q4_1/Q8_0 weights), and
each GEMM's input is first rounded to int8 with one symmetric scale per ``block`` columns (0: not rounded;
-1: one scale per row, as ``models/int8_gemm.py`` does). That is the activation side of an int8 × int8 GEMM
with llama.cpp-style block scales, simulated in float32: it answers how accurate such a kernel would be
before anyone writes it (docs/engine.md, "Large steps on CPU"). Scored as ``tests/integration/
test_quantized_real_model.py`` scores: top-1 and perplexity against the fp32 model on the GPL-3 text.
"""

from __future__ import annotations

import argparse

import torch

import inferstack.engine.models.quant_linear as ql
from inferstack.engine.evaluate import DEFAULT_TEXT, perplexity, score_tokens, text_windows
from inferstack.engine.weights.loader import load_model
from inferstack.engine.weights.quant_loader import QuantOptions


def rounded(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` rounded to int8 codes with one float32 scale (max |x| / 127) per ``block`` columns, dequantized."""
    xf = x.float()
    rows, cols = xf.shape
    width = cols if block < 0 else block
    groups = xf.view(rows, cols // width, width)
    scale = groups.abs().amax(-1, keepdim=True).clamp_(min=1e-30) / 127
    return (torch.round(groups / scale) * scale).view(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="0,32,64,-1")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = load_model("smollm2-135m", dtype="float32")
    windows = text_windows(ref, DEFAULT_TEXT.read_text(), 192, 192)
    ref_top = [score_tokens(ref, w).argmax(-1) for w in windows]
    ref_ppl = perplexity(ref, windows)
    lm = load_model("smollm2-135m", quant=QuantOptions("gguf", crossover_rows=1, large_kernel="float32"))
    exact = ql.large_matmul
    for block in (int(b) for b in args.blocks.split(",")):
        ql.large_matmul = exact if block == 0 else (
            lambda copy, x, out, block=block: exact(copy, rounded(x, block), out))
        agree = sum((score_tokens(lm, w).argmax(-1) == r).sum().item() for w, r in zip(windows, ref_top, strict=True))
        n = sum(map(len, windows))
        name = {0: "not rounded", -1: "int8, one scale per row"}.get(block, f"int8, one scale per {block} columns")
        print(f"| {name} | {agree / n:.4f} ({n} positions) | {perplexity(lm, windows):.3f} | {ref_ppl:.3f} |",
              flush=True)
    ql.large_matmul = exact


if __name__ == "__main__":
    main()
