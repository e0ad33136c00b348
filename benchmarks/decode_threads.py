"""Batch-1 decode tok/s of one engine at several thread counts, alternating in one process.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src python benchmarks/decode_threads.py [--quantization gguf]
        [--threads 1,2] [--repeats 2] [--steps 48]

Run it once per OpenMP setting (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``: libgomp reads them when torch is
imported, so they can only come from the environment). Rows alternate between thread counts, so load
from other processes hits each about equally; compare rows of one run.
"""

from __future__ import annotations

import argparse
import os

import torch

from inferstack.engine.evaluate import decode_rate
from inferstack.engine.llm import LLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantization", default="gguf", choices=("none", "int8", "int4", "gguf"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    llm = LLM(args.model, quantization=args.quantization, num_threads=threads[0], quant_crossover_rows=16)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"{args.quantization}, OMP_WAIT_POLICY={policy}, batch-1 decode of {args.steps} tokens")
    print("| threads | tok/s | load average |\n|---|---:|---:|")
    for _ in range(args.repeats):
        for t in threads:
            torch.set_num_threads(t)
            rate = decode_rate(llm, steps=args.steps)
            print(f"| {t} | {rate:.1f} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
