"""How much the int8blk top-1 check moves under 1-ulp noise: the spread of one measurement, not an accuracy change.

``test_large_step_copies_against_fp32[int8blk]`` scores top-1 agreement with the fp32 weights on GPL-3 positions.
A 1-ulp change anywhere before an int8 activation rounding (here SiLU's output, multiplied by ``1 + eps · randn``)
flips a code now and then, and the flips cascade through the layers, so each seed samples the int8 rounding noise
afresh. Prints top-1 and perplexity for the unperturbed model and each seed (1 thread), then the seeds' mean,
standard deviation and range.

    PYTHONPATH=../src python int8blk_top1_spread.py --seeds 1,2,3 --tokens 2048
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import inferstack.engine.models.layers as layers
from inferstack.engine.evaluate import DEFAULT_TEXT, score_text, text_windows
from inferstack.engine.weights.loader import load_model
from inferstack.engine.weights.quant_loader import QuantOptions


class NoisySilu:
    """``torch.nn.functional`` with SiLU's output multiplied by ``1 + eps · randn`` (seeded)."""

    def __init__(self, seed: int, eps: float) -> None:
        self.gen, self.eps = torch.Generator().manual_seed(seed), eps

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(x)
        return y * (1 + self.eps * torch.randn(y.shape, generator=self.gen))

    def __getattr__(self, name: str) -> object:
        return getattr(F, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--eps", type=float, default=1.2e-7, help="relative noise on SiLU's output (1 ulp ~ 1.2e-7)")
    ap.add_argument("--tokens", type=int, default=2048, help="GPL-3 tokens scored (the test's count)")
    ap.add_argument("--window", type=int, default=192)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = load_model("smollm2-135m", dtype="float32")
    windows = text_windows(ref, DEFAULT_TEXT.read_text(), args.window, args.tokens)
    ref_score = score_text(ref, windows)
    lm = load_model("smollm2-135m", quant=QuantOptions("gguf", crossover_rows=1, large_kernel="int8blk"))
    if lm.quant.large_kernel != "int8blk":
        raise SystemExit("needs the int8 block kernel (AVX-512 VNNI and the built extension)")
    print(f"{sum(map(len, ref_score.top))} positions in {len(windows)} windows; "
          f"fp32 perplexity {ref_score.perplexity:.3f}")
    s = score_text(lm, windows)
    print(f"int8blk: top-1 {s.agreement(ref_score):.4f}, perplexity {s.perplexity:.3f}", flush=True)
    # The MLP calls the plain SiLU (the fused kernel's is torch's exactly, nothing to perturb there).
    for layer in lm.model.layers:
        layer.mlp.gate_up.silu_mul = lambda x: None
    tops = []
    for seed in (int(s) for s in args.seeds.split(",")):
        layers.F = NoisySilu(seed, args.eps)
        s = score_text(lm, windows)
        tops.append(s.agreement(ref_score))
        print(f"seed {seed}: top-1 {tops[-1]:.4f}, perplexity {s.perplexity:.3f}", flush=True)
    layers.F = F
    if len(tops) > 1:
        print(f"seeds: mean {statistics.mean(tops):.4f}, sd {statistics.stdev(tops):.4f}, "
              f"range {min(tops):.4f}-{max(tops):.4f}")


if __name__ == "__main__":
    main()
