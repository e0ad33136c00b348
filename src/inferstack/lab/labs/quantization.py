"""`quantization`: performance vs accuracy per precision on the bundled model, from
`inferstack model eval` (fp32 reference, then bf16, int8, int4, the GGUF's own bits and an int8 KV
cache): batch-1 decode tok/s against top-1 agreement, mean KL and perplexity, all from this run."""

from __future__ import annotations

import json
from pathlib import Path

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.runtime import LabRun

MODEL = "smollm2-135m"


def _scatter(path: Path, rows: list[list]) -> Path:
    """tok/s (x) against top-1 agreement (y), one labelled point per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for name, tok_s, top1, *_ in rows:
        ax.scatter(tok_s, top1, s=40)
        ax.annotate(name, (tok_s, top1), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("batch-1 decode tok/s")
    ax.set_ylabel("top-1 agreement with fp32 (%)")
    ax.set_title(f"{MODEL}: speed against accuracy per precision")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(lab: LabRun) -> LabResult:
    # --quick: the two weight formats on a small sample (three model loads), well under a minute quiet
    formats = ["int8", "int4"] if lab.quick else ["bfloat16", "int8", "int4", "gguf"]
    kv = [] if lab.quick else ["int8", "fp8_e4m3"]
    prompts, new_tokens, text_tokens, steps = (2, 8, 128, 8) if lab.quick else (12, 32, 2048, 64)
    args = ["model", "eval", "--model", MODEL, "--json", "--prompts", str(prompts), "--new-tokens",
            str(new_tokens), "--max-text-tokens", str(text_tokens), "--decode-steps", str(steps),
            *[a for k in kv for a in ("--kv-cache-dtype", k)], *[a for f in formats for a in ("--quantization", f)]]
    scores = json.loads(lab.cli(*args).stdout)
    rows = [[s["name"], s["decode_tok_s"], 100 * s["top1"], s["mean_kl"], 100 * s["greedy_tokens"],
             s["perplexity"], s["weight_mib"]] for s in scores]
    ref, others = rows[0], rows[1:]
    fastest = max(others, key=lambda r: r[1])
    closest = max(others, key=lambda r: (r[2], -r[3]))
    findings = [
        f"Fastest batch-1 decode: {fastest[0]} at {fastest[1]:.1f} tok/s, {fastest[1] / ref[1]:.1f}x the fp32 "
        f"reference ({ref[1]:.1f} tok/s), with {fastest[2]:.1f} % top-1 agreement and {fastest[6]:.0f} MiB of "
        f"weights (fp32: {ref[6]:.0f} MiB).",
        f"Closest to fp32: {closest[0]} ({closest[2]:.2f} % top-1, mean KL {closest[3]:.4f} nats, perplexity "
        f"{closest[5]:.2f} vs {ref[5]:.2f}).",
        *[f"{r[0]}: {r[1]:.1f} tok/s, {r[2]:.2f} % top-1, greedy answers equal to fp32's for {r[4]:.0f} % of "
          f"their tokens." for r in others],
        "Batch-1 decode is bound by reading the weights, so fewer bytes per weight buy speed; what they cost "
        "in accuracy is the top-1 and KL columns. The bundled model's weights were 4-bit (Q4_1) before we "
        "dequantized them, so int4 g32 and int8 can store them almost exactly here.",
    ]
    plot = _scatter(lab.out / "speed_vs_accuracy.png", rows)
    table = Table(f"{MODEL}: {prompts} held-out prompts x {new_tokens} tokens, {text_tokens} GPL-3 tokens, "
                  f"{steps} timed decode steps per format",
                  ["format", "decode tok/s", "top-1 %", "mean KL (nats)", "greedy tokens %", "perplexity",
                   "weights MiB"], rows)
    return LabResult(findings, [table], [plot], {"scores": scores})


LAB = Lab(
    name="quantization", week=2, title="Performance vs accuracy",
    question="What does each weight and KV precision buy in decode speed, and cost in accuracy against fp32?",
    teaches="tok/s against top-1 agreement, KL and perplexity per precision (inferstack model eval)",
    needs=("the bundled SmolLM2-135M", "inferstack model eval"), minutes=6.0, run=run)
