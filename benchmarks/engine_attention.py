"""Paged attention decode step cost for SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64).

Prints CPU microseconds per layer call of the paged attention op for pure-decode batches (the
step's plan is made once and shared by all layers, as the model does; its cost is listed apart), next to a
per-sequence loop over the same cache (the obvious implementation this one replaces), the C++ kernel that
reads the cache in place (models/csrc/paged_attention.cpp; when the extension is built) through the same op,
and the whole model's decode step for the bundled model when ``--model`` is given.

    python benchmarks/engine_attention.py [--context 256] [--threads 1] [--dtype float32|bfloat16]
                                          [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from inferstack.engine.executor.attention import paged_attention_planned, plan_attention
from inferstack.engine.executor.attention_metadata import AttentionMetadata
from inferstack.engine.models.extension import load_extension

NH, NKV, HD, BS = 9, 3, 64, 16


def decode_meta(batch: int, context: int, num_blocks: int) -> AttentionMetadata:
    per_seq = -(-context // BS)
    perm = torch.randperm(num_blocks)[: batch * per_seq].view(batch, per_seq)
    lens = [context - (b % 7) for b in range(batch)]  # ragged lengths, like a real batch
    slots = torch.tensor([int(perm[b, (n - 1) // BS]) * BS + (n - 1) % BS for b, n in enumerate(lens)])
    return AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(batch + 1),
                             seq_lens=torch.tensor(lens), block_tables=perm, query_lens_list=[1] * batch,
                             seq_lens_list=lens, block_size=BS)


def loop_attention(q, k, v, cache, meta, scale):
    """Reference peer: gather and attend one sequence at a time."""
    flat = cache.view(2, -1, NKV, HD)
    flat[0].index_copy_(0, meta.slot_mapping, k)
    flat[1].index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for b, n in enumerate(meta.seq_lens_list):
        blocks = meta.block_tables[b, : -(-n // BS)]
        slots = (blocks[:, None] * BS + torch.arange(BS)).reshape(-1)[:n]
        kk, vv = flat[0][slots].transpose(0, 1), flat[1][slots].transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b][:, None], kk, vv, scale=scale, enable_gqa=True)[:, 0]
    return out


def bench(fn, iters: int) -> float:
    """CPU microseconds per call (process time: a shared machine's descheduling does not count)."""
    fn()
    t0 = time.process_time()
    for _ in range(iters):
        fn()
    return (time.process_time() - t0) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=256, help="tokens of context per sequence")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="cache and queries")
    ap.add_argument("--model", default=None, help="also time full decode steps of this model (e.g. smollm2-135m)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ext = load_extension()
    kernel = None if ext is None else ext.paged_decode_attention
    print(f"context={args.context} threads={args.threads} {args.dtype} torch={torch.__version__} (CPU time per call)")
    print(f"{'batch':>5} {'paged_attention us':>19} {'plan us':>8} {'per-seq loop us':>16} {'speedup':>8} "
          f"{'in-place C++ us':>16} {'C++ speedup':>12}")
    for batch in (1, 4, 16, 64):
        num_blocks = batch * (-(-args.context // BS)) + 8
        cache = torch.randn(2, num_blocks, BS, NKV, HD).to(dtype)
        meta = decode_meta(batch, args.context, num_blocks)
        q, k, v = (torch.randn(batch, n, HD).to(dtype) for n in (NH, NKV, NKV))
        plan = plan_attention(meta)  # once per step, shared by all layers (as the model does)
        ours = bench(lambda: paged_attention_planned(q, k, v, cache, plan, HD ** -0.5), args.iters)  # noqa: B023
        plan_us = bench(lambda: plan_attention(meta), args.iters)  # noqa: B023
        loop = bench(lambda: loop_attention(q, k, v, cache, meta, HD ** -0.5), max(5, args.iters // 5))  # noqa: B023
        cpp = "n/a (not built)"
        if kernel is not None:
            in_place = plan_attention(meta, kernel)
            us = bench(lambda: paged_attention_planned(q, k, v, cache, in_place, HD ** -0.5), args.iters)  # noqa: B023
            cpp = f"{us:>16.0f} {ours / us:>11.1f}x"
        print(f"{batch:>5} {ours:>19.0f} {plan_us:>8.0f} {loop:>16.0f} {loop / ours:>7.1f}x {cpp}")
    if args.model:
        model_steps(args)


def model_steps(args: argparse.Namespace) -> None:
    from inferstack.engine.weights.loader import load_model

    lm = load_model(args.model, dtype="float32")
    print(f"\nfull decode step, {args.model} fp32 (30 layers + LM head), context={args.context}")
    print(f"{'batch':>5} {'ms/step':>8} {'tok/s':>8}")
    for batch in (1, 16, 64):
        num_blocks = batch * (-(-args.context // BS)) + 8
        caches = [torch.randn(2, num_blocks, BS, lm.arch.num_kv_heads, lm.arch.head_dim)
                  for _ in range(lm.arch.num_layers)]
        meta = decode_meta(batch, args.context, num_blocks)
        ids = torch.randint(0, lm.arch.vocab_size, (batch,))
        positions = meta.seq_lens - 1

        def step() -> None:
            with torch.no_grad():
                lm.model.compute_logits(lm.model(ids, positions, caches, meta))  # noqa: B023

        us = bench(step, max(3, args.iters // 10))
        print(f"{batch:>5} {us / 1e3:>8.1f} {batch / (us / 1e6):>8.0f}")


if __name__ == "__main__":
    main()
