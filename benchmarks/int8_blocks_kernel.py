"""The int8 × int8 block kernel (``int8blk``, ``csrc/int8_blocks.cpp``) against oneDNN's fp32 and bf16 GEMMs
(``F.linear``) and ``_int_mm`` per-row int8 (``int8_gemm.py``) on SmolLM2-135M's projection shapes.

One thread; each kernel's cost is its fastest of ``--repeats`` calls in *thread CPU time* (load on a shared
machine adds wall time, much less CPU time), peers interleaved call by call. GOP/s counts 2·M·N·K.

    PYTHONPATH=../src python int8_blocks_kernel.py --rows 64 2048
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from inferstack.engine.models.int8_blocks import Int8Blocks, available
from inferstack.engine.models.int8_gemm import Int8Gemm
from inferstack.engine.weights.quantize import Int4Weight, Int8Weight

# (name, N, K): fused q/k/v, o, fused gate/up, down, and the LM head (decode steps only).
SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("head", 49152, 576))


def fastest(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.thread_time_ns()
            fn()
            best[name] = min(best[name], (time.thread_time_ns() - t) / 1e9)
    return best


def shape_row(ext: ModuleType, rows: int, name: str, n: int, k: int, repeats: int) -> str:
    w = torch.randn(n, k) * 0.05
    q4 = Int4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // 32) * 0.01,
                    -torch.rand(n, k // 32) * 0.08, 32)
    q8 = Int8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // 32) * 1e-3, group=32)
    b4, b8, wb, per_row = Int8Blocks.pack(q4, ext), Int8Blocks.pack(q8, ext), w.bfloat16(), Int8Gemm.quantize(w)
    x = torch.randn(rows, k)
    xb = x.bfloat16()
    t = fastest({"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb),
                 "int8": lambda: per_row.matmul(x, torch.float32), "q4": lambda: b4.matmul(x),
                 "q8": lambda: b8.matmul(x)}, repeats)
    g = {key: 2 * rows * n * k / 1e9 / v for key, v in t.items()}
    return (f"| {rows} | {name} {n}×{k} | {g['fp32']:.0f} | {g['bf16']:.0f} | {g['int8']:.0f} | {g['q4']:.0f} "
            f"| {g['q8']:.0f} | {g['q4'] / g['fp32']:.2f}× |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 2048])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-head-above", type=int, default=64, help="time the LM head only up to this many rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ext = available()
    if ext is None:
        raise SystemExit("needs the built extension and a CPU with AVX-512 VNNI")
    torch.manual_seed(0)
    print("| rows | shape (N×K) | fp32 GOP/s | bf16 | int8 per row (`_int_mm`) | int8blk Q4_1 | int8blk Q8_0 "
          "| Q4_1 / fp32 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        for name, n, k in SHAPES:
            if name != "head" or rows <= args.skip_head_above:
                print(shape_row(ext, rows, name, n, k, args.repeats), flush=True)


if __name__ == "__main__":
    main()
