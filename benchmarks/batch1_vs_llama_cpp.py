"""Batch-1 decode against llama.cpp on the same GGUF, alternating in one run, ratio per round.

    LLAMA_CPP_BIN=DIR PYTHONPATH=src python benchmarks/batch1_vs_llama_cpp.py [--threads 2] [--rounds 5]
                                                                            [--steps 128]

Each round measures our engine (``--quantization gguf``, loaded once; ``engine/evaluate.py``
``decode_rate``: a 32-token prompt, then ``--steps`` greedy tokens) and right after it llama.cpp's
``llama-bench`` (``-d 32 -n steps``, one repeat; ``benchmarks/llama_cpp_peer.py``), and prints the ratio
of the two. On a machine other processes load, a burst slows whichever side it lands on, so one
ratio means little; the median of the rounds' ratios is the number to report.
"""

from __future__ import annotations

import argparse
import statistics

import llama_cpp_peer

from inferstack.engine.evaluate import decode_rate
from inferstack.engine.llm import LLM
from inferstack.engine.weights.loader import resolve_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF model (name or path)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=128, help="decode tokens per measurement")
    ap.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp's tools (default: $LLAMA_CPP_BIN, "
                    ".cache/llama.cpp/bin or PATH; built by scripts/build_llama_cpp.sh)")
    args = ap.parse_args()
    tools = llama_cpp_peer.find_tools(args.llama_cpp)
    path = resolve_model_path(args.model)
    if tools is None or path.suffix != ".gguf":
        raise SystemExit("needs llama.cpp's tools (scripts/build_llama_cpp.sh) and a GGUF model")
    llm = LLM(args.model, quantization="gguf", num_threads=args.threads)
    cpp = "C++ decode layers" if llm.engine.core.executor.lm.model.fused is not None else "Python layers"
    print(f"{path.name}, {args.threads} thread(s), {args.steps} tokens, ours: {cpp}")
    print("| round | ours tok/s | llama.cpp tok/s | ratio |\n|---:|---:|---:|---:|")
    ratios = []
    for i in range(args.rounds):
        ours = decode_rate(llm, steps=args.steps)
        peer = llama_cpp_peer.decode_rate(tools, path, args.threads, args.steps, repeats=1)
        ratios.append(ours / peer)
        print(f"| {i + 1} | {ours:.1f} | {peer:.1f} | {ratios[-1]:.2f} |", flush=True)
    print(f"median ratio {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
